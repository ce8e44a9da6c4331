"""Logging setup: stderr by default; with ``log_dir``, ``<name>.log`` and ``<name>.err``.

Every role process of the server and every process of the decentralized pool calls
:func:`set_logger` after it starts. It lives in the client package because the pool
runs where only the client is installed; colour (termcolor) is used when present.
Files are opened in append mode and each record is one write, so the processes of one
service can share them.

Logging never stops a process: a log file that cannot be opened (or later written)
sends its records to stderr, with one warning line naming the file and the error, and
is tried again every :data:`REOPEN_RETRY_S`. The files follow rotation: when the file at
the path is no longer the one open (logrotate renamed it), it is opened again.

Lines are text (``[time]: L:role: message``) or, with ``log_format="json"``, one JSON
object per line for log collectors (:class:`JsonFormatter`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
import traceback
from typing import Any

__all__ = ["DEFAULT_LOG_NAME", "LOG_FORMATS", "FileOrStderrHandler", "JsonFormatter",
           "LogThrottle", "log_base", "route_other_logs", "set_logger"]

#: The base name of a server's log files when no ``log_name`` is given.
DEFAULT_LOG_NAME = "WKRServer"

_FORMAT = "[%(asctime)s.%(msecs)03d]: %(levelname).1s:{context}: %(message)s"
_VERBOSE_FORMAT = ("[%(asctime)s.%(msecs)03d]: %(levelname).1s:{context}:"
                   "[%(filename)s:%(lineno)d]: %(message)s")
_DATEFMT = "%y-%m-%d %H:%M:%S"
#: The values of ``log_format``: text lines (the default) or one JSON object per line.
LOG_FORMATS = ("text", "json")
#: A worker role's name (``worker-2``, ``worker-2.1`` while recycled, ``WORKER-2`` for
#: the model's own logger): the JSON ``worker`` field is its index.
_WORKER_ROLE = re.compile(r"^worker-(\d+)(?:\.\d+)?$", re.IGNORECASE)

#: Seconds between attempts to open a log file again while its records go to stderr
#: (one open() per attempt, only while it fails).
REOPEN_RETRY_S = 10.0

# The log files this process has warned about (a file shared by several loggers of one
# process, as ``.log`` is, gets one warning per failure, not one per logger).
_warned_lock = threading.Lock()
_warned: set[str] = set()
# Set on a record once it is on stderr: a logger whose two files both fail writes an
# error record once, not once per handler.
_ON_STDERR = "_wkr_on_stderr"


def set_logger(context: str, log_dir: str | None = None, log_name: str | None = None,
               verbose: bool = False, color: str | None = None,
               log_format: str = "text") -> logging.Logger:
    """A logger named ``context``, writing info to ``<log_name>.log`` and errors also to
    ``<log_name>.err`` under ``log_dir``, or everything to stderr without one.
    ``log_format`` is ``"text"`` or ``"json"`` (:class:`JsonFormatter`; never coloured)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, "
                         f"got {log_format!r}")
    logger = logging.getLogger(f"wkr_serving.{context}")
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(context, verbose=verbose, own=(logger.name,))
    else:
        label = (_colored(context, color) if color and not log_dir and sys.stderr.isatty()
                 else context)
        formatter = logging.Formatter(
            (_VERBOSE_FORMAT if verbose else _FORMAT).format(context=label), datefmt=_DATEFMT)
    if log_dir:
        with contextlib.suppress(OSError):  # opening the files fails too, and says so
            os.makedirs(log_dir, exist_ok=True)
        base = log_base(log_dir, log_name)
        for path, handler_level in ((base + ".log", level), (base + ".err", logging.ERROR)):
            logger.addHandler(FileOrStderrHandler(path, handler_level, formatter))
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(level)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    return logger


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message or a traceback
    are escaped), for log collectors:

    ``time`` (ISO 8601, UTC, milliseconds: ``2024-05-01T12:00:00.123Z``), ``level``
    (``INFO``...), ``role`` (the process's role: ``SUPERVISOR``, ``VENTILATOR``, ``SINK``,
    ``WORKER-0``, ``HTTP-0``), ``pid``, ``worker`` (the index of a worker role, else
    null) and ``message``; then, when there is one, ``request_id`` (a log call's
    ``extra={"request_id": ...}``), ``exception`` (``type``, ``message`` and
    ``traceback`` of a record logged with ``exc_info``), ``stack`` (``stack_info``),
    ``logger`` (the Python logger's name, for a record of another logger, such as a
    library's, that goes through this role's handlers), and with ``verbose`` the
    ``file`` and ``line`` of the log call."""

    def __init__(self, role: str, verbose: bool = False, own: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.role = role.upper()
        found = _WORKER_ROLE.match(role)
        self.worker = int(found.group(1)) if found else None
        self.verbose = verbose
        self.own = frozenset((*own, "wkr_serving"))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "role": self.role, "pid": record.process,
            "worker": self.worker, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            kind, value, tb = record.exc_info
            entry["exception"] = {
                "type": kind.__name__, "message": str(value),
                "traceback": "".join(traceback.format_exception(kind, value, tb))}
        if record.stack_info:
            entry["stack"] = record.stack_info
        if record.name not in self.own:
            entry["logger"] = record.name
        if self.verbose:
            entry["file"], entry["line"] = record.filename, record.lineno
        return json.dumps(entry, default=str)


def route_other_logs(logger: logging.Logger) -> None:
    """Send what this process logs outside ``logger`` through ``logger``'s handlers, in
    its format: records of loggers with no handler of their own (libraries, uvicorn,
    Flask) reach the root logger, which gets those handlers; Python warnings are logged
    (``py.warnings``); an exception no thread caught is logged as an error with its
    traceback. For a role process in JSON mode, so every line it writes is JSON; the
    root logger's level (WARNING unless changed) still decides what libraries log. A
    root handler writing plain lines to stderr (``logging.basicConfig()`` run by an
    import) is replaced; any other root handler stays."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (type(handler) is logging.StreamHandler
                and handler.stream in (sys.stderr, sys.__stderr__)):
            root.removeHandler(handler)
    for handler in logger.handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    logging.captureWarnings(True)

    def log_thread_exception(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        logger.error("exception in thread %s: %s", name, args.exc_value,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = log_thread_exception


def log_base(log_dir: str, log_name: str | None) -> str:
    """``<log_dir>/<log_name>``, the path of the log files without their suffix
    (``.log``, ``.err``, ``.predictions.jsonl``)."""
    return os.path.join(log_dir, log_name or DEFAULT_LOG_NAME)


class FileOrStderrHandler(logging.handlers.WatchedFileHandler):
    """A log file that follows rotation (a :class:`~logging.handlers.WatchedFileHandler`:
    a stat of the path per record, reopened when logrotate renamed the file) and never
    raises into the code that logs: when the file cannot be opened or written, records
    go to stderr, with one warning line naming the file and the error, until an attempt
    to open it again (every :data:`REOPEN_RETRY_S`) succeeds.

    A process whose log directory turned read-only, or whose disk is full, keeps
    serving; its log lines are on stderr instead of lost."""

    def __init__(self, path: str, level: int, formatter: logging.Formatter) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setLevel(level)
        self.setFormatter(formatter)
        self._failing = False
        self._recovering = False  # opened again after a failure; no record written yet
        self._retry_at = 0.0
        self._open_file()

    def emit(self, record: logging.LogRecord) -> None:
        if self._failing:
            if time.monotonic() < self._retry_at or not self._open_file():
                self._to_stderr(record)
                return
        else:
            try:
                self.reopenIfNeeded()
                if self.stream is None:  # closed (at exit), or a reopen that failed
                    self._open_stream()
            except OSError as exc:
                self._fall_back(exc)
                self._to_stderr(record)
                return
        logging.StreamHandler.emit(self, record)  # a failed write calls handleError
        if self._recovering and not self._failing:  # written: the file works again
            self._recovering = False
            with _warned_lock:
                _warned.discard(self.baseFilename)
            self._note(logging.INFO, "log file %s can be written again: logging there",
                       self.baseFilename)

    def handleError(self, record: logging.LogRecord) -> None:
        """A write that failed (a full disk): stderr from now on. Anything else (a record
        whose message cannot be formatted) is reported as logging does."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self._fall_back(exc)
        self._to_stderr(record)

    def _open_stream(self) -> None:
        self.stream = self._open()
        self._statstream()

    def _open_file(self) -> bool:
        """Open the file; on failure fall back to stderr (or stay there) and say False."""
        try:
            self._open_stream()
        except OSError as exc:
            self._fall_back(exc)
            return False
        if self._failing:  # said once a record is written (a full disk opens, then fails)
            self._failing, self._recovering = False, True
        return True

    def _fall_back(self, exc: OSError) -> None:
        """Close the file and send records to stderr; warn once per file and process."""
        self._failing, self._recovering = True, False
        self._retry_at = time.monotonic() + REOPEN_RETRY_S
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):  # it flushes: fails again on a full disk
                stream.close()
        with _warned_lock:
            if self.baseFilename in _warned:
                return
            _warned.add(self.baseFilename)
        self._note(logging.WARNING, "cannot use log file %s (%s: %s): logging to stderr "
                   "instead", self.baseFilename, type(exc).__name__, exc)

    def _note(self, level: int, message: str, *args: object) -> None:
        """A line of this handler's own, on stderr, formatted as the records are."""
        self._to_stderr(logging.LogRecord(self.name or "wkr_serving", level, __file__, 0,
                                          message, args, None))

    def _to_stderr(self, record: logging.LogRecord) -> None:
        if getattr(record, _ON_STDERR, False):  # the logger's other file wrote it there
            return
        setattr(record, _ON_STDERR, True)
        stream = sys.stderr
        if stream is None:  # no stderr either: nowhere left to write
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # stderr closed or full: the record is lost, the process lives
            pass


def _colored(text: str, color: str) -> str:
    try:
        from termcolor import colored
    except ImportError:  # a client-only install has no termcolor
        return text
    return colored(text, color)


class LogThrottle:
    """Log a recurring kind of event (a rejected message, a gone client) without letting
    a flood of them flood the log: at most ``burst`` lines per ``period`` seconds, then
    one line saying how many more were left out."""

    __slots__ = ("_burst", "_count", "_level", "_logger", "_period", "_start", "_suppressed")

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, burst: int = 10,
                 period: float = 60.0) -> None:
        self._logger = logger
        self._level = level
        self._burst = burst
        self._period = period
        self._start = -period
        self._count = 0
        self._suppressed = 0

    def log(self, message: str, *args: object, now: float | None = None) -> bool:
        """Log ``message % args`` unless over the limit; return whether it was logged."""
        now = time.monotonic() if now is None else now
        if now - self._start >= self._period:
            if self._suppressed:
                self._logger.log(self._level, "... and %d more like it in the last %.0fs",
                                 self._suppressed, self._period)
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count >= self._burst:
            self._suppressed += 1
            return False
        self._count += 1
        self._logger.log(self._level, message, *args)
        return True
