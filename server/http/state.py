"""The bridge's state directory: the one place its processes share files.

The supervisor makes the directory before it starts the first bridge process and
removes it when the server stops, so that it outlives a bridge process that dies and is
restarted: the job store (``jobs.sqlite3``), the HTTP metrics of every process
(``metrics/``) and what the first request showed (``seen.json``) survive it. Each
bridge process finds the directory in :data:`STATE_DIR_ENV`.

An application served on its own (tests, an embedding) has no such variable: it gets a
private directory, removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

import psutil

from ..scratch import HTTP_KIND, make_private_dir

__all__ = ["PROCESSES_ENV", "STATE_DIR_ENV", "create", "gone", "process_key", "processes",
           "remove", "shared", "state_dir", "this_process"]

#: Environment variable naming the directory the bridge's processes share.
STATE_DIR_ENV = "WKR_HTTP_STATE_DIR"
#: Environment variable with the number of the bridge's processes.
PROCESSES_ENV = "WKR_HTTP_PROCESSES"

_lock = threading.Lock()
_private: str | None = None


def create() -> str:
    """A new state directory (mode 0700) for a bridge about to start, named
    ``wkr-http-<pid>-<hex>`` like the server's other directories, so that the next
    server removes it if this one is killed (:func:`..scratch.remove_stale`)."""
    return make_private_dir(HTTP_KIND, tempfile.gettempdir())


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def shared() -> bool:
    """Whether this process is one of a bridge's (the directory is the bridge's)."""
    return bool(os.environ.get(STATE_DIR_ENV))


def processes() -> int:
    """How many processes the bridge runs (``-http_workers``; 1 outside a bridge)."""
    try:
        return max(1, int(os.environ.get(PROCESSES_ENV, "1")))
    except ValueError:
        return 1


def state_dir() -> str:
    """The directory this process shares with the bridge's other processes, or its own."""
    global _private
    given = os.environ.get(STATE_DIR_ENV)
    if given:
        os.makedirs(given, mode=0o700, exist_ok=True)
        return given
    with _lock:
        if _private is None:
            _private = make_private_dir(HTTP_KIND, tempfile.gettempdir())
            atexit.register(shutil.rmtree, _private, True)
        return _private


def process_key(pid: int) -> str | None:
    """``<pid>-<start time>``: a name no other process will have, or None if gone."""
    try:
        return f"{pid}-{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


_this: tuple[int, str] = (0, "")


def this_process() -> str:
    """This process's ``<pid>-<start time>`` (cached; a fork gets its own)."""
    global _this
    if _this[0] != os.getpid():
        _this = (os.getpid(), process_key(os.getpid()) or str(os.getpid()))
    return _this[1]


def gone(owner: str) -> bool:
    """Whether the process named ``owner`` (``<pid>-<start time>``) has exited; a new
    process that got the same pid does not count as the owner."""
    if owner == this_process():
        return False
    pid = owner.partition("-")[0]
    return not pid.isdigit() or process_key(int(pid)) != owner
