"""Structured system logs (``-log_format json``): one JSON object per line.

End to end: ``wkr-serving-start`` with ``-log_format json`` and the HTTP bridge, once on
stderr and once with ``-log_dir``; requests are served, one predict raises (the model
logs it with its traceback), the bridge gets a request it cannot parse; then every line
of stderr, or of the ``.log`` and ``.err`` files, is parsed as JSON and checked: the
keys, the roles (supervisor, ventilator, sink, worker, HTTP bridge), the levels, the
exception with its traceback, the request id, and the records of a library's logger, a
Python warning and uvicorn, which go through the role's handlers too. Without the flag
the lines are text, as before.

Units of :class:`JsonFormatter` and :func:`set_logger`: each field, a record of another
logger, ``verbose``, an unknown format.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import re
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import HTTP_LIMIT_S, CLIServer, http_call
from log_workers import LIBRARY_LOGGER
from wkr_serving.client import ModelError
from wkr_serving.server.config import ConfigError, load_config
from wkr_serving.server.logs import JsonFormatter, route_other_logs, set_logger

WORKER = "log_workers.LoggingWorker"
#: The keys every JSON line has.
KEYS = {"time", "level", "role", "pid", "worker", "message"}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
ROLES = {"SUPERVISOR", "VENTILATOR", "SINK", "WORKER-0", "HTTP-0"}
#: A row of the settings table wkr-serving-start prints on stderr before it starts
#: (server/cli.py), which is not a log line.
CONFIG_ROW = re.compile(r"^ *\w+ = ")
#: A text log line: ``[yy-mm-dd hh:mm:ss.mmm]: L:role: message``.
TEXT_LINE = re.compile(r"^\[\d\d-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]: [DIWEC]:[\w.-]+: ")


# -- helpers -------------------------------------------------------------------------------


def log_lines(text: str) -> list[str]:
    """The lines of ``text``, less the settings table the CLI prints first on stderr."""
    lines = text.splitlines()
    start = 0
    while start < len(lines) and CONFIG_ROW.match(lines[start]):
        start += 1
    return lines[start:]


def parse(lines: list[str], where: str, since: datetime.datetime,
          until: datetime.datetime) -> list[dict[str, Any]]:
    """Every line as a JSON object with the common keys, checked; ``since`` and
    ``until`` bound the ``time`` (UTC) of every line."""
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"{where} line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), (where, number, line)
        assert entry.keys() >= KEYS, (where, number, entry)
        assert TIME.match(entry["time"]), (where, number, entry["time"])
        moment = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc)
        assert since <= moment <= until, (where, number, entry["time"], since, until)
        assert entry["level"] in LEVELS, (where, number, entry)
        assert isinstance(entry["pid"], int) and entry["pid"] > 0, (where, number, entry)
        assert isinstance(entry["message"], str), (where, number, entry)
        assert entry["worker"] == (0 if entry["role"] == "WORKER-0" else None), entry
        entries.append(entry)
    assert "\x1b[" not in "\n".join(lines), f"colour codes in {where}"
    return entries


def now() -> datetime.datetime:
    """UTC now, to the millisecond below (log times are truncated to milliseconds)."""
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def exercise(server: CLIServer, request_id: str) -> None:
    """Serve a request, one whose predict raises (sent with ``request_id``), a 404 and a
    request the HTTP bridge cannot parse; then stop the server (SIGTERM), cleanly."""
    with server.client() as client:
        assert client.encode("hello") == "hello"
        with pytest.raises(ModelError, match="bad input"):
            client.encode({"cmd": "log_raise", "message": "bad input"}, request_id=request_id)
        assert client.encode("again") == "again"
    status, _, _ = http_call(server, "/no/such/route")
    assert status == 404
    with socket.create_connection(("127.0.0.1", server.http_port), HTTP_LIMIT_S) as conn:
        conn.settimeout(HTTP_LIMIT_S)
        conn.sendall(b"NOT HTTP \x00\x01\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 400")
    server.close()
    assert server.proc.returncode == 0, server.stderr()[-4000:]


def by(entries: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]


def check_served_logs(entries: list[dict[str, Any]], supervisor_pid: int) -> None:
    """What one run of :func:`exercise` logs, wherever it went."""
    roles = {e["role"] for e in entries}
    assert roles >= ROLES, roles
    assert {"INFO", "WARNING", "ERROR"} <= {e["level"] for e in entries}
    pids = {role: {e["pid"] for e in entries if e["role"] == role} for role in ROLES}
    assert pids["SUPERVISOR"] == {supervisor_pid}
    assert all(len(p) == 1 for p in pids.values()), pids  # one process per role
    assert len({p.pop() for p in pids.values()}) == len(ROLES)  # all different
    assert any(e["message"].startswith("ready: port ") for e in by(entries, role="SUPERVISOR"))
    # the model's own logger (new_logger), with the traceback of what predict raised
    assert by(entries, role="WORKER-0", message="user model loaded", level="INFO")
    [failed] = by(entries, role="WORKER-0", message="predict failed on 'bad input'")
    assert failed["level"] == "ERROR"
    exception = failed["exception"]
    assert exception["type"] == "ValueError" and exception["message"] == "bad input"
    assert exception["traceback"].startswith("Traceback (most recent call last):\n")
    assert "log_workers.py" in exception["traceback"]
    assert exception["traceback"].endswith("ValueError: bad input\n")
    # the worker's line about the failed request names the request
    [request] = [e for e in by(entries, role="WORKER-0", level="ERROR")
                 if e["message"].startswith("request ") and "failed" in e["message"]]
    assert isinstance(request.get("request_id"), str) and request["request_id"]
    assert request["exception"]["type"] == "ValueError"  # with its traceback
    assert request["exception"]["traceback"].endswith("ValueError: bad input\n")
    # records of other loggers go through the role's handlers, named
    [library] = by(entries, logger=LIBRARY_LOGGER)
    assert library["role"] == "WORKER-0" and library["level"] == "WARNING"
    assert library["message"] == "library warning while loading"
    [warned] = by(entries, logger="py.warnings")
    assert warned["role"] == "WORKER-0" and "a deprecated option" in warned["message"]
    assert by(entries, role="HTTP-0", logger="uvicorn.error", level="WARNING")
    # a line of the server's own loggers does not name a Python logger
    assert all("logger" not in e for e in by(entries, role="VENTILATOR") + by(entries,
                                                                            role="SINK"))


# -- end to end ----------------------------------------------------------------------------


def test_json_logs_on_stderr(cli_server):
    since = now()
    server = cli_server([WORKER, "-cpu", "-log_format", "json", "-http_port", "0"])
    exercise(server, "json-req-stderr")
    entries = parse(log_lines(server.stderr_path.read_text()), "stderr", since,
                    now() + datetime.timedelta(seconds=1))
    check_served_logs(entries, server.proc.pid)
    assert by(entries, role="SUPERVISOR", message="stopped cleanly (SIGTERM)")
    # the settings wkr-serving-start prints first are one JSON record too
    assert entries[0]["message"] == "settings" and entries[0]["settings"]["log_format"] == "json"


def test_json_logs_in_log_files(cli_server, tmp_path):
    log_dir = tmp_path / "logs"
    since = now()
    # the caller's request id reaches the worker (its options are passed on)
    server = cli_server([WORKER, "-cpu", "-log_format", "json", "-http_port", "0",
                         "-log_dir", str(log_dir), "-log_name", "jsonsvc"])
    exercise(server, "json-req-files")
    until = now() + datetime.timedelta(seconds=1)
    # all of it went to the files, but the settings record printed before the start
    [settings] = parse(log_lines(server.stderr_path.read_text()), "stderr", since, until)
    assert settings["message"] == "settings"
    log = parse((log_dir / "jsonsvc.log").read_text().splitlines(), "jsonsvc.log", since,
                until)
    err = parse((log_dir / "jsonsvc.err").read_text().splitlines(), "jsonsvc.err", since,
                until)
    check_served_logs(log, server.proc.pid)
    assert err and {e["level"] for e in err} <= {"ERROR", "CRITICAL"}
    assert [e for e in err if e.get("exception", {}).get("message") == "bad input"]
    assert by(err, request_id="json-req-files", role="WORKER-0")
    assert by(log, request_id="json-req-files", role="WORKER-0")
    # the prediction log is its own JSON-lines file, not mixed in
    assert all("req_id" not in e for e in log)


def test_text_logs_by_default(cli_server):
    server = cli_server([WORKER, "-cpu", "-http_port", "0"])
    exercise(server, "text-req")
    lines = log_lines(server.stderr_path.read_text())
    assert lines and not [line for line in lines if line.startswith("{")]
    text = [line for line in lines if TEXT_LINE.match(line)]
    roles = {line.split("]: ", 1)[1].split(":")[1] for line in text}
    assert {"SUPERVISOR", "ventilator", "sink", "worker-0", "WORKER-0", "http-0"} <= roles
    assert any(":SUPERVISOR: ready: port " in line for line in text)
    [failed] = [line for line in text if ":worker-0: request " in line and "failed" in line]
    assert failed.startswith("[") and "text-req" not in failed  # no request id in text
    index = lines.index(next(line for line in text if "predict failed on 'bad input'" in line))
    assert lines[index + 1] == "Traceback (most recent call last):"  # as logging writes it


# -- units ---------------------------------------------------------------------------------


def record(name: str = "wkr_serving.worker-3", level: int = logging.INFO, msg: str = "hi %s",
           args: tuple[Any, ...] = ("there",), exc_info: Any = None,
           **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord(name, level, "/x/file.py", 42, msg, args, exc_info)
    made.__dict__.update(extra)
    return made


def test_json_formatter_fields():
    formatter = JsonFormatter("worker-3", own=("wkr_serving.worker-3",))
    made = record()
    made.created, made.msecs = 1_700_000_000.9876, 987.6
    entry = json.loads(formatter.format(made))
    assert entry == {"time": "2023-11-14T22:13:20.987Z", "level": "INFO", "role": "WORKER-3",
                     "pid": made.process, "worker": 3, "message": "hi there"}


@pytest.mark.parametrize(("role", "worker"), [("worker-0", 0), ("worker-12.3", 12),
                                              ("WORKER-2", 2), ("ventilator", None),
                                              ("http-1", None), ("SUPERVISOR", None)])
def test_json_formatter_worker_index(role, worker):
    entry = json.loads(JsonFormatter(role).format(record(name=f"wkr_serving.{role}")))
    assert entry["role"] == role.upper() and entry["worker"] == worker


def test_json_formatter_exception_request_id_and_other_loggers():
    formatter = JsonFormatter("sink", own=("wkr_serving.sink",))
    try:
        raise KeyError("missing")
    except KeyError:
        exc_info = sys.exc_info()
    line = formatter.format(record(name="wkr_serving.sink", level=logging.ERROR,
                                   msg="two\nlines", args=(), exc_info=exc_info,
                                   request_id="r-1"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines" and entry["request_id"] == "r-1"
    assert entry["exception"]["type"] == "KeyError"
    assert entry["exception"]["message"] == "'missing'"
    assert entry["exception"]["traceback"].endswith("KeyError: 'missing'\n")
    assert "logger" not in entry and "file" not in entry
    other = json.loads(formatter.format(record(name="uvicorn.error", request_id=b"\x01")))
    assert other["logger"] == "uvicorn.error" and other["request_id"] == "b'\\x01'"
    assert "exception" not in other and "request_id" not in json.loads(
        formatter.format(record(request_id=None)))


def test_json_formatter_verbose_names_the_call_site():
    entry = json.loads(JsonFormatter("sink", verbose=True).format(record()))
    assert entry["file"] == "file.py" and entry["line"] == 42


@pytest.fixture
def unit_loggers() -> Iterator[None]:
    """Close the handlers of the loggers the unit tests make with set_logger."""
    yield
    for name in ("wkr_serving.json-unit", "wkr_serving.text-unit"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def test_set_logger_json_and_text(unit_loggers, tmp_path):
    json_out, text_out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(json_out):  # set_logger's handler takes sys.stderr
        logger = set_logger("json-unit", color="red", log_format="json")
    with contextlib.redirect_stderr(text_out):
        text = set_logger("text-unit")  # the default: text lines, which ignore request_id
    logger.info("one %d", 1, extra={"request_id": "abc"})
    text.info("two", extra={"request_id": "abc"})
    entry = json.loads(json_out.getvalue())
    assert entry["role"] == "JSON-UNIT" and entry["message"] == "one 1"
    assert entry["request_id"] == "abc"
    assert TEXT_LINE.match(text_out.getvalue())
    assert text_out.getvalue().endswith(":text-unit: two\n")
    files = set_logger("json-unit", str(tmp_path), "unit", log_format="json")
    files.error("to both files")
    for suffix in (".log", ".err"):
        [line] = (tmp_path / f"unit{suffix}").read_text().splitlines()
        assert json.loads(line)["message"] == "to both files"


def test_route_other_logs_sends_libraries_warnings_and_thread_errors(unit_loggers):
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), threading.excepthook)
    kept = logging.NullHandler()
    root.addHandler(kept)
    try:
        with contextlib.redirect_stderr(out):
            plain = logging.StreamHandler(sys.stderr)  # as logging.basicConfig() makes
            root.addHandler(plain)
            logger = set_logger("json-unit", log_format="json")
            route_other_logs(logger)
            assert plain not in root.handlers and kept in root.handlers
            logging.getLogger("a_library").warning("from a library")
            logging.getLogger("a_library").info("below the root's level")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("careful", UserWarning, stacklevel=1)
            thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
            thread.start()
            thread.join(10)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        threading.excepthook = saved[1]
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e.get("logger"), e["level"]) for e in entries] == [
        ("a_library", "WARNING"), ("py.warnings", "WARNING"), (None, "ERROR")]
    assert entries[0]["message"] == "from a library"
    assert all(e["role"] == "JSON-UNIT" for e in entries)
    assert "UserWarning: careful" in entries[1]["message"]
    assert entries[2]["message"] == "exception in thread doomed: division by zero"
    assert entries[2]["exception"]["type"] == "ZeroDivisionError"


def test_set_logger_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="log_format must be one of text, json, got 'xml'"):
        set_logger("json-unit", log_format="xml")


def test_log_format_from_yaml_or_env_is_checked(tmp_path: Path):
    config, _ = load_config(["w.W", "-log_format", "json"], environ={})
    assert config.log_format == "json"
    assert load_config(["w.W"], environ={"WKR_LOG_FORMAT": "json"})[0].log_format == "json"
    with pytest.raises(ConfigError, match="-log_format must be one of text, json"):
        load_config(["w.W"], environ={"WKR_LOG_FORMAT": "xml"})
    path = tmp_path / "c.yml"
    path.write_text("log_format: yaml\n")
    with pytest.raises(ConfigError, match="got 'yaml'"):
        load_config(["w.W", "-config", str(path)], environ={})
    with pytest.raises(SystemExit):  # argparse's choices
        load_config(["w.W", "-log_format", "xml"], environ={})
