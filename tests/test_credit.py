"""A worker that never waits: each worker may hold two batches (``WORKER_CREDIT``).

Under steady load the ventilator sends a worker its next batch before the READY for the
one it computes, so the worker goes from one batch to the next without a round trip
through the ventilator. These tests hold a worker in a batch (a ``block`` gate) with
the next batch already in its hands, then check every fault path with two batches
there: kill -9 (both retried, none lost), ``-worker_timeout`` (the hung batch fails
WorkerDied, the one behind it is computed elsewhere; the limit counts from when a batch
starts, not from when it was sent), and recycling (the retiring worker computes both).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil
from credit_workers import PacedWorker
from helpers import Gate, connect, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import WorkerDied
from wkr_serving.server.batching import WORKER_CREDIT
from wkr_serving.server.worker import WorkerProcess

#: Longest wait for a state the test drives the server into (a loaded 2-core machine).
STATE_LIMIT_S = 30.0
#: Longest wait for a killed worker to be gone, or a replacement to be serving.
PROCESS_LIMIT_S = 60.0
#: How long one paced batch computes (s): far below the ventilator's limit for sending
#: a batch ahead (PREFETCH_MAX_SERVICE_S), long enough for requests to queue behind it.
PACE_S = 0.005
#: Paced requests sent before the one under test: they warm the worker up (its batch
#: time is measured) and keep it under steady load while the rest of the stream arrives.
WARM = 20


def paced(value: Any, seconds: float = PACE_S) -> dict[str, Any]:
    return {"cmd": "pace", "seconds": seconds, "value": value}


def pid_item(value: Any) -> dict[str, Any]:
    return {"cmd": "pid", "value": value}


def in_flight(client: Any, items: int) -> dict[str, Any] | None:
    """The status once exactly ``items`` items are in workers' hands (None before)."""
    status = client.server_status
    return status if status["in_flight_items"] == items else None


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid), PROCESS_LIMIT_S, f"pid {pid} to end")


def one_worker(tmp_path: Any, *extra: str) -> Any:
    """One worker and batches of one item: each request is a batch of its own, so "two
    batches in the worker's hands" is two requests in flight."""
    return server_args(tmp_path, "-num_worker", "1", "-batch_size", "1", "-cpu",
                       "-graceful_timeout", "3", *extra)


def test_credit_is_two():
    assert WORKER_CREDIT == 2


def test_under_load_a_worker_holds_its_next_batch_before_it_asks(tmp_path):
    """One worker, batches of 4, a pipelined stream of paced requests: the status shows
    more items in the worker's hands than one batch holds (with a credit of one it never
    does), never more than two batches, and every request gets its own result."""
    args = server_args(tmp_path, "-num_worker", "1", "-batch_size", "4", "-cpu",
                       "-graceful_timeout", "3")
    n = 1000
    with running_server(args, PacedWorker) as server, connect(server) as client, \
            connect(server) as watcher:
        for i in range(n):
            client.encode(paced(i, 0.003), blocking=False)
        seen = wait_until(lambda: (s := watcher.server_status)["in_flight_items"] > 4 and s,
                          STATE_LIMIT_S, "more than one batch in the worker's hands")
        assert seen["in_flight_items"] <= 8 and seen["busy_workers"] == 1, seen
        results = client.fetch_all()
        assert [r["value"] for r in results] == list(range(n))
        status = wait_idle(watcher)
        assert status["num_errors"] == {} and status["num_retried_items"] == 0


def _two_in_hand(client: Any, watcher: Any, gate: Gate, held: str,
                 behind: list[str]) -> dict[str, Any]:
    """Send WARM paced items, then ``gate``'s item ``held`` and the pid items ``behind``;
    once the gate holds its batch, wait until the worker also holds the next one, and
    return that status."""
    stream = [paced(i) for i in range(WARM)]
    stream += [gate.item(held), *(pid_item(name) for name in behind)]
    for value in stream:
        client.encode(value, blocking=False)
    gate.wait_started(STATE_LIMIT_S)
    return wait_until(lambda: in_flight(watcher, 2), STATE_LIMIT_S,
                      "two batches in the worker's hands")


def test_kill_9_of_a_worker_holding_two_batches_loses_nothing(tmp_path):
    """The worker computes a batch held in a gate with the next batch already in its
    hands when it is killed with SIGKILL: both batches are retried on its replacement
    (the one behind, which never started, as well) and every request gets its own
    result; what was still queued goes to the replacement."""
    gate = Gate(tmp_path, "held")
    with running_server(one_worker(tmp_path), PacedWorker) as server, \
            connect(server) as client, connect(server) as watcher:
        before = wait_idle(watcher)
        try:
            status = _two_in_hand(client, watcher, gate, "g", ["n1", "n2"])
            assert status["busy_workers"] == 1 and status["queue_items"] == 1, status
            victim = status["workers"][0]["pid"]
            kill_and_wait(victim)
        finally:
            gate.open()  # the retried gate item then passes at once
        results = client.fetch_all(on_error="return")
        assert not [r for r in results if isinstance(r, Exception)], results
        assert [r["value"] for r in results] == [*range(WARM), "g", "n1", "n2"]
        g, n1, n2 = results[WARM:]
        assert g["released"] is True
        assert victim not in (g["pid"], n1["pid"], n2["pid"]), results[WARM:]
        after = wait_idle(watcher)
        assert after["num_retried_items"] - before["num_retried_items"] == 2
        assert after["num_errors"] == before["num_errors"], after["num_errors"]
        assert after["quarantined_inputs"] == 0
        assert after["workers"][0]["restarts"] == 1


def test_a_hung_batch_fails_and_the_batch_behind_it_is_computed(tmp_path):
    """-worker_timeout 2: the batch stuck in its gate fails WorkerDied; the batch held
    behind it never started, so it is retried on the replacement and answered, like the
    rest of the stream."""
    gate = Gate(tmp_path, "hang")
    args = one_worker(tmp_path, "-worker_timeout", "2")
    with running_server(args, PacedWorker) as server, connect(server) as client, \
            connect(server) as watcher:
        before = wait_idle(watcher)
        try:
            status = _two_in_hand(client, watcher, gate, "hang", ["a", "b"])
            hung = status["workers"][0]["pid"]
            results = client.fetch_all(on_error="return")
        finally:
            gate.open()
        assert [r["value"] for r in results[:WARM]] == list(range(WARM))
        error, a, b = results[WARM:]
        assert isinstance(error, WorkerDied), results[WARM:]
        assert "worker_timeout" in error.message, error.message
        assert (a["value"], b["value"]) == ("a", "b"), results[WARM:]
        assert hung not in (a["pid"], b["pid"]), results[WARM:]
        after = wait_idle(watcher)
        assert after["num_retried_items"] - before["num_retried_items"] == 1  # "a"
        assert after["num_errors"].get("worker_died", 0) \
            - before["num_errors"].get("worker_died", 0) == 1, after["num_errors"]
        assert after["workers"][0]["restarts"] == 1


def test_worker_timeout_counts_from_when_a_held_batch_starts(tmp_path):
    """-worker_timeout 3; a batch held in a gate, with the next one (2 s of compute)
    already in the worker's hands; released, the first computes 2 s more. Counted from
    when it was sent, the second batch would pass the limit (about 4 s); counted from
    when it starts, as it must be, it ends well within it and nothing fails."""
    gate = Gate(tmp_path, "first")
    args = one_worker(tmp_path, "-worker_timeout", "3")
    first = {**paced("s1", 2.0), "started": gate.started, "release": gate.release}
    with running_server(args, PacedWorker) as server, connect(server) as client, \
            connect(server) as watcher:
        before = wait_idle(watcher)
        stream = [paced(i) for i in range(WARM)] + [first, paced("s2", 2.0)]
        for value in stream:
            client.encode(value, blocking=False)
        try:
            gate.wait_started(STATE_LIMIT_S)
            wait_until(lambda: in_flight(watcher, 2), STATE_LIMIT_S,
                       "the two slow batches in the worker's hands")
        finally:
            gate.open()
        results = client.fetch_all(on_error="return")
        assert not [r for r in results if isinstance(r, Exception)], results
        assert [r["value"] for r in results] == [*range(WARM), "s1", "s2"]
        assert len({r["pid"] for r in results}) == 1
        after = wait_idle(watcher)
        assert after["workers"][0]["restarts"] == 0
        assert after["num_retried_items"] == before["num_retried_items"]


def test_a_retiring_worker_computes_both_batches_in_its_hands(tmp_path):
    """-max_requests 4: the worker asks to be recycled, then blocks in a gate with the
    next batch in its hands. A request sent meanwhile goes to the replacement at once;
    once released, the retiring worker computes both of its batches itself (nothing
    retried, nothing failed) and leaves."""
    gate = Gate(tmp_path, "retiring")
    args = one_worker(tmp_path, "-max_requests", "4", "-max_requests_jitter", "0")
    with running_server(args, PacedWorker) as server, connect(server) as client, \
            connect(server) as watcher, connect(server) as late:
        before = wait_idle(watcher)
        stream = [paced(i) for i in range(WARM)] + [gate.item("g"), pid_item("p1")]
        for value in stream:
            client.encode(value, blocking=False)
        try:
            gate.wait_started(STATE_LIMIT_S)
            status = wait_until(lambda: in_flight(watcher, 2), STATE_LIMIT_S,
                                "two batches in the worker's hands")
            old = status["workers"][0]["pid"]

            def replacement_ready() -> bool:
                return any(c.replaces and c.ready and isinstance(c.role, WorkerProcess)
                           for c in list(server.supervisor.children.values()))

            wait_until(replacement_ready, PROCESS_LIMIT_S, "the replacement to be ready")
            served = late.encode(pid_item("late"), timeout=int(STATE_LIMIT_S * 1000))
            assert served["value"] == "late" and served["pid"] != old, served
        finally:
            gate.open()
        results = client.fetch_all(on_error="return")
        assert not [r for r in results if isinstance(r, Exception)], results
        assert [r["value"] for r in results] == [*range(WARM), "g", "p1"]
        g, p1 = results[WARM:]
        assert g["released"] is True and g["pid"] == p1["pid"] == old, results[WARM:]
        wait_until(lambda: not psutil.pid_exists(old), PROCESS_LIMIT_S,
                   f"the retired worker (pid {old}) to leave")
        after = wait_idle(watcher)
        assert after["num_errors"] == before["num_errors"], after["num_errors"]
        assert after["num_retried_items"] == before["num_retried_items"]
        assert after["workers"][0]["restarts"] == 0
        assert server.supervisor.failure is None


def test_a_lone_request_on_an_idle_server_goes_at_once(tmp_path):
    """Sent ahead or not, a lone request still goes to an idle worker at once, even with
    a long -batch_group_timeout, and each of a few in a row is its own batch."""
    args = server_args(tmp_path, "-num_worker", "1", "-batch_size", "8", "-cpu",
                       "-batch_group_timeout", "5000", "-graceful_timeout", "3")
    with running_server(args, PacedWorker) as server, connect(server) as client:
        before = wait_idle(client)
        for i in range(5):
            started = time.monotonic()
            assert client.encode(i) == i
            took = time.monotonic() - started
            assert took < 1.0, f"a lone request took {took:.2f}s on an idle server"
        after = wait_idle(client)
        assert after["num_batches"] - before["num_batches"] == 5
