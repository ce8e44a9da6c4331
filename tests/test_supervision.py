"""Supervision and fault isolation, with real processes and real signals.

A worker killed by SIGKILL or SIGSEGV, or stuck past ``-worker_timeout``, fails only the
requests it held (``WorkerDied``, at once) and is restarted; ``server_status`` shows
its restarts and last error. A killed ventilator or sink stops the whole server (exit
code 1, no process left, ports and IPC directory gone) and clients get
``ConnectionLost`` at once. A restarted worker that cannot boot halts the server
instead of crash-looping. A poisoned item fails alone among 63 good ones of its batch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import (
    START_LIMIT_S,
    STOP_LIMIT_S,
    Gate,
    connect,
    gone,
    port_refused,
    running_server,
    server_args,
    wait_idle,
    wait_until,
)
from wkr_serving.client import (
    ConnectionLost,
    ModelError,
    WKRClient,
    WKRTimeoutError,
    WorkerDied,
)
from wkr_serving.server import WKRServer
from workers import BootOnceWorker, ControlledWorker, CrashWorker

#: Loader threads must finish well within the test timeout.
LOAD_LIMIT_S = 90.0
#: The issue asks for WorkerDied "within a second"; asserted with headroom for a loaded
#: 2-core machine, and the measured time is shown in the message.
WORKER_DIED_LIMIT_S = 3.0


def answered(status: dict[str, Any]) -> int:
    """Replies the sink has sent for requests (results and errors, not commands)."""
    return status["num_results"] + sum(status["num_errors"].values())


def settled(client: WKRClient, num_worker: int, limit: float = 60.0) -> dict[str, Any]:
    """Wait until every worker slot has a live, registered worker and nothing is queued
    or in flight; return that status."""

    def check():
        status = client.server_status
        rows = status["workers"]
        return (status["ready"] and len(rows) == num_worker
                and all(r["pid"] is not None for r in rows) and status)

    wait_until(check, limit, "every worker to be up")
    return wait_idle(client, limit)


def busy_pids(client: WKRClient) -> set[int]:
    return {w["pid"] for w in client.server_status["workers"] if w["state"] == "busy"}


def ipc_dir(server: WKRServer) -> str:
    """The server's IPC directory (where its internal socket files live)."""
    control = server.supervisor.endpoints.control
    assert control.startswith("ipc://"), control
    return os.path.dirname(control[len("ipc://"):])


# -- a worker dies ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory):
    """CrashWorker, protocol obj, 2 workers, batch_size 64. Tests here kill its workers
    (well under the restart limit) and wait until both are back before they start."""
    args = server_args(tmp_path_factory.mktemp("crash_model"), "-num_worker", "2",
                       "-batch_size", "64", "-cpu", "-graceful_timeout", "3")
    with running_server(args, CrashWorker) as server:
        yield server


def test_kill_9_under_load_every_request_gets_exactly_one_reply(crash_server, tmp_path):
    """Both workers are killed with SIGKILL while holding batches, during a pipelined load
    of 4000 requests from four clients: every request gets exactly one reply (its own
    result, or WorkerDied for the items of a killed batch), WorkerDied comes within a
    second of the kill, both workers are restarted and serving goes on."""
    per_client, n_loaders = 1000, 4
    probe = connect(crash_server)
    holder = connect(crash_server, timeout=60_000)
    loaders = [connect(crash_server, timeout=60_000) for _ in range(n_loaders)]
    gate_a, gate_b = Gate(tmp_path, "hold-a"), Gate(tmp_path, "hold-b")
    try:
        base = settled(probe, 2)
        restarts_before = {w["index"]: w["restarts"] for w in base["workers"]}
        pids_before = {w["pid"] for w in base["workers"]}

        # Worker A holds a request alone; a thread waits for it and notes when it fails.
        held: dict[str, Any] = {}

        def hold() -> None:
            try:
                held["value"] = holder.encode(gate_a.item("a"))
            except Exception as exc:  # the WorkerDied expected, or anything else to report
                held["error"] = exc
            held["at"] = time.monotonic()

        holder_thread = threading.Thread(target=hold, daemon=True)
        holder_thread.start()
        gate_a.wait_started()
        (pid_a,) = busy_pids(probe)

        # The load: worker B computes it until it takes the batch holding gate B; the
        # rest waits in the queue while both workers are held.
        def load(i: int) -> tuple[list[tuple[str, Any]], list[Any]]:
            client = loaders[i]
            sent: list[tuple[str, Any]] = []
            for j in range(per_client):
                if i == 0 and j == 300:
                    split = [{"c": 0, "split": k} for k in range(100)]  # > batch_size
                    client.encode_batch(split, blocking=False)
                    sent.append(("batch", split))
                    client.encode(gate_b.item("b"), blocking=False)
                    sent.append(("held", None))
                value = {"c": i, "n": j}
                client.encode(value, blocking=False)
                sent.append(("one", value))
            return sent, client.fetch_all(on_error="return")

        with ThreadPoolExecutor(max_workers=n_loaders) as pool:
            futures = [pool.submit(load, i) for i in range(n_loaders)]
            try:
                gate_b.wait_started()
                busy = busy_pids(probe)
                assert pid_a in busy and len(busy) == 2, busy
                (pid_b,) = busy - {pid_a}

                killed_at = time.monotonic()
                os.kill(pid_a, signal.SIGKILL)
                holder_thread.join(30)
                assert not holder_thread.is_alive(), "the held request got no reply"
                os.kill(pid_b, signal.SIGKILL)
                # Count replies on the server side first: a lost reply would otherwise
                # hold a loader's in-order fetch for its whole timeout.
                wait_idle(probe, LOAD_LIMIT_S)
                expected = n_loaders * per_client + 2 + 1  # the load, its extras, held a
                try:
                    wait_until(lambda: answered(probe.server_status) - answered(base)
                               >= expected, 10, "every accepted request to be answered")
                except AssertionError:
                    got = answered(probe.server_status) - answered(base)
                    raise AssertionError(
                        f"{expected - got} of {expected} accepted requests never got a reply "
                        "(sink count; the killed batch held requests of several clients)"
                    ) from None
            except BaseException:
                gate_a.open()  # so the loaders' fetches end before the pool is joined
                gate_b.open()
                for client in loaders:
                    client.close()
                raise
            outcomes = [f.result(timeout=LOAD_LIMIT_S) for f in futures]

        assert isinstance(held.get("error"), WorkerDied), held
        took = held["at"] - killed_at
        assert took < WORKER_DIED_LIMIT_S, (
            f"WorkerDied came {took:.3f}s after kill -9 (the issue asks within a second)")
        assert f"pid {pid_a}" in held["error"].message

        results = died = 0
        for sent, replies in outcomes:
            assert len(replies) == len(sent)
            for (kind, value), reply in zip(sent, replies, strict=True):
                if kind == "held":
                    assert isinstance(reply, WorkerDied), reply
                    assert f"pid {pid_b}" in reply.message
                    died += 1
                elif isinstance(reply, WorkerDied):
                    died += 1
                else:
                    assert reply == value, f"a request got someone else's result: {reply!r}"
                    results += 1
        total = sum(len(sent) for sent, _ in outcomes)
        assert died <= 64, f"{died} requests failed, more than the killed batch held"
        assert results == total - died and results >= total - 64
        # Client 0's requests sent after gate B could only be computed once a killed
        # worker was replaced: the load went on across the kills.
        sent0, replies0 = outcomes[0]
        after = [r for (kind, _), r in zip(sent0[302:], replies0[302:], strict=True)
                 if kind == "one" and not isinstance(r, WorkerDied)]
        assert sent0[301][0] == "held" and len(after) >= per_client - 300 - 64

        # Both restarted once more, with new processes, and the status says why.
        def restarted():
            status = probe.server_status
            rows = status["workers"]
            fresh = all(r["pid"] is not None and r["pid"] not in pids_before for r in rows)
            counted = all(r["restarts"] == restarts_before[r["index"]] + 1 for r in rows)
            return status["ready"] and fresh and counted and status

        status = wait_until(restarted, 60, "both killed workers to be restarted")
        for row in status["workers"]:
            assert "SIGKILL" in row["last_error"], row
        assert gone(pid_a) and gone(pid_b)
        assert probe.encode_batch(list(range(10))) == list(range(10))
        assert probe.encode("still serving") == "still serving"

        # Server-side accounting: one reply per request, no split request left behind.
        final = wait_idle(probe)
        assert answered(final) - answered(base) == total + 1 + 2  # load, held a, 2 above
        died_delta = (final["num_errors"].get("worker_died", 0)
                      - base["num_errors"].get("worker_died", 0))
        assert died_delta == died + 1
        assert final["pending_split_requests"] == 0
    finally:
        gate_a.open()
        gate_b.open()
        for client in (probe, holder, *loaders):
            client.close()


def test_every_request_of_a_killed_batch_gets_worker_died(crash_server, tmp_path):
    """A killed batch holding requests of three clients: each of them gets WorkerDied at
    once (not just the first request of the batch)."""
    release = os.path.join(str(tmp_path), "release")
    holds = [Gate(tmp_path, f"hold-{i}", release) for i in range(2)]
    victim = Gate(tmp_path, "victim")
    probe = connect(crash_server)
    holders = [connect(crash_server) for _ in holds]
    others = [connect(crash_server, timeout=5_000) for _ in range(3)]
    try:
        settled(probe, 2)
        for gate, holder in zip(holds, holders, strict=True):
            holder.encode(gate.item(gate.name), blocking=False)
            gate.wait_started()
        # Queued while both workers are held, so they leave together as one batch.
        others[0].encode(victim.item("victim"), blocking=False)
        others[1].encode("second", blocking=False)
        others[2].encode_batch(["third", "fourth"], blocking=False)
        wait_until(lambda: probe.server_status["queue_items"] == 4, 30, "4 queued items")
        batches_before = probe.server_status["num_batches"]
        holds[0].open()
        victim.wait_started()
        assert probe.server_status["num_batches"] == batches_before + 1
        (pid,) = busy_pids(probe)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        replies: list[Any] = []
        for client in others:
            try:
                replies.append(client.fetch_all(on_error="return")[0])
            except WKRTimeoutError as exc:
                replies.append(exc)
        took = time.monotonic() - killed_at
        lost = [i for i, r in enumerate(replies) if isinstance(r, WKRTimeoutError)]
        assert not lost, (f"the requests of clients {lost} (not first in the killed batch) "
                          f"got no reply at all: {replies}")
        assert all(isinstance(r, WorkerDied) for r in replies), replies
        assert took < WORKER_DIED_LIMIT_S, f"the last WorkerDied came after {took:.2f}s"
        for holder in holders:
            assert holder.fetch_all()[0]["released"] is True
        settled(probe, 2)
    finally:
        for gate in (*holds, victim):
            gate.open()
        for client in (probe, *holders, *others):
            client.close()


def test_segfault_fails_its_request_and_the_worker_is_restarted(crash_server):
    """A worker killed by SIGSEGV (as by a crash in native code) fails its request with
    WorkerDied and is replaced; the status row says it was SIGSEGV."""
    with connect(crash_server) as client:
        base = settled(client, 2)
        rows_before = {w["index"]: w for w in base["workers"]}
        with pytest.raises(WorkerDied) as info:
            client.encode({"cmd": "segv"})
        assert "died" in info.value.message

        def replaced():
            status = client.server_status
            changed = [r for r in status["workers"] if r["pid"] != rows_before[r["index"]]["pid"]]
            return (status["ready"] and len(changed) == 1 and changed[0]["pid"] is not None
                    and changed[0])

        row = wait_until(replaced, 60, "the crashed worker to be restarted")
        before = rows_before[row["index"]]
        assert row["restarts"] == before["restarts"] + 1
        assert "SIGSEGV" in row["last_error"], row
        assert gone(before["pid"])
        assert client.encode({"after": "segv"}) == {"after": "segv"}


# -- fault isolation -------------------------------------------------------------------


@pytest.mark.parametrize("poison,needle", [
    ({"cmd": "raise", "message": "poison-"}, "RuntimeError: poison-"),
    ({"cmd": "wrong_count"}, "ValueError: predict returned 2 results for 1 inputs"),
], ids=["raises", "wrong_count"])
def test_poisoned_item_fails_alone_among_63_good_ones(crash_server, tmp_path, poison, needle):
    """One bad request among 63 good ones from other clients, all in one batch of 64:
    only it gets ModelError (with type, message and traceback); the others get their
    results."""
    token = uuid.uuid4().hex
    if poison["cmd"] == "raise":
        poison = {**poison, "message": poison["message"] + token}
    release = os.path.join(str(tmp_path), "release")
    gates = [Gate(tmp_path, f"hold-{i}", release) for i in range(2)]
    probe = connect(crash_server)
    holders = [connect(crash_server) for _ in gates]
    goods = [connect(crash_server) for _ in range(7)]
    bad = connect(crash_server)
    try:
        settled(probe, 2)
        # Hold both workers so the 64 requests queue up and leave as one batch.
        for gate, holder in zip(gates, holders, strict=True):
            holder.encode(gate.item(gate.name), blocking=False)
            gate.wait_started()
        expected: list[list[Any]] = [[] for _ in goods]
        for k in range(63):
            goods[k % 7].encode({"good": k}, blocking=False)
            expected[k % 7].append({"good": k})
            if k == 31:
                bad.encode(poison, blocking=False)
        wait_until(lambda: probe.server_status["queue_items"] == 64, 30,
                   "the 64 requests to be queued")
        batches_before = probe.server_status["num_batches"]
        gates[0].open()

        for gate, holder in zip(gates, holders, strict=True):
            (held,) = holder.fetch_all()
            assert held["value"] == gate.name and held["released"] is True
        for client, want in zip(goods, expected, strict=True):
            assert client.fetch_all() == want
        (error,) = bad.fetch_all(on_error="return")
        assert isinstance(error, ModelError), error
        assert needle in error.message
        if poison["cmd"] == "raise":
            assert token in error.message
        assert "Traceback (most recent call last)" in error.traceback
        assert "predict" in error.traceback and needle.split(":")[0] in error.traceback

        status = wait_idle(probe)
        assert status["num_batches"] == batches_before + 1, "the 64 were not one batch"
    finally:
        for gate in gates:
            gate.open()
        for client in (probe, *holders, *goods, bad):
            client.close()


# -- a worker hangs --------------------------------------------------------------------


@pytest.fixture
def hang_server(tmp_path):
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "4", "-cpu",
                       "-worker_timeout", "1", "-graceful_timeout", "3")
    with running_server(args, ControlledWorker) as server:
        yield server


def test_worker_stuck_past_worker_timeout_is_killed_and_replaced(hang_server, tmp_path):
    """-worker_timeout 1: a request stuck in predict gets WorkerDied after about a second,
    its worker is killed and restarted, and the other worker serves on meanwhile."""
    gate = Gate(tmp_path, "stuck")  # never released
    with connect(hang_server) as probe, connect(hang_server) as stuck:
        base = settled(probe, 2)
        sent_at = time.monotonic()
        stuck.encode(gate.item("stuck"), blocking=False)
        gate.wait_started()
        assert probe.encode_batch(list(range(5))) == list(range(5))  # the other worker

        (error,) = stuck.fetch_all(on_error="return")
        took = time.monotonic() - sent_at
        assert isinstance(error, WorkerDied), error
        assert "worker_timeout" in error.message
        assert 0.9 <= took < 1.0 + WORKER_DIED_LIMIT_S, (
            f"WorkerDied came {took:.3f}s after sending (-worker_timeout 1)")

        def replaced():
            status = probe.server_status
            rows = {r["index"]: r for r in status["workers"]}
            row = next((r for r in rows.values() if r["restarts"]), None)
            return status["ready"] and row is not None and row["pid"] is not None and status

        status = wait_until(replaced, 60, "the hung worker to be restarted")
        (row,) = [r for r in status["workers"] if r["restarts"]]
        (other,) = [r for r in status["workers"] if not r["restarts"]]
        hung_pid = next(w["pid"] for w in base["workers"] if w["index"] == row["index"])
        assert row["restarts"] == 1 and row["pid"] != hung_pid
        assert f"pid {hung_pid}" in error.message
        assert "worker_timeout" in row["last_error"], row
        assert other["last_error"] is None and other["pid"] in {w["pid"] for w in base["workers"]}
        wait_until(lambda: gone(hung_pid), 30, "the hung worker to be killed")
        assert stuck.encode({"after": "hang"}) == {"after": "hang"}
        final = wait_idle(probe)
        assert final["num_errors"].get("worker_died") == 1


# -- the ventilator or the sink dies ---------------------------------------------------


@pytest.mark.parametrize("role", ["ventilator", "sink"])
def test_role_crash_stops_the_whole_server_and_clients_learn_at_once(tmp_path, role):
    """kill -9 of the ventilator or the sink: pending requests fail with ConnectionLost
    at once (not at their 30 s timeout), the supervisor stops everything with exit code
    1, no role process is left, both ports are closed and the IPC directory is gone."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, ControlledWorker)
    gate = Gate(tmp_path, "pending")
    client: WKRClient | None = None
    server.start()
    try:
        server.wait_ready(START_LIMIT_S)
        port, port_out, ipc = server.port, server.port_out, ipc_dir(server)
        client = connect(server, timeout=30_000)
        status = client.server_status
        pids = {"ventilator": status["ventilator_pid"], "sink": status["sink_pid"],
                **{f"worker-{w['index']}": w["pid"] for w in status["workers"]}}
        assert os.path.isdir(ipc) and not any(gone(p) for p in pids.values())

        client.encode(gate.item("pending"), blocking=False)
        gate.wait_started()
        for i in range(5):
            client.encode(i, blocking=False)
        wait_until(lambda: client.server_status["queue_items"] == 5, 30, "5 queued requests")

        killed_at = time.monotonic()
        os.kill(pids[role], signal.SIGKILL)
        replies = client.fetch_all(on_error="return")
        took = time.monotonic() - killed_at
        gate.open()  # let the held worker leave predict and stop
        assert len(replies) == 6
        assert all(isinstance(r, ConnectionLost) for r in replies), replies
        assert took < 5.0, f"ConnectionLost came {took:.2f}s after the crash (timeout 30 s)"

        server.join(STOP_LIMIT_S)
        assert not server.is_alive(), "the supervisor did not stop after the crash"
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert role in failure and "SIGKILL" in failure, failure
        wait_until(lambda: all(gone(p) for p in pids.values()), STOP_LIMIT_S,
                   "every role process to exit")
        assert port_refused(port) and port_refused(port_out), "a public port is still open"
        assert not os.path.exists(ipc), "the IPC directory was left behind"
    finally:
        gate.open()
        if client is not None:
            client.close()
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()


# -- a restarted worker cannot boot ----------------------------------------------------


def test_restarted_worker_that_fails_to_boot_halts_the_server(tmp_path):
    """After a crash, the restarted worker fails to load its model: the server halts with
    that error and exit code 1 after one attempt, instead of crash-looping."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, BootOnceWorker)
    server.start()
    try:
        server.wait_ready(START_LIMIT_S)
        port, port_out = server.port, server.port_out
        with connect(server) as client:
            status = client.server_status
            pids = [status["ventilator_pid"], status["sink_pid"],
                    *(w["pid"] for w in status["workers"])]
            with pytest.raises(WorkerDied):
                client.encode({"cmd": "die"})
        server.join(STOP_LIMIT_S)
        assert not server.is_alive(), "the server kept running without a bootable worker"
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert "worker-0" in failure and "boot-again" in failure, failure
        boots = (tmp_path / "boots-0.txt").read_text().split()
        assert len(boots) == 2, f"expected one restart attempt, saw {len(boots)} boots"
        wait_until(lambda: all(gone(p) for p in [*pids, *map(int, boots)]), STOP_LIMIT_S,
                   "every process to exit")
        assert port_refused(port) and port_refused(port_out)
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()


def test_worker_crashing_again_and_again_halts_the_server(tmp_path):
    """A worker that keeps dying (six deaths within a minute) stops the server with
    exit code 1 instead of being restarted forever; every request sent gets an error."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, ControlledWorker)
    server.start()
    pids: set[int] = set()
    try:
        server.wait_ready(START_LIMIT_S)
        with connect(server, timeout=30_000) as client:
            status = client.server_status
            roles = [status["ventilator_pid"], status["sink_pid"]]
            pids |= {w["pid"] for w in status["workers"]}
            for i in range(5):  # the restart limit: each is answered and restarted
                with pytest.raises(WorkerDied):
                    client.encode({"cmd": "die"})
                status = settled(client, 1)
                pids |= {w["pid"] for w in status["workers"]}
                assert status["workers"][0]["restarts"] == i + 1
            assert len(pids) == 6
            with pytest.raises((WorkerDied, ConnectionLost)) as info:
                client.encode({"cmd": "die"})
            # The sixth death within a minute: no restart, the whole server stops.
            server.join(STOP_LIMIT_S)
            assert not server.is_alive()
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert "worker-0" in failure and "6 times" in failure, (failure, info.value)
        wait_until(lambda: all(gone(p) for p in [*roles, *pids]), STOP_LIMIT_S,
                   "every process to exit")
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()
