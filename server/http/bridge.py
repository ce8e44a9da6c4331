"""The HTTP bridge process: an event-driven HTTP server (uvicorn, on uvloop) in front of
the server's ZeroMQ ports.

The supervisor starts ``-http_workers`` of these processes (``http-0``, ``http-1``...)
once the ventilator and the sink are up (they need their ports) and before the workers
are ready, so that ``/health/ready`` can say "not yet" while models load. ``http-0``
binds the port (``-http_port 0`` reports the one it got); the others bind the same port
with ``SO_REUSEPORT`` and the kernel shares out new connections. Each is a role of its
own: one that dies is restarted alone by the supervisor while the others, and the
ZeroMQ ports, keep serving.

No Python thread is held by a connection. The connection's bytes are read by the event
loop; :class:`GuardedProtocol` bounds what a client can hold:

- request headers must be complete within ``-http_read_timeout`` of the request's first
  byte (of the connection, for a new one), and be at most :data:`MAX_HEADER_BYTES`;
- a body must not stall for more than ``-http_read_timeout`` between two parts (its
  size is bounded by the front, :mod:`.front`);
- an idle keep-alive connection is closed after ``-http_keepalive``;
- beyond ``-http_max_connections`` open connections a new one gets 503 and is closed.

When the supervisor says stop, the server stops accepting, lets requests in flight finish
(:data:`STOP_WAIT_S` at most) and the process exits. Group signals (Ctrl-C, a SIGTERM to
the whole tree) are the supervisor's to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import threading
from collections.abc import Iterator
from typing import Any

from ..config import ServerConfig
from ..process import BootError, Endpoints, Role
from . import jsonio
from .state import PROCESSES_ENV, STATE_DIR_ENV

__all__ = ["HTTPBridge"]

#: Seconds requests in flight get to finish when the bridge stops.
STOP_WAIT_S = 2
#: Pending connections the kernel queues on the listening socket.
BACKLOG = 4096
#: Largest request line plus headers, in bytes; more gets 431.
MAX_HEADER_BYTES = 64 * 1024
#: File descriptors the process asks for (its soft limit is raised up to its hard one),
#: beyond the connections it may hold.
SPARE_FDS = 256


class HTTPBridge(Role):
    name = "http"
    color = "yellow"

    def __init__(self, config: ServerConfig, endpoints: Endpoints, port: int, port_out: int,
                 worker_class: str, index: int = 0, state_dir: str | None = None) -> None:
        super().__init__(config, endpoints)
        self.port = port
        self.port_out = port_out
        self.worker_class = worker_class
        self.index = index
        self.state_dir = state_dir

    @property
    def identity(self) -> str:
        return f"http-{self.index}"

    def boot(self) -> dict[str, Any]:
        import uvicorn  # noqa: F401  (fail here, at boot, if it is missing)

        _raise_fd_limit(self.config.http_max_connections + SPARE_FDS)
        bind = self.config.bind.strip("[]")
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.http_workers > 1:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        port = self.config.http_port or 0
        try:
            self.listener.bind((bind, port))
        except OSError as exc:
            self.listener.close()
            why = ("is already in use" if exc.errno == errno.EADDRINUSE
                   else f"cannot be bound: {exc.strerror or exc}")
            raise BootError(f"HTTP port {port} on {bind} (-http_port {port}) {why}") from None
        self.listener.listen(BACKLOG)
        http_port = self.listener.getsockname()[1]
        self.logger.info("HTTP bridge %d on %s:%d (%d connection(s) at most, %d call(s) in "
                         "flight to the server)", self.index, self.config.bind, http_port,
                         self.config.http_max_connections, self.config.http_max_connect)
        return {"http_port": http_port}

    def serve(self) -> None:
        if self.state_dir:
            os.environ[STATE_DIR_ENV] = self.state_dir
            os.environ[PROCESSES_ENV] = str(self.config.http_workers)
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:  # not on this platform: the standard loop
            runner = asyncio.run
        runner(self._serve())

    async def _serve(self) -> None:
        import uvicorn

        from .app import Backend, all_blueprints, create_app
        from .front import Front

        config = self.config
        host = "127.0.0.1" if config.bind in ("0.0.0.0", "::", "*") else config.bind
        backend = Backend(config, self.port, self.port_out, host, self.worker_class,
                          client_options=self._client_options())
        loop = asyncio.get_running_loop()
        backend.attach(loop)
        front = Front(backend, create_app(backend, blueprints=all_blueprints()), config)
        server = _server_class()(uvicorn.Config(
            front, http=guarded_protocol(config), lifespan="off", log_config=None,
            access_log=False, server_header=False, date_header=False,
            timeout_keep_alive=max(1, round(config.http_keepalive)),
            timeout_graceful_shutdown=STOP_WAIT_S, backlog=BACKLOG,
            log_level="debug" if config.verbose else "warning"))
        watcher = threading.Thread(target=self._watch_control, args=(loop, server),
                                   name="control", daemon=True)
        watcher.start()
        try:
            await server.serve(sockets=[self.listener])
        finally:
            front.wsgi.executor.shutdown(wait=False, cancel_futures=True)
            await backend.aclose()

    def _watch_control(self, loop: asyncio.AbstractEventLoop, server: Any) -> None:
        """Turn the supervisor's stop into the server's graceful stop."""
        while True:
            name, _ = self.read_control()
            if name == "stop":
                loop.call_soon_threadsafe(setattr, server, "should_exit", True)
                return

    def _client_options(self) -> dict[str, Any]:
        if not self.config.curve_secret_key:
            return {}
        from wkr_serving.client.keys import load_key_pair

        public, _ = load_key_pair(self.config.curve_secret_key)
        return {"server_public_key": public}


def _raise_fd_limit(wanted: int) -> None:
    """Raise this process's open-file soft limit towards ``wanted`` (up to the hard one),
    so that the connection cap, not the limit, is what refuses connections."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _server_class() -> type:
    """uvicorn's server class, without its signal handlers."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # The roles ignore group signals: the supervisor says when to stop.
            yield

    return Server


def error_bytes(status: int, reason: bytes, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer with the JSON envelope, closing the connection."""
    body = jsonio.dumps({"error_code": status, "error_type": code, "error_message": message,
                         "data": None})
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, reason),
                     b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])


class CoalescingTransport:
    """A transport that sends what was written in one turn of the event loop as one
    write: uvicorn writes a response's headers and its body separately, which cost two
    system calls and two TCP segments per answer (a third of the bridge's CPU time)."""

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(data)

    def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(config: ServerConfig) -> type:
    """uvicorn's httptools protocol with the bridge's read timeouts, header size limit
    and connection cap (see the module docstring)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    read_timeout = config.http_read_timeout
    max_connections = config.http_max_connections
    too_many = error_bytes(503, b"Service Unavailable", "too_many_connections",
                           f"this bridge process holds {max_connections} connections "
                           "(-http_max_connections): retry later")
    too_slow = error_bytes(408, b"Request Timeout", "request_timeout",
                           f"the request was not sent within -http_read_timeout "
                           f"{read_timeout:g} s")
    too_big = error_bytes(431, b"Request Header Fields Too Large", "headers_too_large",
                          f"the request line and headers are over {MAX_HEADER_BYTES} bytes")
    bad = error_bytes(400, b"Bad Request", "bad_request", "this is not a valid HTTP/1.1 "
                      "request")

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _in_headers = False
        _in_body = False
        _header_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
            if len(self.connections) > max_connections:
                transport.write(too_many)
                transport.close()
                return
            self._in_headers = True  # a new connection: its first request must come
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_body:
                self._arm()  # the body moves: a new gap starts
            else:
                if not self._in_headers:
                    self._header_bytes = 0  # a new request on a kept-alive connection
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > MAX_HEADER_BYTES \
                    and not self.transport.is_closing():
                self.transport.write(too_big)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:
                self._in_headers = True
                self._arm()  # the headers' deadline runs from the request's first byte

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._in_body = True
            self._arm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            self._header_bytes = 0
            self._disarm()  # the request is read: the application's time is its own
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            if not self.transport.is_closing():
                self.transport.write(bad)
                self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._in_headers and self._header_bytes and not self._in_body:
                self.transport.write(too_slow)
            self.transport.close()

    return GuardedProtocol
