"""Test helpers: real servers on 127.0.0.1, bounded waits, clean stops."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import zmq
from wkr_serving.client import WKRClient
from wkr_serving.client import protocol as P
from wkr_serving.server import WKRServer
from wkr_serving.server.helper import get_args_parser

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

#: Default call timeout (ms) of test clients: generous, but every call is bounded.
CALL_TIMEOUT_MS = 20_000
#: Seconds a server gets to become ready / to stop.
START_LIMIT_S = 60.0
STOP_LIMIT_S = 30.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], limit: float, what: str,
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a truthy value, at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        pause.wait(interval)


def server_args(model_dir: str, *extra: str):
    """Seed-style args: ``get_args_parser().parse_args([...])`` on loopback, any ports."""
    return get_args_parser().parse_args(
        ["-port", "0", "-port_out", "0", "-bind", "127.0.0.1", "-model_dir", str(model_dir),
         "-graceful_timeout", "10", "-startup_timeout", "60", *extra])


@contextlib.contextmanager
def running_server(args: Any, worker: type) -> Iterator[WKRServer]:
    """Start a WKRServer, yield it once ready, and always stop it (bounded)."""
    server = WKRServer(args, worker)
    server.start()
    try:
        server.wait_ready(START_LIMIT_S)
        yield server
    finally:
        server.close(STOP_LIMIT_S)
        assert not server.is_alive(), "WKRServer thread did not stop in time"


def connect(server: Any, **kwargs: Any) -> WKRClient:
    """A client of ``server`` (a WKRServer), with bounded call and connect timeouts."""
    kwargs.setdefault("protocol", server.config.protocol)
    kwargs.setdefault("timeout", CALL_TIMEOUT_MS)
    kwargs.setdefault("connect_timeout", 10_000)
    return WKRClient("127.0.0.1", server.port, server.port_out, **kwargs)


def wait_idle(client: WKRClient, limit: float = 20.0) -> dict[str, Any]:
    """Wait until the server has nothing queued or in flight; return that status."""
    last: dict[str, Any] = {}

    def idle():
        status = client.server_status
        last.update(status)
        return status if status["queue_items"] == 0 and status["in_flight_items"] == 0 else None

    try:
        return wait_until(idle, limit, "the server to become idle", interval=0.02)
    except AssertionError as exc:
        summary = {k: last.get(k) for k in ("queue_items", "in_flight_items", "busy_workers",
                                            "workers", "ready")}
        raise AssertionError(f"{exc}; last status: {summary}") from None


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie left to a non-reaping init counts)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


RAW_LIMIT_MS = 10_000


class RawClient:
    """A bare DEALER pair speaking the wire protocol, for frames the client never sends."""

    def __init__(self, server, identity: bytes):
        self.context = zmq.Context()
        self.to_vent = self._socket(identity, server.port)
        self.from_sink = self._socket(identity, server.port_out)
        self.from_sink.send(P.pack([P.PROTOCOL_VERSION, P.HELLO, 0]))
        _, _, req_id, hello = self.recv()
        assert req_id == 0 and hello["protocol"] == server.config.protocol

    def _socket(self, identity, port):
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, identity)
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    def send(self, frames):
        assert self.to_vent.poll(RAW_LIMIT_MS, zmq.POLLOUT)
        self.to_vent.send_multipart(frames, zmq.NOBLOCK)

    def recv_frames(self):
        assert self.from_sink.poll(RAW_LIMIT_MS), "no reply from the server"
        return self.from_sink.recv_multipart(zmq.NOBLOCK)

    def recv(self):
        return P.unpack_header(self.recv_frames()[0])

    def close(self):
        self.to_vent.close(0)
        self.from_sink.close(0)
        self.context.term()
