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


def test_client_that_never_reads_is_held_back_and_still_gets_every_reply(small_queue_server):
    """A client that sends but does not read fills its reply queue (-max_queue_size
    messages in the sink, plus the TCP buffers). The sink then holds its replies itself
    and the ventilator refuses that client's new requests with Overloaded, so memory
    stays bounded; when it reads at last it gets exactly one reply per request: every
    accepted one's result, then the Overloaded refusals. Other clients are not affected."""
    import zmq
    from wkr_serving.client import protocol as P
    from wkr_serving.client.base import parse_replies, request_frames

    payload = os.urandom(256 * 1024)  # big replies fill the TCP buffers quickly
    context = zmq.Context()
    sockets = []
    for port, hwm in ((small_queue_server.port, 1000), (small_queue_server.port_out, 1)):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"never-reads")
        s.setsockopt(zmq.RCVHWM, hwm)  # this client buffers almost nothing itself
        s.connect(f"tcp://127.0.0.1:{port}")
        sockets.append(s)
    to_vent, from_sink = sockets
    try:
        with connect(small_queue_server) as probe, connect(small_queue_server) as other:
            from_sink.send(P.pack([P.PROTOCOL_VERSION, P.HELLO, 0]))
            assert from_sink.poll(10_000), "no handshake reply"
            from_sink.recv_multipart()
            base = wait_idle(probe)
            sent = 0

            def send_wave(n):
                nonlocal sent
                for _ in range(n):
                    sent += 1
                    assert to_vent.poll(10_000, zmq.POLLOUT)
                    to_vent.send_multipart(request_frames(sent, 60_000, [payload], "obj"))

            def answered():  # replies the server made for this client, delivered or held
                s = probe.server_status
                done = s["num_results"] + sum(s["num_errors"].values())
                return s if done - base["num_results"] - sum(
                    base["num_errors"].values()) >= sent else None

            congested = None
            for _ in range(200):  # bounded: each wave waits for its replies
                send_wave(5)
                status = wait_until(answered, 30, "the server to answer the wave")
                if status["congested_clients"]:
                    congested = status
                    break
            assert congested is not None, "the sink never held replies for a non-reader"
            accepted = sent
            send_wave(5)  # refused: its results are waiting unread
            wait_until(lambda: probe.server_status["num_overloaded"]
                       >= base["num_overloaded"] + 5, 30, "the refusals")
            assert other.encode({"still": "served"}) == {"still": "served"}

            replies = {}
            deadline = time.monotonic() + 60
            while len(replies) < sent and time.monotonic() < deadline:
                if from_sink.poll(1000):
                    for reply in parse_replies(from_sink.recv_multipart(copy=False)):
                        assert reply.req_id not in replies, f"two replies for {reply.req_id}"
                        replies[reply.req_id] = reply
            assert sorted(replies) == list(range(1, sent + 1)), "a request got no reply"
            assert all(replies[i].error is None and replies[i].value == [payload]
                       for i in range(1, accepted + 1))
            for i in range(accepted + 1, sent + 1):
                assert isinstance(replies[i].error, Overloaded), replies[i]
                assert "not reading" in replies[i].error.message
            assert not from_sink.poll(200), "an extra reply arrived"

            after = wait_until(lambda: (lambda s: s if not s["congested_clients"] else None)(
                probe.server_status), 20, "the backlog to be delivered")
            assert after["held_replies"] == 0
            sent += 1
            to_vent.send_multipart(request_frames(sent, 60_000, ["again"], "obj"))
            assert from_sink.poll(10_000), "a client that reads again must be served again"
            (reply,) = parse_replies(from_sink.recv_multipart(copy=False))
            assert reply.req_id == sent and reply.value == ["again"]
    finally:
        for s in sockets:
            s.close(0)
        context.term()
