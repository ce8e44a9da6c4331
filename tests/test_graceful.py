"""Graceful stop of a ``wkr-serving-start`` process under load, by SIGTERM or by the
``terminate`` command.

While it drains, new requests get ``ShuttingDown``; the request in flight finishes (or,
when it outlives ``-graceful_timeout``, gets ``ShuttingDown``); every request sent gets
exactly one reply; the process exits 0 in time, no child process outlives it, its
ports are closed and its IPC directory (socket files) is removed.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import CLIServer, Gate, abstract_names_of, gone, port_refused, wait_until
from wkr_serving.client import ConnectionLost, ShuttingDown, WKRClient

LOADERS = 3
WINDOW = 20
#: Exit within -graceful_timeout (the supervisor budgets draining and stopping inside
#: it), plus this much for process exit on a loaded 2-core machine.
EXIT_MARGIN_S = 2.5


class Loader(threading.Thread):
    """Sends windows of pipelined requests and fetches them, until a window brings an
    error (the server is stopping) or ``stop`` is set; records every (input, reply)."""

    def __init__(self, client: WKRClient, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.index = index
        self.stop = stop
        self.records: list[tuple[Any, Any]] = []
        self.windows = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set() and self.windows < 100_000:
                sent = []
                for _ in range(WINDOW):
                    value = {"loader": self.index, "n": n}
                    n += 1
                    self.client.encode(value, blocking=False)
                    sent.append(value)
                replies = self.client.fetch_all(on_error="return")
                self.records.extend(zip(sent, replies, strict=True))
                self.windows += 1
                if any(isinstance(r, Exception) for r in replies):
                    return
        except BaseException as exc:  # reported by the test
            self.failure = exc


@pytest.mark.parametrize("how", ["sigterm", "terminate"])
def test_graceful_stop_under_load(tmp_path, how):
    """SIGTERM: the held request is released during the drain and finishes.
    terminate: it outlives -graceful_timeout and is answered ShuttingDown."""
    grace = 5.0 if how == "sigterm" else 2.0
    server = CLIServer(["workers.ControlledWorker", "-num_worker", "2", "-batch_size", "8",
                        "-cpu", "-graceful_timeout", str(grace)], tmp_path)
    gate = Gate(tmp_path, "held")
    stop = threading.Event()
    clients: list[WKRClient] = []
    loaders: list[Loader] = []
    try:
        probe = server.client()
        clients.append(probe)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        roles = {probe.server_status["ventilator_pid"], probe.server_status["sink_pid"]}
        assert roles <= {c.pid for c in children}
        assert abstract_names_of(server.proc.pid), "no internal socket found"

        holder = server.client(timeout=30_000)
        clients.append(holder)
        holder.encode(gate.item("held"), blocking=False)
        gate.wait_started(30)

        for i in range(LOADERS):
            client = server.client()
            clients.append(client)
            loaders.append(Loader(client, i, stop))
        for loader in loaders:
            loader.start()
        wait_until(lambda: all(lo.windows >= 2 or not lo.is_alive() for lo in loaders), 60,
                   "the load to run")
        assert all(lo.is_alive() for lo in loaders), [lo.failure for lo in loaders]

        asked_at = time.monotonic()
        if how == "sigterm":
            server.proc.send_signal(signal.SIGTERM)
        else:
            answer = probe.terminate()
            assert answer == {"stopping": True, "supervisor_pid": server.proc.pid}

        def refused_new_work():
            try:
                probe.encode("probe", timeout=5000)
            except ShuttingDown:
                return True
            return False

        wait_until(refused_new_work, 30, "new requests to get ShuttingDown")
        assert probe.server_status["draining"] is True
        for loader in loaders:
            loader.join(30)
            assert not loader.is_alive(), "a loader is still waiting for replies"

        if how == "sigterm":
            gate.open()
            (held,) = holder.fetch_all()
            assert held == {"pid": held["pid"], "value": "held", "released": True}
        else:
            (held,) = holder.fetch_all(on_error="return")
            waited = time.monotonic() - asked_at
            gate.open()  # the server gave up on it; let the worker leave predict
            assert isinstance(held, ShuttingDown), held
            assert grace - 1.0 <= waited < grace + EXIT_MARGIN_S, (
                f"ShuttingDown for the held request after {waited:.2f}s "
                f"(-graceful_timeout {grace:g})")

        try:
            code = server.proc.wait(grace + EXIT_MARGIN_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit:\n{server.stderr()[-4000:]}")
        took = time.monotonic() - asked_at
        assert code == 0, server.stderr()[-4000:]
        assert took < grace + EXIT_MARGIN_S, (
            f"exited {took:.2f}s after the stop request (-graceful_timeout {grace:g})")
        wait_until(lambda: all(gone(c.pid) for c in children), 30,
                   "every child process to exit")
        assert abstract_names_of(server.proc.pid) == [], "internal sockets were left behind"
        assert port_refused(server.port) and port_refused(server.port_out)

        results = stopped = 0
        for loader in loaders:
            assert loader.failure is None, loader.failure
            for value, reply in loader.records:
                if isinstance(reply, (ShuttingDown, ConnectionLost)):
                    stopped += 1
                else:
                    assert reply == value, f"wrong reply {reply!r} for {value!r}"
                    results += 1
        assert results >= LOADERS * 2 * WINDOW
        assert stopped >= 1, "no loader saw the server stop"
    finally:
        stop.set()
        gate.open()
        for client in clients:
            client.close()
        for loader in loaders:
            loader.join(30)
        server.close(grace=0)
