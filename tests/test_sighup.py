"""SIGHUP to the supervisor (logrotate's postrotate): the server keeps running and its
workers reopen the prediction log, so lines after a rotation go to a new file at the
configured path, not to the renamed one."""

from __future__ import annotations

import json
import os
import signal

from helpers import TESTS_DIR, wait_until
from wkr_serving.server.predlog import log_path


def lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_sighup_reopens_the_prediction_log_and_keeps_serving(cli_server, tmp_path):
    log_dir = tmp_path / "logs"
    server = cli_server(["workers.EchoWorker", "-num_worker", "2", "-cpu", "-log_dir",
                         str(log_dir), "-log_name", "svc", "-log_predictions",
                         "-graceful_timeout", "3"], cwd=TESTS_DIR)
    path = log_path(str(log_dir), "svc")
    with server.client() as client:
        assert client.encode_batch(["before"] * 4) == ["before"] * 4
        wait_until(lambda: os.path.exists(path) and lines(path), 30, "the first log line")
        rotated = path + ".1"
        os.rename(path, rotated)

        os.kill(server.proc.pid, signal.SIGHUP)
        system_log = log_dir / "svc.log"
        wait_until(lambda: system_log.read_text().count("SIGHUP: reopening the prediction "
                                                        "log") == 2,
                   30, "both workers to be told of the SIGHUP")
        assert server.proc.poll() is None, "SIGHUP stopped the server"
        for n in range(8):
            assert client.encode(f"after-{n}") == f"after-{n}"
        wait_until(lambda: os.path.exists(path) and len(lines(path)) >= 8, 30,
                   "the lines after the rotation in a new file")
        after = lines(path)
        assert {line["input"][0] for line in after} == {
            f"after-{n}" for n in range(8)}, after
        assert all(line["input"][0] == "before" for line in lines(rotated))
    assert server.proc.poll() is None
