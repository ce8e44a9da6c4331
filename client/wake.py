"""A self-pipe that wakes a supervisor's poll loop (the server's and the pool's).

Signal handlers (through :func:`signal.set_wakeup_fd`) and other threads write a byte;
the loop polls :attr:`WakePipe.read_fd` and drains it. Both ends are non-blocking: a
full pipe already means "wake up", and a drain never blocks.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

__all__ = ["WakePipe", "serve_until_signalled"]


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


def serve_until_signalled(loop: Any) -> int:
    """Run ``loop.serve()`` in the main thread with SIGTERM and SIGINT asking it to stop
    (``loop.request_stop(name)``), woken through ``loop.wakeup_fd``; return its code."""

    def on_signal(signum: int, _frame: object) -> None:
        loop.request_stop(signal.Signals(signum).name)

    signal.set_wakeup_fd(loop.wakeup_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        return int(loop.serve())
    finally:
        signal.set_wakeup_fd(-1)  # the loop closed its pipe
