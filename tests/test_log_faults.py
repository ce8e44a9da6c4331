"""Logging never stops serving, and log files follow rotation.

Units of :func:`set_logger`: a log file that cannot be opened (a directory stands at its
path), that becomes unopenable after a rotation, or whose writes fail (a full disk,
``/dev/full``) sends the records to stderr, each record once, with one warning line
naming the file, and the file is used again once it can be. Units of
:class:`PredictionLog`: a renamed file is noticed by the writer (an inode check at most
every second or every N lines) and a new file is opened at the path; ``reopen()``, as
called from a SIGHUP handler, forces it; a path that cannot be opened does not stop the
log: its lines are counted as lost, with one error line, and it recovers.

End to end: a server with ``-log_dir`` whose log files become unopenable, then a worker
killed with SIGKILL: the restarted worker boots and serves, the lost prediction-log lines
are reported, the server stays up.

The files are made unopenable by putting a directory at their path, which works for
root too (``chmod`` on the directory does not stop root, nor the append-open of a file
that already exists).
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import connect, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import logs as client_logs
from wkr_serving.server.logs import set_logger
from wkr_serving.server.predlog import Entry, Item, PredictionLog, log_path
from workers import EchoWorker

#: Longest wait for log lines, replies or a restarted worker (the box is slow and shared).
LIMIT_S = 30.0
#: A check interval no test reaches: only an explicit reopen() may reopen.
NEVER_S = 3600.0
NEVER_LINES = 10**9


# -- helpers -------------------------------------------------------------------------------


def entry(i: int) -> Entry:
    data = msgpack.packb(i)
    return Entry(time=1_700_000_000.0, latency_s=0.001, client=b"\x07", req_id=i,
                 request_id=None, offset=0, n_items=1, total=1, batch_size=1, worker=0,
                 error=None, inputs=[Item(0, data, 1)], outputs=[Item(0, data, 1)])


def req_ids(path: Path) -> list[int]:
    """The req_id of every line of a prediction log (each must be complete JSON)."""
    import json

    if not path.exists():
        return []
    return [json.loads(line)["req_id"] for line in path.read_bytes().split(b"\n")[:-1]]


def block(path: Path) -> Path:
    """Rotate ``path`` away (to ``<path>.1``) and put a directory where it was, so that
    opening it fails for anyone, root included; return the rotated file."""
    rotated = path.with_name(path.name + ".1")
    path.rename(rotated)
    path.mkdir()
    return rotated


class Records(logging.Handler):
    """Keeps every record a logger emits (what the code under test tells the operator)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, text: str) -> list[str]:
        return [m for m in (r.getMessage() for r in self.records) if text in m]


@pytest.fixture
def records() -> Any:
    """A logger of its own and the records it received."""
    logger = logging.getLogger(f"test_log_faults.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Records()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def warnings_about(err: str, path: Path) -> list[str]:
    return [line for line in err.splitlines() if str(path) in line and "stderr" in line]


# -- set_logger ------------------------------------------------------------------------------


def test_set_logger_falls_back_to_stderr_when_a_file_cannot_be_opened(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    (log_dir / "svc.log").mkdir(parents=True)  # the .log file cannot be opened
    logger = set_logger("unit-open", str(log_dir), "svc")  # no OSError
    logger.info("first info line")
    logger.info("second info line")
    logger.error("an error line")
    err = capsys.readouterr().err
    assert len(warnings_about(err, log_dir / "svc.log")) == 1, err
    assert "IsADirectoryError" in warnings_about(err, log_dir / "svc.log")[0]
    for text in ("first info line", "second info line", "an error line"):
        assert err.count(text) == 1, err  # on stderr, once each
    # The .err file could be opened: errors still go there.
    assert "an error line" in (log_dir / "svc.err").read_text()
    assert not warnings_about(err, log_dir / "svc.err")


def test_set_logger_survives_a_file_that_becomes_unopenable(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(client_logs, "REOPEN_RETRY_S", 0.0, raising=False)  # retry at every record
    log_dir = tmp_path / "logs"
    logger = set_logger("unit-rotate", str(log_dir), "svc")
    logger.info("before the rotation")
    log_file, err_file = log_dir / "svc.log", log_dir / "svc.err"
    rotated = block(log_file)
    block(err_file)
    logger.info("info once rotated")  # the reopen fails: no OSError
    logger.error("error once rotated")
    logger.info("still going")
    err = capsys.readouterr().err
    assert len(warnings_about(err, log_file)) == 1, err
    assert len(warnings_about(err, err_file)) == 1, err
    for text in ("info once rotated", "error once rotated", "still going"):
        assert err.count(text) == 1, err  # once, though both files fall back
    assert "before the rotation" in rotated.read_text()
    # The path can be opened again: a new file there gets the next records.
    log_file.rmdir()
    logger.info("back in a file")
    assert "back in a file" in log_file.read_text()
    err = capsys.readouterr().err
    assert "back in a file" not in err
    assert f"log file {log_file} can be written again" in err


def test_set_logger_falls_back_when_writes_fail(tmp_path, capsys, monkeypatch):
    """Each record tries the file again (it opens, the write fails): still one warning."""
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is needed for this test")
    monkeypatch.setattr(client_logs, "REOPEN_RETRY_S", 0.0, raising=False)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "svc.log").symlink_to("/dev/full")  # opens, but every write fails
    logger = set_logger("unit-full", str(log_dir), "svc")
    for i in range(3):
        logger.info("line %d on a full disk", i)
    err = capsys.readouterr().err
    assert len(warnings_about(err, log_dir / "svc.log")) == 1, err
    for i in range(3):
        assert err.count(f"line {i} on a full disk") == 1, err
    assert "Logging error" not in err  # not the standard library's traceback per record
    assert "again" not in err  # the file opened again, but no record could be written


# -- the prediction log ----------------------------------------------------------------------


def test_prediction_log_follows_a_renamed_file(tmp_path):
    """logrotate renames the file: the writer notices (default check interval) and the
    next lines land in a new file at the original path, none lost."""
    path = tmp_path / "p.jsonl"
    log = PredictionLog(str(path))
    try:
        for i in range(3):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        rotated = path.with_name("p.jsonl.1")
        path.rename(rotated)
        sent = [3]

        def in_new_file() -> bool:
            assert log.put(entry(sent[0]))
            sent[0] += 1
            assert log.flush(LIMIT_S)
            return path.exists() and bool(req_ids(path))

        wait_until(in_new_file, LIMIT_S, "a line in a new file at the path", interval=0.05)
    finally:
        log.close()
    old, new = req_ids(rotated), req_ids(path)
    assert old + new == list(range(sent[0]))  # in order, none lost, none twice
    assert old[:3] == [0, 1, 2] and new
    assert log.failed == 0 and log.dropped == 0


def test_prediction_log_checks_the_file_every_n_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    log = PredictionLog(str(path), check_s=NEVER_S, check_lines=4)
    try:
        assert log.put(entry(0)) and log.flush(LIMIT_S)
        rotated = path.with_name("p.jsonl.1")
        path.rename(rotated)
        for i in range(1, 9):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
    finally:
        log.close()
    old, new = req_ids(rotated), req_ids(path)
    assert old + new == list(range(9))
    assert new and len(old) <= 4


def test_reopen_from_a_signal_handler_forces_a_new_file(tmp_path):
    """What the worker's SIGHUP handler does: reopen() only sets a flag; the writer
    reopens the path before its next line (no time or line count reached)."""
    path = tmp_path / "p.jsonl"
    log = PredictionLog(str(path), check_s=NEVER_S, check_lines=NEVER_LINES)
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: log.reopen())
    try:
        for i in range(2):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        rotated = path.with_name("p.jsonl.1")
        path.rename(rotated)
        os.kill(os.getpid(), signal.SIGHUP)
        for i in range(2, 4):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        assert req_ids(rotated) == [0, 1]
        assert req_ids(path) == [2, 3]
        log.reopen()  # the same file again: nothing lost, nothing doubled
        assert log.put(entry(4)) and log.flush(LIMIT_S)
        assert req_ids(path) == [2, 3, 4]
    finally:
        signal.signal(signal.SIGHUP, previous)
        log.close()


def test_unopenable_prediction_log_counts_lost_lines_and_warns_once(tmp_path, records):
    logger, seen = records
    path = tmp_path / "p.jsonl"
    path.mkdir()  # opening it fails, root included
    log = PredictionLog(str(path), logger=logger, check_s=0.0)  # no OSError
    try:
        for i in range(5):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        assert log.failed == 5 and log.written == 0 and log.take_lost() == 5
        assert len(seen.about(str(path))) == 1, seen.about(str(path))
        assert "IsADirectoryError" in seen.about(str(path))[0]
        # Once the path can be opened, lines are written again (one line says so).
        path.rmdir()
        assert log.put(entry(5)) and log.flush(LIMIT_S)
        assert req_ids(path) == [5] and log.written == 1 and log.take_lost() == 0
        assert len(seen.about(str(path))) == 2
    finally:
        log.close()


def test_failed_writes_warn_once(tmp_path, records):
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is needed for this test")
    logger, seen = records
    log = PredictionLog("/dev/full", logger=logger)
    try:
        for i in range(30):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        assert log.failed == 30 and log.take_lost() == 30
    finally:
        log.close()
    assert len(seen.about("/dev/full")) == 1, seen.about("/dev/full")


# -- end to end -----------------------------------------------------------------------------


def test_restarted_worker_with_unopenable_log_files_keeps_serving(tmp_path, capfd):
    """The log files become unopenable after the start, then the worker is killed: its
    replacement (which opens the log files and the prediction log when it starts) boots
    and serves; the supervisor logging the death does not stop either."""
    log_dir = tmp_path / "logs"
    args = server_args(tmp_path, "-protocol", "obj", "-num_worker", "1", "-cpu",
                       "-log_dir", str(log_dir), "-log_name", "faults", "-log_predictions",
                       "-graceful_timeout", "5")
    predictions = Path(log_path(str(log_dir), "faults"))
    with running_server(args, EchoWorker) as server, connect(server) as client:
        assert client.encode("before") == "before"
        old_pid = client.server_status["workers"][0]["pid"]
        for path in (log_dir / "faults.log", log_dir / "faults.err", predictions):
            block(path)
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            status = client.server_status
            row = status["workers"][0]
            return status["ready"] and row["pid"] not in (None, old_pid)

        wait_until(restarted, LIMIT_S, "the killed worker to be restarted")
        assert client.encode("after") == "after"

        def reported() -> bool:
            client.encode("carry the report")  # losses travel with the next batch
            stat = client.server_status["statistic"].get("prediction_log_dropped", {})
            return stat.get("count", 0) >= 1

        wait_until(reported, LIMIT_S, "the lost prediction-log lines in server_status",
                   interval=0.05)
        wait_idle(client)
        assert server.is_alive()
    err = capfd.readouterr().err
    assert warnings_about(err, log_dir / "faults.log"), err[-4000:]
    assert f"cannot open {predictions}" in err, err[-4000:]
