"""Process plumbing shared by the server's supervisor and the pool's central.

- :class:`WakePipe`: a self-pipe that wakes a poll loop. Signal handlers (through
  :func:`signal.set_wakeup_fd`) and other threads write a byte; the loop polls
  :attr:`WakePipe.read_fd` and drains it. Both ends are non-blocking: a full pipe
  already means "wake up", and a drain never blocks.
- :func:`serve_until_signalled`: run such a loop in the foreground.
- :func:`die_with_parent`: a child process that dies with its supervisor.
- :func:`bind_public`: bind a client-facing TCP socket (IPv6 too, port 0: any free one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

import zmq

__all__ = ["EXIT_ORPHANED", "StoppableLoop", "WakePipe", "bind_public", "die_with_parent",
           "serve_until_signalled"]

#: Exit code of a child whose parent was already gone when it started.
EXIT_ORPHANED = 4
_PR_SET_PDEATHSIG = 1


class WakePipe:
    """``wake()`` from anywhere; ``drain()`` in the loop; ``close()`` once (idempotent)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        if self.write_fd < 0:  # closed: the fd number may belong to another file now
            return
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"w")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 512):
                pass

    def close(self) -> None:
        read_fd, write_fd = self.read_fd, self.write_fd
        if read_fd < 0:
            return
        self.read_fd = self.write_fd = -1
        os.close(read_fd)
        os.close(write_fd)


class StoppableLoop:
    """Base of a supervisor loop that signal handlers and other threads ask to stop."""

    stop_reason: str | None

    def __init__(self) -> None:
        self._wake = WakePipe()
        #: Why the loop was asked to stop (the first reason given), or None.
        self.stop_reason = None
        #: SIGHUPs received (a loop that reopens files on SIGHUP compares it).
        self.hangups = 0

    @property
    def wakeup_fd(self) -> int:
        """Give this to :func:`signal.set_wakeup_fd` so signals wake the loop."""
        return self._wake.write_fd

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to stop; safe from signal handlers and other threads."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._wake.wake()


    def request_hangup(self) -> None:
        """Count a SIGHUP and wake the loop; safe from signal handlers."""
        self.hangups += 1
        self._wake.wake()


def serve_until_signalled(loop: Any) -> int:
    """Run ``loop.serve()`` in the main thread with SIGTERM and SIGINT asking it to stop
    (``loop.request_stop(name)``) and SIGHUP counted (``loop.request_hangup()``: log
    files are reopened), woken through ``loop.wakeup_fd``; return its code."""

    def on_signal(signum: int, _frame: object) -> None:
        loop.request_stop(signal.Signals(signum).name)

    signal.set_wakeup_fd(loop.wakeup_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: loop.request_hangup())
    try:
        return int(loop.serve())
    finally:
        signal.set_wakeup_fd(-1)  # the loop closed its pipe


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, even by SIGKILL; exit at
    once (:data:`EXIT_ORPHANED`) if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(EXIT_ORPHANED)


def bind_public(socket: zmq.Socket, host: str, port: int) -> int:
    """Bind a client-facing TCP socket; ``port`` 0 takes any free port. Returns the port."""
    if ":" in host:
        socket.setsockopt(zmq.IPV6, 1)
        host = f"[{host}]" if not host.startswith("[") else host
    address = f"tcp://{host}"
    if port:
        socket.bind(f"{address}:{port}")
        return port
    return socket.bind_to_random_port(address)
