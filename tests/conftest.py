"""Shared fixtures: session-wide servers (tests using them do not interfere) and clients."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Worker classes live in tests/workers.py: the server's roles are started with spawn and
# re-import them by name, so tests/ must be on sys.path (spawned children inherit it).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers import CLIServer, connect, running_server, server_args  # noqa: E402
from wkr_serving.client import WKRClient  # noqa: E402
from wkr_serving.server import WKRServer  # noqa: E402
from workers import ControlledWorker, EchoWorker  # noqa: E402


@pytest.fixture(scope="session")
def obj_server(tmp_path_factory) -> Iterator[WKRServer]:
    """ControlledWorker, protocol obj, 2 CPU workers, batch_size 4."""
    args = server_args(tmp_path_factory.mktemp("obj_model"), "-protocol", "obj",
                       "-num_worker", "2", "-batch_size", "4", "-cpu")
    with running_server(args, ControlledWorker) as server:
        yield server


@pytest.fixture(scope="session")
def numpy_server(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol numpy, 1 worker, batch_size 4."""
    args = server_args(tmp_path_factory.mktemp("numpy_model"), "-protocol", "numpy",
                       "-num_worker", "1", "-batch_size", "4", "-cpu")
    with running_server(args, EchoWorker) as server:
        yield server


@pytest.fixture
def cli_server(tmp_path) -> Iterator[Callable[..., CLIServer]]:
    """Start ``wkr-serving-start`` subprocesses: ``cli_server(args, cwd=..., env=...)``
    returns a :class:`helpers.CLIServer`; every one still running is stopped after the
    test (SIGTERM, then SIGKILL)."""
    started: list[CLIServer] = []

    def start(args: list[str], **kwargs: Any) -> CLIServer:
        server = CLIServer(args, tmp_path, name=f"server{len(started)}", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def client_factory() -> Iterator[Callable[..., WKRClient]]:
    """Make clients of a server; every one is closed after the test."""
    made: list[WKRClient] = []

    def make(server: Any, **kwargs: Any) -> WKRClient:
        client = connect(server, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def obj_client(obj_server, client_factory) -> WKRClient:
    return client_factory(obj_server)


@pytest.fixture
def numpy_client(numpy_server, client_factory) -> WKRClient:
    return client_factory(numpy_server)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port with its own directory (append-only
    file on); stopped by pid after the test. ``redis_server.restart()`` for fault tests."""
    from redis_server import RedisServer, redis_server_path

    assert redis_server_path() is not None, \
        "redis-server is not installed (scripts/test.sh installs it with apt-get)"
    server = RedisServer(tmp_path / "redis", appendonly=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pools(tmp_path):
    """Start ``wkr-decentral-start`` subprocesses: ``pools(unit, *args, **kwargs)`` returns
    a :class:`poolhelp.CLIPool`; every one still running is stopped after the test."""
    from poolhelp import CLIPool

    started: list[CLIPool] = []

    def start(unit: str, *args: str, **kwargs: Any) -> CLIPool:
        pool = CLIPool(unit, list(args), tmp_path, name=f"pool{len(started)}", **kwargs)
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.close()


#: Debian's Chromium (scripts/test.sh installs it), driven by Playwright: no browser download.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (the dashboard tests)."""
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is missing: bash scripts/test.sh"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()
