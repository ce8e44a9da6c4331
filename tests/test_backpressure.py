"""Back-pressure: a bounded queue, slow readers, and fetch when the server goes away.

Beyond ``-max_queue_size`` queued items a request gets ``Overloaded`` at once (while the
workers are still busy); a request larger than the whole queue gets ``BadInput``. A
client that stops reading and reads later gets every result. A client whose server
stops with requests pending gets an error for each one instead of blocking.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from helpers import (
    STOP_LIMIT_S,
    Gate,
    connect,
    running_server,
    server_args,
    wait_idle,
    wait_until,
)
from wkr_serving.client import (
    BadInput,
    ConnectionLost,
    Overloaded,
    ShuttingDown,
    WKRClient,
    WKRTimeoutError,
)
from wkr_serving.server import WKRServer
from workers import ControlledWorker

QUEUE = 20


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """ControlledWorker, protocol obj, 1 worker, batch_size 10, -max_queue_size 20."""
    args = server_args(tmp_path_factory.mktemp("queue_model"), "-num_worker", "1",
                       "-batch_size", "10", "-max_queue_size", str(QUEUE), "-cpu",
                       "-graceful_timeout", "3")
    with running_server(args, ControlledWorker) as server:
        yield server


def test_full_queue_answers_overloaded_at_once(small_queue_server, tmp_path):
    """The worker is held and 20 items fill the queue: 30 more requests get Overloaded
    while the worker is still held; after release the 20 queued ones get results."""
    gate = Gate(tmp_path, "hold")
    with connect(small_queue_server) as probe, connect(small_queue_server) as holder, \
            connect(small_queue_server) as filler, connect(small_queue_server) as late:
        try:
            base = wait_idle(probe)
            holder.encode(gate.item("hold"), blocking=False)
            gate.wait_started()
            for i in range(QUEUE):
                filler.encode({"fill": i}, blocking=False)
            wait_until(lambda: probe.server_status["queue_items"] == QUEUE, 30,
                       "the queue to fill")

            for i in range(30):
                late.encode({"late": i}, blocking=False)
            refused = late.fetch_all(on_error="return")
            assert all(isinstance(r, Overloaded) for r in refused), refused
            assert "max_queue_size" in refused[0].message
            with pytest.raises(Overloaded):
                late.encode_batch(list(range(5)))
            status = probe.server_status
            # Answered while the worker is still held: at once, not when room appears.
            assert not os.path.exists(gate.release)
            assert status["busy_workers"] == 1 and status["queue_items"] == QUEUE
            assert status["num_overloaded"] - base["num_overloaded"] == 31
            gate.open()
            assert filler.fetch_all() == [{"fill": i} for i in range(QUEUE)]
            assert holder.fetch_all()[0]["released"] is True
        finally:
            gate.open()
        wait_idle(probe)
        assert late.encode({"late": "again"}) == {"late": "again"}  # room again
        assert late.encode_batch(list(range(QUEUE))) == list(range(QUEUE))


def test_request_larger_than_the_queue_is_bad_input(small_queue_server):
    with connect(small_queue_server) as client:
        with pytest.raises(BadInput) as info:
            client.encode_batch(list(range(QUEUE + 1)))
        assert "max_queue_size" in info.value.message and str(QUEUE) in info.value.message
        assert client.encode_batch(list(range(QUEUE))) == list(range(QUEUE))


def test_client_that_stops_reading_gets_every_result_later(numpy_server, client_factory):
    """8000 pipelined requests and no reading until the server has answered them all:
    then every result is there, each the right one, none dropped."""
    n = 8000
    reader = client_factory(numpy_server, timeout=30_000)
    probe = client_factory(numpy_server)
    base = wait_idle(probe)
    inputs = [np.full(3, i, dtype=np.int32) for i in range(n)]
    for x in inputs:
        reader.encode(x, blocking=False)
    wait_until(lambda: probe.server_status["num_results"] - base["num_results"] >= n, 90,
               "the server to answer every request", interval=0.05)
    status = probe.server_status
    assert status["num_undeliverable"] == base["num_undeliverable"]
    assert status["num_errors"] == base["num_errors"]
    results = reader.fetch_all()
    assert len(results) == n
    for x, got in zip(inputs, results, strict=True):
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)
    assert reader.status["num_pending_request"] == 0


@pytest.fixture
def stopping_server(tmp_path):
    """ControlledWorker, 1 worker, batch_size 4, -graceful_timeout 1 (each test stops it)."""
    args = server_args(tmp_path, "-num_worker", "1", "-batch_size", "4", "-cpu",
                       "-graceful_timeout", "1")
    server = WKRServer(args, ControlledWorker)
    server.start()
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.close(STOP_LIMIT_S)


def test_fetch_gets_an_error_for_each_request_when_the_server_stops(stopping_server,
                                                                     tmp_path):
    """The server is stopped (-graceful_timeout 1) while a batch holding requests of two
    clients runs and more wait in the queue: every pending request is answered
    ShuttingDown well within the clients' 30 s timeout, none blocks a fetch; a request
    sent after the server is gone fails within its own timeout."""
    hold, stuck = Gate(tmp_path, "hold"), Gate(tmp_path, "stuck")
    clients: list[WKRClient] = [connect(stopping_server, timeout=30_000) for _ in range(3)]
    a, b, c = clients
    closer: threading.Thread | None = None
    try:
        a.encode(hold.item("hold"), blocking=False)
        hold.wait_started()
        a.encode(stuck.item("stuck"), blocking=False)  # with b's 3 items: a batch of 4
        b.encode_batch(["b1", "b2", "b3"], blocking=False)
        for i in range(20):  # these stay queued
            c.encode({"c": i}, blocking=False)
        wait_until(lambda: c.server_status["queue_items"] == 24, 30, "24 queued items")
        hold.open()
        stuck.wait_started()

        started = time.monotonic()
        closer = threading.Thread(target=stopping_server.close, args=(STOP_LIMIT_S,))
        closer.start()
        held_a = a.fetch_all(on_error="return")
        stuck.open()  # the server gave up on it; let the worker leave predict
        replies_b = b.fetch_all(on_error="return")
        replies_c = c.fetch_all(on_error="return")
        took = time.monotonic() - started

        assert held_a[0]["released"] is True
        assert isinstance(held_a[1], ShuttingDown), held_a[1]
        assert len(replies_c) == 20
        for reply in replies_c:
            assert isinstance(reply, ShuttingDown), reply
        # The other client's request in the abandoned batch is answered too (not lost
        # until the connection drops).
        assert isinstance(replies_b[0], ShuttingDown), replies_b[0]
        assert took < 15.0, f"fetching the errors took {took:.1f}s"

        closer.join(STOP_LIMIT_S)
        assert not stopping_server.is_alive() and stopping_server.exit_code == 0
        after = time.monotonic()
        with pytest.raises((ConnectionLost, WKRTimeoutError)):
            c.encode("too late", timeout=2000)
        assert time.monotonic() - after < 10.0
    finally:
        hold.open()
        stuck.open()
        for client in clients:
            client.close()
        if closer is not None:
            closer.join(STOP_LIMIT_S)
