"""The original Getting Started page, run as written (issue 8).

``tests/seed_page/`` keeps the page's code: ``server.py`` is its ``Worker`` example
verbatim except its two placeholders (the model is ``np.cos``; the result is the model's
output for each input), ``client.py`` its client example verbatim and ``start.sh`` its
``wkr-serving-start`` command line verbatim. The test starts that command line from
``tests/seed_page`` with port 0 in place of 8996/8998/8900 (the server picks free ports
and its log names them) and temporary folders in place of ``/path/to/model`` and
``/tmp/log_dir``, then runs the client code unchanged but for its two port numbers and
one appended ``print``.
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    HTTP_LIMIT_S,
    START_LIMIT_S,
    TESTS_DIR,
    CLIServer,
    http_request,
    start_command,
    wait_until,
)

SEED_DIR = Path(TESTS_DIR) / "seed_page"
#: Seconds the page's client may take (it sets no timeout of its own).
CLIENT_LIMIT_S = 60

# Two TensorFlow workers start on a small, shared machine.
pytestmark = pytest.mark.timeout(240)


def _replace_once(words: list[str], flag: str, value: str) -> None:
    """Set the value that follows ``flag`` (which must occur exactly once)."""
    assert words.count(flag) == 1, f"{flag} is not once in the page's command: {words}"
    words[words.index(flag) + 1] = value


class PageServer(CLIServer):
    """The page's ``wkr-serving-start`` command line, run in ``tests/seed_page``; stopped
    and read like a :class:`helpers.CLIServer` (whose arguments it does not add: its
    ports, 0 in ``argv``, are read back from its log under ``-log_dir``)."""

    def __init__(self, argv: list[str], tmp_path: Path) -> None:
        self._open_outputs(tmp_path, "page", argv)
        self.proc = subprocess.Popen(argv, cwd=SEED_DIR, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)


def _bridge_ready(url: str) -> bool:
    try:
        return http_request(url, timeout=5)[0] == 200
    except OSError:  # not listening yet
        return False


def test_getting_started_page_server_and_client_run_as_written(tmp_path):
    model_dir, log_dir = tmp_path / "model", tmp_path / "log_dir"
    model_dir.mkdir()

    text = (SEED_DIR / "start.sh").read_text()
    words = shlex.split(text.replace("\\\n", " "))
    assert words[:2] == ["wkr-serving-start", "server.Worker"], words
    assert "-protocol" not in words  # the default, obj
    words[0] = start_command()[0]
    for flag, value in (("-port_in", 0), ("-port_out", 0), ("-http_port", 0),
                        ("-model_dir", model_dir), ("-log_dir", log_dir)):
        _replace_once(words, flag, str(value))
    for flag, value in (("-model_name", "model.hdf5"), ("-num_worker", "2"),
                        ("-batch_size", "1"), ("-device_map", "-1"),
                        ("-gpu_memory_fraction", "0.25")):  # the page's own values
        assert words[words.index(flag) + 1] == value

    server = PageServer(words, tmp_path)
    try:
        with server.client(protocol="obj") as probe:
            status = probe.server_status
        assert status["config"]["num_worker"] == 2 and status["config"]["batch_size"] == 1
        assert status["config"]["protocol"] == "obj"
        assert [w["device"] for w in status["workers"]] == ["cpu", "cpu"]
        wait_until(lambda: _bridge_ready(f"http://127.0.0.1:{server.http_port}/health/ready"),
                   START_LIMIT_S, "the HTTP bridge on -http_port", interval=0.1)

        client_code = (SEED_DIR / "client.py").read_text()
        for literal, value in (("port=8996", f"port={server.port}"),
                               ("port_out=8998", f"port_out={server.port_out}")):
            assert client_code.count(literal) == 1, literal
            client_code = client_code.replace(literal, value)
        client_code += "    print(type(output).__name__, np.asarray(output).tolist())\n"

        run = subprocess.run([sys.executable, "-c", client_code], cwd=tmp_path,
                             capture_output=True, text=True, timeout=CLIENT_LIMIT_S,
                             stdin=subprocess.DEVNULL, env={**os.environ,
                                                            "PYTHONPATH": ""})
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
        kind, value = run.stdout.strip().splitlines()[-1].split(" ", 1)
        assert kind == "ndarray"
        assert ast.literal_eval(value) == np.cos(np.zeros((5, 5))).tolist()

        logs = list(log_dir.glob("*.log"))
        assert len(logs) == 1, sorted(os.listdir(log_dir))

        def logged() -> str | None:
            content = logs[0].read_text(errors="replace")
            done = content.count("Begin load model") == 2 and "DONE input" in content
            return content if done else None

        content = wait_until(logged, HTTP_LIMIT_S, "the worker's lines in the .log file")
        assert "Processing input" in content
        assert "Load model error" not in content

        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.stderr()[-4000:]
    finally:
        server.close()
