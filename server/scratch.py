"""What one server instance makes outside ``-model_dir``, and how it is cleaned up.

A server needs internal sockets and a scratch folder for its workers. It must not write
into ``-model_dir`` (it may be read-only or shared), and nothing it makes may outlive it
for good:

- Sockets: on Linux, abstract names (:meth:`Endpoints.abstract`), which leave no file
  whatever way the server ends. Elsewhere, socket files in a directory
  ``wkr-ipc-<pid>-<hex>`` of the system temp dir.
- Scratch: a directory ``wkr-scratch-<pid>-<hex>`` of the system temp dir, holding the
  ``-tmp_folder`` the workers get as ``tmp_dir`` (unless ``-tmp_folder`` is an absolute
  path: that one is the user's, used as is and never removed).

The server removes its directories when it stops. One killed by SIGKILL (``stopf``, the
OOM killer) cannot: the next server started by the same user removes every directory of
exactly these names whose pid runs no process any more.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass

import psutil

from .config import ConfigError, ServerConfig
from .process import ABSTRACT_IPC, BootError, Endpoints

__all__ = ["HTTP_KIND", "IPC_KIND", "SCRATCH_KIND", "ServerDirs", "make_private_dir",
           "prepare_worker_dirs", "remove_stale"]

#: Directory kinds: the second word of a directory name ``wkr-<kind>-<pid>-<hex>``.
IPC_KIND = "ipc"
SCRATCH_KIND = "scratch"
HTTP_KIND = "http"  # the HTTP bridge's state directory (server/http/state.py)
#: Random bytes in a directory name (written as twice as many hex digits).
NAME_RANDOM_BYTES = 4
#: Exactly the names :func:`make_private_dir` gives; nothing else is ever removed.
OWN_NAME = re.compile(rf"wkr-(?:{IPC_KIND}|{SCRATCH_KIND}|{HTTP_KIND})-([1-9][0-9]*)-"
                      rf"[0-9a-f]{{{2 * NAME_RANDOM_BYTES}}}")
#: Attempts at a directory name not taken yet (a clash needs equal random bytes).
MAKE_TRIES = 100


def make_private_dir(kind: str, parent: str) -> str:
    """Make a new directory ``<parent>/wkr-<kind>-<pid>-<hex>`` of mode 0700; its path."""
    for _ in range(MAKE_TRIES):
        name = f"wkr-{kind}-{os.getpid()}-{secrets.token_hex(NAME_RANDOM_BYTES)}"
        path = os.path.join(parent, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free wkr-{kind}-{os.getpid()}-* name in {parent}")


def remove_stale(parent: str | None = None) -> list[str]:
    """Remove from ``parent`` (the system temp dir) the directories that dead servers of
    this user left; return their paths.

    Only entries named exactly as :func:`make_private_dir` names them, that are real
    directories (not links) owned by this user, and whose pid runs no process (or a
    zombie). A pid reused by another process keeps its directory until that one ends too.
    """
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:  # no temp dir to clean: nothing was left there either
        return removed
    for entry in entries:
        match = OWN_NAME.fullmatch(entry.name)
        if match is not None and _left_by_dead_server(entry, int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _left_by_dead_server(entry: os.DirEntry[str], pid: int) -> bool:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:  # removed meanwhile (by another server starting)
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return False
    return pid != os.getpid() and not _running(pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that could still use its directory (a zombie, dead
    but not yet reaped by its parent, cannot)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # it exists, but cannot be looked at
        return True


@dataclass(frozen=True)
class ServerDirs:
    """The endpoints and directories of one server instance (made by its supervisor)."""

    endpoints: Endpoints
    #: The server's config, with ``-tmp_folder`` made the absolute path of the workers'
    #: scratch folder (so ``config.tmp_dir`` is that folder in every role).
    config: ServerConfig
    #: Directories this server made, removed when it stops.
    owned: tuple[str, ...]

    @classmethod
    def create(cls, config: ServerConfig) -> ServerDirs:
        """Remove what dead servers left, then make this server's endpoints and scratch
        folder (before any role starts)."""
        parent = tempfile.gettempdir()
        remove_stale(parent)
        owned: list[str] = []
        try:
            if ABSTRACT_IPC:
                endpoints = Endpoints.abstract()
            else:
                owned.append(make_private_dir(IPC_KIND, parent))
                endpoints = Endpoints.in_dir(owned[-1])
            scratch = config.tmp_folder
            if not os.path.isabs(scratch):
                owned.append(make_private_dir(SCRATCH_KIND, parent))
                scratch = os.path.join(owned[-1], os.path.normpath(scratch))
                os.makedirs(scratch, exist_ok=True)
        except BaseException:
            _remove(owned)
            raise
        return cls(endpoints, config.replace(tmp_folder=scratch), tuple(owned))

    def remove(self) -> None:
        """Remove the directories this server made (at stop, once its roles are gone)."""
        _remove(self.owned)


def _remove(paths: list[str] | tuple[str, ...]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def prepare_worker_dirs(config: ServerConfig) -> None:
    """Run by a worker before the user's hooks: ``-model_dir`` must be a directory (else
    a :class:`BootError`, one line naming the flag and the path), and the scratch folder
    must exist (made again if a temp cleaner removed it; an absolute ``-tmp_folder`` is
    made here the first time)."""
    try:
        config.check_model_dir()
    except ConfigError as exc:
        raise BootError(str(exc)) from None
    try:
        os.makedirs(config.tmp_dir, exist_ok=True)
    except OSError as exc:
        raise BootError(f"-tmp_folder {config.tmp_dir}: cannot make it: "
                        f"{exc.strerror or exc}") from None
