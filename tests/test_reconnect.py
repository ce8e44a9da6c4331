"""One client object outlives a server restart on the same ports (issue 10, findings 5
and 9, client half), for :class:`WKRClient` and :class:`AsyncWKRClient` alike.

- A dropped connection fails the calls outstanding at that moment with ``ConnectionLost``
  at once, and only those: a drop from before a restart never fails a call sent to the
  new server, however long that call waits (finding 5).
- After its ``port_out`` connection dropped, a client says HELLO to the sink again before
  its next request: a reply the sink sends before the client has reconnected is lost.

Real servers and real sockets only; the one stand-in is :class:`Relay`, a TCP relay in
front of the sink's port that drops and holds connections as a crashed and restarting
sink does, while the server behind it keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    START_LIMIT_S,
    STOP_LIMIT_S,
    TESTS_DIR,
    Gate,
    gone,
    port_refused,
    running_server,
    server_args,
    start_command,
    wait_until,
)
from wkr_serving.client import AsyncWKRClient, ConnectionLost, ConnectTimeout, WKRClient
from wkr_serving.client.client import READ_SLICE_MS
from workers import ControlledWorker

#: Call timeout (ms) of the clients under test: every "at once" below is far below it.
CALL_TIMEOUT_MS = 30_000
#: Timeout (ms) of the quick calls: a lost reply fails them well within a step.
QUICK_MS = 10_000
#: Seconds within which a dropped connection must have failed an outstanding call.
LOST_LIMIT_S = 5.0
#: Longest any single step of a test may take (seconds).
STEP_LIMIT_S = 60.0
#: Seconds a blocked call is kept waiting: several read slices of the sync client, the
#: moment it used to look at stale disconnect events.
OUTLAST_S = 3 * READ_SLICE_MS / 1000.0
#: Seconds the tests watch that a request is not computed while the sink cannot reach
#: the client (the old client sent it at once and the reply was dropped within
#: milliseconds).
WATCH_S = 1.0


# -- ports a server is started on twice -----------------------------------------------


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port of the kernel's ephemeral range (Linux; ``default`` elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def fixed_ports() -> tuple[int, int]:
    """Two free ports for a server that is started again on the same numbers. They are
    taken below the kernel's ephemeral range, which every ``-port 0`` server and every
    outgoing connection on the machine draws from: from there, another process (tests
    run in parallel) could take a number in the moment between the two servers."""
    low = _ephemeral_low()
    choices = range(max(1024, low - 10_000), low)
    for _ in range(100):  # bounded: nearly every port there is free
        port, port_out = random.sample(choices, 2)
        if _bindable(port) and _bindable(port_out):
            return port, port_out
    raise AssertionError(f"no two free ports in {choices}")


def ports_closed(*ports: int) -> bool:
    """Whether nothing listens on any of ``ports`` any more."""
    return all(port_refused(p) for p in ports)


# -- the clients under test, driven the same way --------------------------------------


class SyncCaller:
    """A :class:`WKRClient`; a pending call runs in a thread of its own."""

    def __init__(self, port: int, port_out: int) -> None:
        self.client = WKRClient("127.0.0.1", port, port_out, timeout=CALL_TIMEOUT_MS,
                                connect_timeout=10_000)
        self._pool = ThreadPoolExecutor(2)

    def call(self, data: Any) -> Any:
        return self.client.encode(data, timeout=QUICK_MS)

    def begin(self, data: Any) -> Future[Any]:
        return self._pool.submit(self.client.encode, data)

    def during(self, wait: Callable[[], Any]) -> Any:
        """Run a blocking wait of the test while pending calls go on."""
        return wait()

    def finish(self, pending: Future[Any], limit: float = STEP_LIMIT_S) -> Any:
        return pending.result(limit)

    def close(self) -> None:
        self.client.close()
        self._pool.shutdown(wait=True)


class AsyncCaller:
    """An :class:`AsyncWKRClient` on a loop of its own that runs only while a step runs
    (between steps it is idle, as in a script calling ``run_until_complete`` step by
    step); ``during`` keeps it running, as the HTTP bridge's loop always is."""

    def __init__(self, port: int, port_out: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncWKRClient("127.0.0.1", port, port_out, timeout=CALL_TIMEOUT_MS,
                                     connect_timeout=10_000)
        self._run(self.client.connect())

    def _run(self, awaitable: Any, limit: float = STEP_LIMIT_S) -> Any:
        # As run_until_complete(client.encode(x)) does, the call's task starts before the
        # loop looks at its sockets (and at what happened while it was idle).
        task = asyncio.ensure_future(awaitable, loop=self.loop)
        return self.loop.run_until_complete(asyncio.wait_for(task, limit))

    def call(self, data: Any) -> Any:
        return self._run(self.client.encode(data, timeout=QUICK_MS))

    def begin(self, data: Any) -> asyncio.Task[Any]:
        return self.loop.create_task(self.client.encode(data))

    def during(self, wait: Callable[[], Any]) -> Any:
        return self._run(self.loop.run_in_executor(None, wait))

    def finish(self, pending: asyncio.Task[Any], limit: float = STEP_LIMIT_S) -> Any:
        return self._run(pending, limit)

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


CALLERS = {"WKRClient": SyncCaller, "AsyncWKRClient": AsyncCaller}


@contextlib.contextmanager
def caller_of(kind: str, port: int, port_out: int) -> Iterator[Any]:
    caller = CALLERS[kind](port, port_out)
    try:
        yield caller
    finally:
        caller.close()


def long_call(caller: Any, gate: Gate, value: str) -> Any:
    """A call that waits several read slices for its result (the model holds it until
    the test opens ``gate``); returns its result."""
    pending = caller.begin(gate.item(value))
    try:
        caller.during(gate.wait_started)
        started = time.monotonic()
        caller.during(lambda: wait_until(lambda: time.monotonic() - started >= OUTLAST_S,
                                         STEP_LIMIT_S, "the call to outlast a read slice"))
    finally:
        gate.open()
    return caller.finish(pending)


# -- a server stopped, then started again on the same ports ---------------------------


@pytest.mark.parametrize("kind", sorted(CALLERS))
def test_calls_after_a_restart_on_the_same_ports_succeed(tmp_path, kind):
    """Stop the server, start a new one on the same port numbers: the same client's next
    calls succeed, a quick one and one waiting longer than a read slice (the drop the
    stop caused used to fail it with ConnectionLost although the server computed it)."""
    port, port_out = fixed_ports()
    flags = ("-num_worker", "1", "-cpu", "-protocol", "obj", "-port", str(port),
             "-port_out", str(port_out))
    for name in ("a", "b"):  # each server its own -model_dir
        (tmp_path / name).mkdir()
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(running_server(server_args(tmp_path / "a", *flags),
                                                   ControlledWorker))
        caller = stack.enter_context(caller_of(kind, port, port_out))
        assert caller.call("before") == "before"
        first.close(STOP_LIMIT_S)
        wait_until(lambda: ports_closed(port, port_out), STOP_LIMIT_S, "the ports to close")
        stack.enter_context(running_server(server_args(tmp_path / "b", *flags),
                                           ControlledWorker))
        assert caller.call("after") == "after"
        result = long_call(caller, Gate(tmp_path, "long"), "slow")
        assert result["value"] == "slow" and result["released"] is True
        assert caller.call("later") == "later"


# -- a server killed while a call waits ---------------------------------------------


class CLIServer:
    """``wkr-serving-start`` on given ports (to start a server again on the same ones);
    its output goes to files in ``directory``."""

    def __init__(self, directory: Path, port: int, port_out: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.port_out = port, port_out
        self.log = directory / "stderr.txt"
        with open(directory / "stdout.txt", "wb") as out, open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [*start_command(), "workers.ControlledWorker", "-num_worker", "1", "-cpu",
                 "-port", str(port), "-port_out", str(port_out), "-bind", "127.0.0.1",
                 "-model_dir", str(directory), "-protocol", "obj"],
                cwd=TESTS_DIR, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        """The server's status once it is ready (bounded wait)."""
        seen: dict[str, Any] = {}

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text(errors='replace')[-4000:]}")
            try:
                with WKRClient("127.0.0.1", self.port, self.port_out, connect_timeout=500,
                               timeout=10_000) as probe:
                    seen.update(probe.server_status)
            except ConnectTimeout:
                return False
            return bool(seen.get("ready"))

        wait_until(ready, START_LIMIT_S, "wkr-serving-start to be ready", 0.05)
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_LIMIT_S)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@pytest.mark.parametrize("kind", sorted(CALLERS))
def test_killed_server_fails_the_waiting_call_at_once_then_the_client_recovers(tmp_path,
                                                                              kind):
    """kill -9 of the server's roles, one after the other (the ventilator while a call
    waits, then the sink): the waiting call fails with ConnectionLost at once, not at its
    30 s timeout; a new server on the same ports then serves the same client object,
    including a call waiting longer than a read slice."""
    port, port_out = fixed_ports()
    first = CLIServer(tmp_path / "first", port, port_out)
    second: CLIServer | None = None
    held = Gate(tmp_path, "held")
    try:
        status = first.status()
        workers = [w["pid"] for w in status["workers"]]
        with caller_of(kind, port, port_out) as caller:
            assert caller.call("before") == "before"
            pending = caller.begin(held.item("held"))
            caller.during(held.wait_started)
            # The supervisor is frozen so that it restarts nothing: the roles die as
            # the test says, the ventilator first and the sink later.
            kill(first.proc.pid, signal.SIGSTOP)
            killed_at = time.monotonic()
            kill(status["ventilator_pid"])
            with pytest.raises(ConnectionLost, match="dropped"):
                caller.finish(pending)
            took = time.monotonic() - killed_at
            assert took < LOST_LIMIT_S, f"ConnectionLost came {took:.2f}s after the kill"
            kill(status["sink_pid"])
            first.close()
            for pid in workers:
                kill(pid)
            wait_until(lambda: all(gone(p) for p in [*workers, status["sink_pid"],
                                                     status["ventilator_pid"]]),
                       STOP_LIMIT_S, "every role of the killed server to exit")
            # A process shows as a zombie while its last threads still exit and hold
            # its sockets: wait for the ports themselves.
            wait_until(lambda: ports_closed(port, port_out), STOP_LIMIT_S,
                       "the killed server's ports to close")

            second = CLIServer(tmp_path / "second", port, port_out)
            second.status()
            assert caller.call("after") == "after"
            result = long_call(caller, Gate(tmp_path, "long"), "slow")
            assert result["value"] == "slow" and result["released"] is True
    finally:
        held.open()
        kill(first.proc.pid, signal.SIGCONT)
        first.close()
        if second is not None:
            second.close()


# -- port_out drops while the server stays up ----------------------------------------


class Relay:
    """A TCP relay from ``port`` to ``127.0.0.1:target``, run by one thread.

    :meth:`cut` closes every relayed connection (the client sees its connection drop, as
    when the sink crashes) and holds the connections made after it, accepted but neither
    read nor relayed (as while a restarted sink is not yet serving); :meth:`resume`
    relays them. Every socket operation is bounded or non-blocking."""

    #: Longest select() of the relay thread (seconds), so that it notices close().
    TICK_S = 0.05

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self._peers: dict[socket.socket, socket.socket] = {}
        self._holding = False
        self._orders: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._order("cut")

    def resume(self) -> None:
        self._order("resume")

    def held_count(self) -> int:
        with self._lock:
            return len(self.held)

    def close(self) -> None:
        self._stop = True
        self._thread.join(STOP_LIMIT_S)
        for sock in [*self._peers, *self.held, self.listener]:
            sock.close()
        self._selector.close()

    def _order(self, name: str) -> None:
        done = threading.Event()
        with self._lock:
            self._orders.append((name, done))
        assert done.wait(STEP_LIMIT_S), f"the relay did not {name} in time"

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(self.TICK_S):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._pump(key.fileobj)  # type: ignore[arg-type]
            with self._lock:
                orders, self._orders = self._orders, []
            for name, done in orders:
                self._cut() if name == "cut" else self._resume()
                done.set()

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = self.listener.accept()
            if self._holding:
                with self._lock:
                    self.held.append(conn)
            else:
                self._link(conn)

    def _link(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        for sock in (conn, upstream):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peers[conn], self._peers[upstream] = upstream, conn

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        other = self._peers.get(sock)
        if other is None:
            return
        if data:
            other.settimeout(10)  # a bounded blocking send, then back to non-blocking
            try:
                other.sendall(data)
                other.setblocking(False)
                return
            except OSError:
                pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock)
        del self._peers[other]
        for s in (sock, other):
            self._selector.unregister(s)
            s.close()

    def _cut(self) -> None:
        self._holding = True
        for sock in list(self._peers):
            if sock in self._peers:
                self._drop(sock)

    def _resume(self) -> None:
        self._holding = False
        with self._lock:
            held, self.held = self.held, []
        for conn in held:
            self._link(conn)


@pytest.fixture(scope="module")
def steady_server(tmp_path_factory) -> Iterator[Any]:
    """A server that stays up while the relay in front of its sink drops connections."""
    args = server_args(tmp_path_factory.mktemp("steady"), "-num_worker", "1", "-cpu",
                       "-protocol", "obj")
    with running_server(args, ControlledWorker) as server:
        yield server


@pytest.mark.parametrize("kind", sorted(CALLERS))
def test_after_port_out_drops_no_request_goes_before_the_sink_knows_the_client(
        steady_server, kind):
    """The client's port_out connection drops and its reconnection waits (a sink
    restarting): the next call is not sent before the sink has answered a HELLO again.
    Sent at once, as before, it was computed and its reply dropped by the sink (which
    did not know the client yet), and the call then failed or timed out."""
    relay = Relay(steady_server.port_out)
    probe = WKRClient("127.0.0.1", steady_server.port, steady_server.port_out,
                      timeout=10_000, connect_timeout=10_000)
    try:
        with caller_of(kind, steady_server.port, relay.port) as caller:
            assert caller.call("before") == "before"
            before = probe.server_status
            relay.cut()
            caller.during(lambda: wait_until(relay.held_count, STEP_LIMIT_S,
                                             "the client to reconnect port_out"))
            pending = caller.begin("after")

            def sent_early() -> bool:
                status = probe.server_status
                return any(status[k] > before[k] for k in ("num_results", "num_undeliverable"))

            early = caller.during(lambda: _within(sent_early, WATCH_S))
            relay.resume()
            assert caller.finish(pending, LOST_LIMIT_S) == "after"
            assert not early, "the request was sent before the sink knew the client again"
            assert probe.server_status["num_undeliverable"] == before["num_undeliverable"]
            assert caller.call("later") == "later"
    finally:
        probe.close()
        relay.close()


def _within(predicate: Callable[[], bool], limit: float) -> bool:
    """Whether ``predicate`` becomes true within ``limit`` seconds."""
    try:
        wait_until(predicate, limit, "the predicate", 0.02)
    except AssertionError:
        return False
    return True
