"""Logging setup: stderr by default; with ``log_dir``, ``<name>.log`` and ``<name>.err``.

Every role process of the server and every process of the decentralized pool calls
:func:`set_logger` after it starts. It lives in the client package because the pool
runs where only the client is installed; colour (termcolor) is used when present.
Files are opened in append mode and each record is one write, so the processes of one
service can share them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

__all__ = ["DEFAULT_LOG_NAME", "LogThrottle", "log_base", "set_logger"]

#: The base name of a server's log files when no ``log_name`` is given.
DEFAULT_LOG_NAME = "WKRServer"

_FORMAT = "[%(asctime)s.%(msecs)03d]: %(levelname).1s:{context}: %(message)s"
_VERBOSE_FORMAT = ("[%(asctime)s.%(msecs)03d]: %(levelname).1s:{context}:"
                   "[%(filename)s:%(lineno)d]: %(message)s")
_DATEFMT = "%y-%m-%d %H:%M:%S"


def set_logger(context: str, log_dir: str | None = None, log_name: str | None = None,
               verbose: bool = False, color: str | None = None) -> logging.Logger:
    """A logger named ``context``, writing info to ``<log_name>.log`` and errors also to
    ``<log_name>.err`` under ``log_dir``, or everything to stderr without one."""
    logger = logging.getLogger(f"wkr_serving.{context}")
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    label = _colored(context, color) if color and not log_dir and sys.stderr.isatty() else context
    formatter = logging.Formatter((_VERBOSE_FORMAT if verbose else _FORMAT).format(context=label),
                                  datefmt=_DATEFMT)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        base = log_base(log_dir, log_name)
        targets = [(base + ".log", level), (base + ".err", logging.ERROR)]
        for path, handler_level in targets:
            file_handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            file_handler.setLevel(handler_level)
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(level)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    return logger


def log_base(log_dir: str, log_name: str | None) -> str:
    """``<log_dir>/<log_name>``, the path of the log files without their suffix
    (``.log``, ``.err``, ``.predictions.jsonl``)."""
    return os.path.join(log_dir, log_name or DEFAULT_LOG_NAME)


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
