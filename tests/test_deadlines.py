"""Deadlines: a request's deadline is its arrival plus the timeout the client sent.

Expired requests are answered ``DeadlineExceeded`` without being computed, whether they
expire at the head of the ventilator's queue or in a batch just before ``predict``
(proved with the worker's ``stat`` command: a computed item records a statistic). Late
results of requests the client gave up on are dropped and leave nothing behind in the
client's tables or the sink's table of split requests.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from helpers import Gate, connect, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import DeadlineExceeded, WKRClient, WKRTimeoutError
from workers import ControlledWorker

BATCH_SIZE = 10


def stat(key: str) -> dict[str, Any]:
    """An input that, if computed, records statistic ``key`` (visible in the status)."""
    return {"cmd": "stat", "values": {key: 1}}


def accepted_at(probe: WKRClient, count: int) -> float:
    """Wait until the ventilator has accepted ``count`` requests in all; return a
    monotonic time by which every one of them had arrived (and so had its deadline)."""
    wait_until(lambda: probe.server_status["num_requests"] >= count, 30,
               f"{count} requests to be accepted")
    return time.monotonic()


def wait_for_clock(moment: float) -> None:
    """Wait until the monotonic clock (the one the server's deadlines use) reaches
    ``moment``: this waits for a deadline to pass, not for another process."""
    wait_until(lambda: time.monotonic() >= moment, max(0.0, moment - time.monotonic()) + 5,
               "the deadline to pass")


def errors(status: dict[str, Any], code: str) -> int:
    return status["num_errors"].get(code, 0)


@pytest.fixture(scope="module")
def deadline_server(tmp_path_factory):
    """ControlledWorker, protocol obj, 1 worker, batch_size 10."""
    args = server_args(tmp_path_factory.mktemp("deadline_model"), "-num_worker", "1",
                       "-batch_size", str(BATCH_SIZE), "-cpu", "-graceful_timeout", "3")
    with running_server(args, ControlledWorker) as server:
        yield server


def test_expired_requests_are_not_computed(deadline_server, tmp_path):
    """While the only worker is busy, three requests queue: a short-deadline one, a
    long-deadline one, another short one. When the worker frees up, the first is
    expired at the head of the queue; the third leaves in a batch with the second and
    is expired by the worker before predict. Neither is computed; the second is."""
    tag = uuid.uuid4().hex[:8]
    gate = Gate(tmp_path, "hold")
    with connect(deadline_server) as probe, connect(deadline_server) as holder, \
            connect(deadline_server, timeout=30_000) as client:
        try:
            base = wait_idle(probe)
            holder.encode(gate.item("hold"), blocking=False)
            gate.wait_started()
            # Short server deadlines (per-call timeout 200 ms); the client itself waits
            # up to its own 30 s for the replies.
            client.encode(stat(f"early-{tag}"), blocking=False, timeout=200)
            client.encode(stat(f"live-{tag}"), blocking=False)
            client.encode(stat(f"late-{tag}"), blocking=False, timeout=200)
            arrived = accepted_at(probe, base["num_requests"] + 4)
            wait_for_clock(arrived + 0.2 + 0.05)
            gate.open()

            early, live, late = client.fetch_all(on_error="return")
            assert holder.fetch_all()[0]["released"] is True
        finally:
            gate.open()
        assert live == {f"live-{tag}": 1}
        assert isinstance(early, DeadlineExceeded), early
        assert "queue" in early.message  # expired by the ventilator
        assert isinstance(late, DeadlineExceeded), late
        assert "worker" in late.message  # expired by the worker, before predict

        status = wait_idle(probe)
        computed = status["statistic"]
        assert f"live-{tag}" in computed
        assert f"early-{tag}" not in computed and f"late-{tag}" not in computed, computed
        assert status["num_expired_in_queue"] - base["num_expired_in_queue"] == 1
        assert errors(status, "deadline_exceeded") - errors(base, "deadline_exceeded") == 2
        assert client.encode("after") == "after"


def test_abandoned_requests_leave_nothing_behind(deadline_server, tmp_path):
    """A client with a 1 s timeout gives up on a split request whose first batch runs
    too long, and queues 30 more that expire behind it. The late part of the split
    request is computed, its remainder expires; the client drops the late reply. After
    that, neither the client's tables nor the sink's table of split requests hold
    anything, and none of the 30 expired requests was computed."""
    tag = uuid.uuid4().hex[:8]
    gate = Gate(tmp_path, "slow")
    with connect(deadline_server) as probe, \
            connect(deadline_server, timeout=1000) as client:
        try:
            base = wait_idle(probe)
            # 15 items: the first batch (the gate and 9 more) runs until released, the
            # last 5 items wait in the queue: one request split over two batches.
            client.encode_batch([gate.item("slow"), *range(1, 15)], blocking=False)
            gate.wait_started()
            for _ in range(30):
                client.encode(stat(f"abandoned-{tag}"), blocking=False)
            arrived = accepted_at(probe, base["num_requests"] + 31)

            replies = client.fetch()
            with pytest.raises(WKRTimeoutError):
                next(replies)  # the split request: the client gives up on it
            wait_for_clock(arrived + 1.0 + 0.05)  # every queued deadline has passed
            gate.open()
            rest = client.fetch_all(on_error="return")
        finally:
            gate.open()
        assert len(rest) == 30
        assert all(isinstance(r, DeadlineExceeded) for r in rest), rest
        # The split request's late reply came before this result: it was dropped.
        assert client.encode("after", timeout=20_000) == "after"
        assert client._expected == {} and client._replies == {}, (
            client._expected, client._replies)
        assert not client._unfetched and not client._errors

        status = wait_idle(probe)
        assert status["pending_split_requests"] == 0
        assert f"abandoned-{tag}" not in status["statistic"]
        assert status["num_expired_in_queue"] - base["num_expired_in_queue"] == 31
        assert errors(status, "deadline_exceeded") - errors(base, "deadline_exceeded") == 31
        assert status["num_undeliverable"] == base["num_undeliverable"]


def test_a_request_that_fits_its_deadline_is_computed(deadline_server):
    """A per-call timeout only bounds the request it is given to."""
    tag = uuid.uuid4().hex[:8]
    with connect(deadline_server) as client:
        assert client.encode(stat(f"fits-{tag}"), timeout=10_000) == {f"fits-{tag}": 1}
        status = wait_idle(client)
        assert status["statistic"][f"fits-{tag}"]["count"] == 1
