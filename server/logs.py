"""Logging setup: stderr by default; with ``log_dir``, ``<name>.log`` and ``<name>.err``.

Every role process calls :func:`set_logger` after it starts. Files are opened in append
mode and each record is one write, so the roles of one server can share them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from termcolor import colored

__all__ = ["set_logger"]

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
    label = colored(context, color) if color and not log_dir and sys.stderr.isatty() else context
    formatter = logging.Formatter((_VERBOSE_FORMAT if verbose else _FORMAT).format(context=label),
                                  datefmt=_DATEFMT)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        base = os.path.join(log_dir, log_name or "WKRServer")
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
