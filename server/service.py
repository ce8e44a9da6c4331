"""``WKRServer``: run a whole server from Python, in a background thread of the caller.

    with WKRServer(args, Worker) as server:      # returns once every worker is ready
        client = WKRClient(port=server.port, port_out=server.port_out)
        ...
                                                 # leaving the block drains and stops it

The seed's ``server.start(); server.join()`` style works too.
"""

from __future__ import annotations

import threading
from typing import Any

from .config import ServerConfig, config_from_args
from .supervisor import StartupError, Supervisor
from .worker import WKRHardWorker

__all__ = ["WKRServer"]


class WKRServer(threading.Thread):
    """A server whose supervisor loop runs in this thread; roles run in child processes."""

    def __init__(self, args: Any, hardprocesser: type[WKRHardWorker] = WKRHardWorker) -> None:
        super().__init__(name="WKRServer", daemon=True)
        if not (isinstance(hardprocesser, type) and issubclass(hardprocesser, WKRHardWorker)):
            raise TypeError("hardprocesser must be a subclass of WKRHardWorker")
        self.config: ServerConfig = config_from_args(args)
        self.supervisor = Supervisor(self.config, hardprocesser)
        self.is_ready = threading.Event()
        self._settled = threading.Event()  # ready, or the supervisor loop ended
        self.exit_code: int | None = None

    @property
    def port(self) -> int | None:
        """The port clients send to (the bound one when ``-port 0`` was given)."""
        return self.supervisor.port

    @property
    def port_out(self) -> int | None:
        return self.supervisor.port_out

    @property
    def http_port(self) -> int | None:
        """The HTTP bridge's port (None without ``-http_port``)."""
        return self.supervisor.http_port

    def run(self) -> None:
        try:
            self.exit_code = self.supervisor.serve(on_ready=self._on_ready)
        finally:
            self._settled.set()

    def _on_ready(self) -> None:
        self.is_ready.set()
        self._settled.set()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker is ready; raise :class:`StartupError` if start failed."""
        limit = timeout if timeout is not None else self.config.startup_timeout + 30
        if not self._settled.wait(limit):
            self.close()
            raise StartupError(f"server not ready within {limit:.0f}s")
        if not self.is_ready.is_set():
            raise StartupError(self.supervisor.failure or "server stopped before it was ready")

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight work, stop every role and wait for the thread to end."""
        self.supervisor.request_stop("close()")
        if self.is_alive():
            self.join(timeout)
        elif self.ident is None:  # never started: nothing else will release the pipe
            self.supervisor.close_wake_pipe()

    def __enter__(self) -> WKRServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
