"""Supervision and fault isolation, with real processes and real signals.

A worker that dies while holding a batch (SIGKILL, SIGSEGV, any exit code) is restarted,
and every item of its batch is retried once, alone, on a live worker: the requests of a
batch killed from outside get their results. An input present at two deaths is
quarantined: its request, and any later one carrying it, get ``PoisonInput`` without
reaching a worker again. A worker stuck past ``-worker_timeout`` fails its batch with
``WorkerDied`` at once (no retry). A killed ventilator or sink is started again on the
same port while the workers stay loaded: the requests outstanding at that moment fail
with ``ConnectionLost`` at once, and the same clients then carry on. Deaths with
requests in hand never stop the server; it halts (exit code 1, saying why) only when a
restarted worker cannot boot three times in a row, when workers die idle more than five
times in a minute, or when the ventilator dies more than five times in a minute. A
poisoned item fails alone among 63 good ones of its batch.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
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
    PoisonInput,
    ShuttingDown,
    WKRClient,
    WKRTimeoutError,
    WorkerDied,
)
from wkr_serving.server import WKRServer
from wkr_serving.server.supervisor import MAX_BOOT_FAILURES, MAX_RESTARTS
from workers import (
    IDLE_DEATH_CODE,
    BootOnceWorker,
    ControlledWorker,
    CrashWorker,
    DyingWorker,
    IdleDeathWorker,
    touch,
)

#: Loader threads must finish well within the test timeout.
LOAD_LIMIT_S = 90.0
#: The issue asks for WorkerDied "within a second"; asserted with headroom for a loaded
#: 2-core machine, and the measured time is shown in the message.
WORKER_DIED_LIMIT_S = 3.0
#: Seconds within which the items of a killed batch, retried on a worker that is already
#: up, are all answered (no wait for the replacement's boot; headroom for 2 cores).
RETRY_LIMIT_S = 3.0
#: Seconds within which requests outstanding at a role's crash fail with ConnectionLost
#: (their call timeout is 30 s).
LOST_LIMIT_S = 5.0
#: Longest wait for a killed process to be gone, or for a restarted one to be serving.
DEATH_LIMIT_S = 30.0
RESTART_LIMIT_S = 60.0


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


def reaped(pid: int) -> bool:
    """Whether the supervisor has reaped process ``pid``. Stronger than ``gone``: the
    main thread of a killed process is a zombie while its other threads (ZeroMQ's) still
    exit, and until they have, its sockets, its listening port included, stay open."""
    return not psutil.pid_exists(pid)


def kill_and_wait(pid: int) -> None:
    """kill -9 ``pid`` and wait (bounded) until the process has ended and been reaped:
    its sockets are closed."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: reaped(pid), DEATH_LIMIT_S, f"pid {pid} to end")


def restarts_reached(client: WKRClient, total: int) -> dict[str, Any] | None:
    """The status once every slot has a registered worker and the slots' restarts add up
    to ``total`` (None before)."""
    status = client.server_status
    rows = status["workers"]
    up = status["ready"] and all(r["pid"] is not None for r in rows)
    return status if up and sum(r["restarts"] for r in rows) == total else None


def fresh_status(server: WKRServer) -> dict[str, Any]:
    """The status, read by a new client once the server is ready again (its handshake
    waits, bounded, for a role that is being restarted)."""
    with connect(server, connect_timeout=30_000) as client:
        return wait_until(lambda: (s := client.server_status)["ready"] and s,
                          RESTART_LIMIT_S, "the server to be ready again")


# -- a worker dies ---------------------------------------------------------------------

#: -batch_size of crash_server.
CRASH_BATCH_SIZE = 64


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory):
    """CrashWorker, protocol obj, 2 workers, batch_size 64. Tests here kill its workers
    and wait until both are back before they start; what they quarantine is their own."""
    args = server_args(tmp_path_factory.mktemp("crash_model"), "-num_worker", "2",
                       "-batch_size", str(CRASH_BATCH_SIZE), "-cpu", "-graceful_timeout", "3")
    with running_server(args, CrashWorker) as server:
        yield server


def test_kill_9_under_load_every_request_gets_its_own_result(crash_server, tmp_path):
    """Both workers are killed with SIGKILL while holding batches, during a pipelined load
    of 4000 requests from four clients: every item of the killed batches is retried alone
    on a live worker, so every request gets exactly one reply, its own result (none lost,
    no WorkerDied); both workers are restarted and serving goes on across the kills."""
    per_client, n_loaders = 1000, 4
    probe = connect(crash_server)
    holder = connect(crash_server, timeout=60_000)
    loaders = [connect(crash_server, timeout=60_000) for _ in range(n_loaders)]
    gate_a, gate_b = Gate(tmp_path, "hold-a"), Gate(tmp_path, "hold-b")
    try:
        base = settled(probe, 2)
        restarts_before = {w["index"]: w["restarts"] for w in base["workers"]}
        pids_before = {w["pid"] for w in base["workers"]}

        # Worker A holds a request alone; a thread waits for its reply.
        held: dict[str, Any] = {}

        def hold() -> None:
            try:
                held["value"] = holder.encode(gate_a.item("a"))
            except Exception as exc:  # reported below
                held["error"] = exc

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
                status = probe.server_status
                busy = {w["pid"] for w in status["workers"] if w["state"] == "busy"}
                assert pid_a in busy and len(busy) == 2, busy
                (pid_b,) = busy - {pid_a}
                # Both workers are held in their gates: what they hold now stays theirs
                # until they die, and with a credit of two batches each may still be
                # given one more batch before it is killed.
                killed_items = status["in_flight_items"]

                # A dies holding gate A's request: it is retried on A's replacement (B is
                # held), so the gate opens once A is gone, not before.
                kill_and_wait(pid_a)
                gate_a.open()
                holder_thread.join(RESTART_LIMIT_S)
                assert not holder_thread.is_alive(), "the held request got no reply"
                kill_and_wait(pid_b)
                gate_b.open()
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

        assert "error" not in held, f"the held request of the killed worker failed: {held}"
        assert held["value"]["value"] == "a" and held["value"]["released"] is True, held
        assert held["value"]["pid"] not in pids_before, (
            f"the retry of A's request must run on A's replacement (B was held): {held}")
        for sent, replies in outcomes:
            assert len(replies) == len(sent)
            for (kind, value), reply in zip(sent, replies, strict=True):
                if kind == "held":
                    assert isinstance(reply, dict) and reply["value"] == "b", reply
                    assert reply["released"] is True and reply["pid"] != pid_b, reply
                else:
                    assert reply == value, f"a request did not get its own result: {reply!r}"
        total = sum(len(sent) for sent, _ in outcomes)

        # Both restarted once more, with new processes, and the status says why.
        def restarted():
            status = probe.server_status
            rows = status["workers"]
            fresh = all(r["pid"] is not None and r["pid"] not in pids_before for r in rows)
            counted = all(r["restarts"] == restarts_before[r["index"]] + 1 for r in rows)
            return status["ready"] and fresh and counted and status

        status = wait_until(restarted, RESTART_LIMIT_S, "both killed workers to be restarted")
        for row in status["workers"]:
            assert "SIGKILL" in row["last_error"], row
        assert probe.encode_batch(list(range(10))) == list(range(10))
        assert probe.encode("still serving") == "still serving"

        # Server-side accounting: one result per request, each killed item retried once,
        # nothing quarantined, no split request left behind.
        final = wait_idle(probe)
        assert final["num_results"] - base["num_results"] == total + 1 + 2
        assert final["num_errors"] == base["num_errors"], final["num_errors"]
        retried = final["num_retried_items"] - base["num_retried_items"]
        assert killed_items <= retried <= killed_items + 2 * CRASH_BATCH_SIZE, (
            retried, killed_items)
        assert final["num_poisoned"] == base["num_poisoned"]
        assert final["quarantined_inputs"] == base["quarantined_inputs"]
        assert final["pending_split_requests"] == 0
    finally:
        gate_a.open()
        gate_b.open()
        for client in (probe, holder, *loaders):
            client.close()


def test_every_request_of_a_killed_batch_gets_its_result_by_retry(crash_server, tmp_path):
    """A batch holding requests of three clients is killed with SIGKILL: each of its four
    items is retried alone (four batches of one) on the worker that is still up, at once
    rather than after the replacement boots, and each client gets its own result (not
    just the first request of the batch)."""
    release = os.path.join(str(tmp_path), "release")
    holds = [Gate(tmp_path, f"hold-{i}", release) for i in range(2)]
    victim = Gate(tmp_path, "victim")
    probe = connect(crash_server)
    holders = [connect(crash_server) for _ in holds]
    others = [connect(crash_server, timeout=10_000) for _ in range(3)]
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
        status = probe.server_status
        assert status["num_batches"] == batches_before + 1
        (pid,) = busy_pids(probe)
        (survivor,) = {w["pid"] for w in status["workers"]} - {pid}
        killed_at = time.monotonic()
        kill_and_wait(pid)
        victim.open()  # the victim's retry blocks in its gate again until then
        replies: list[Any] = []
        for client in others:
            try:
                replies.append(client.fetch_all(on_error="return")[0])
            except WKRTimeoutError as exc:
                replies.append(exc)
        took = time.monotonic() - killed_at
        lost = [i for i, r in enumerate(replies) if isinstance(r, WKRTimeoutError)]
        assert not lost, (f"the requests of clients {lost} of the killed batch got no reply "
                          f"at all: {replies}")
        assert replies[1:] == ["second", ["third", "fourth"]], replies
        first = replies[0]
        assert isinstance(first, dict) and first["value"] == "victim", replies
        assert first["released"] is True and first["pid"] == survivor, (
            f"the retry should run on the worker that was up (pid {survivor}): {first}")
        assert took < RETRY_LIMIT_S, f"the last retried request was answered after {took:.2f}s"
        for holder in holders:
            assert holder.fetch_all()[0]["released"] is True
        final = settled(probe, 2)
        assert final["num_retried_items"] - status["num_retried_items"] == 4
        assert final["num_batches"] == batches_before + 1 + 4, "the retried items went together"
        assert final["num_errors"] == status["num_errors"], final["num_errors"]
    finally:
        for gate in (*holds, victim):
            gate.open()
        for client in (probe, *holders, *others):
            client.close()


def test_segfault_input_is_quarantined_after_two_deaths(crash_server):
    """An input whose worker is killed by SIGSEGV (as by a crash in native code): the
    worker is replaced, the input is retried alone on the other worker, kills it too, and
    its request gets PoisonInput; both status rows say SIGSEGV. Sent again, it gets
    PoisonInput at once, without reaching a worker (no new death, no batch); the server
    serves on."""
    segv = {"cmd": "segv", "token": uuid.uuid4().hex}  # this test's own input
    with connect(crash_server) as client:
        base = settled(client, 2)
        rows_before = {w["index"]: w for w in base["workers"]}
        with pytest.raises(PoisonInput) as info:
            client.encode(segv)
        assert info.value.code == "poison_input" and "quarantined" in info.value.message

        def replaced():
            status = client.server_status
            rows = status["workers"]
            done = all(r["pid"] is not None and r["pid"] != rows_before[r["index"]]["pid"]
                       and r["restarts"] == rows_before[r["index"]]["restarts"] + 1
                       for r in rows)
            return status["ready"] and done

        wait_until(replaced, RESTART_LIMIT_S, "both crashed workers to be restarted")
        status = settled(client, 2)
        for row in status["workers"]:
            assert "SIGSEGV" in row["last_error"], row
        assert all(gone(r["pid"]) for r in rows_before.values())
        assert status["num_retried_items"] - base["num_retried_items"] == 1
        assert status["num_poisoned"] - base["num_poisoned"] == 1
        assert status["quarantined_inputs"] - base["quarantined_inputs"] == 1

        with pytest.raises(PoisonInput) as again:
            client.encode(segv)
        assert "quarantined" in again.value.message
        after = wait_idle(client)
        assert ([(r["pid"], r["restarts"]) for r in after["workers"]]
                == [(r["pid"], r["restarts"]) for r in status["workers"]]), "a worker died"
        assert after["num_batches"] == status["num_batches"], "it reached a worker"
        assert after["num_poisoned"] - base["num_poisoned"] == 2
        assert after["quarantined_inputs"] == status["quarantined_inputs"]
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
def test_killed_role_is_restarted_on_its_port_and_clients_carry_on(tmp_path, role):
    """kill -9 of the ventilator or the sink: the requests outstanding at that moment fail
    with ConnectionLost at once (not at their 30 s timeout); the supervisor starts the
    role again on the same port while the worker stays loaded (same pid, no restart, its
    held batch finished); the same client objects, the one that had requests pending and
    one that was idle, work again."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    gate = Gate(tmp_path, "pending")
    with running_server(args, ControlledWorker) as server:
        pending = connect(server, timeout=30_000)
        idle = connect(server, timeout=10_000)
        try:
            before = settled(pending, 1)
            (worker,) = before["workers"]
            role_pid = before[f"{role}_pid"]
            other = "sink" if role == "ventilator" else "ventilator"

            pending.encode(gate.item("pending"), blocking=False)
            gate.wait_started()
            for i in range(5):
                pending.encode(i, blocking=False)
            wait_until(lambda: pending.server_status["queue_items"] == 5, 30,
                       "5 queued requests")

            killed_at = time.monotonic()
            os.kill(role_pid, signal.SIGKILL)
            replies = pending.fetch_all(on_error="return")
            took = time.monotonic() - killed_at
            gate.open()  # the worker finishes its batch (for no one) and serves on
            assert len(replies) == 6
            assert all(isinstance(r, ConnectionLost) for r in replies), replies
            assert took < LOST_LIMIT_S, (
                f"ConnectionLost came {took:.2f}s after the crash (timeout 30 s)")

            # Until then the dying role's port may still take a connection, and drop it.
            wait_until(lambda: reaped(role_pid), DEATH_LIMIT_S, f"the killed {role} to end")
            status = fresh_status(server)  # on the same ports
            assert server.is_alive() and server.supervisor.failure is None
            assert status[f"{role}_pid"] not in (None, role_pid) and not gone(
                status[f"{role}_pid"]), status
            assert status[f"{other}_pid"] == before[f"{other}_pid"]
            assert status["supervisor_pid"] == before["supervisor_pid"]
            assert status["ventilator_generation"] == (1 if role == "ventilator" else 0)
            (row,) = status["workers"]
            assert (row["pid"], row["restarts"], row["last_error"]) == (
                worker["pid"], 0, None), f"the worker was restarted: {row}"

            # The same client objects carry on (the client redoes its handshake).
            try:
                assert pending.encode("again", timeout=10_000) == "again"
                assert idle.encode_batch([1, 2, 3]) == [1, 2, 3]
                assert pending.encode({"cmd": "pid"})["pid"] == worker["pid"]
            except (ConnectionLost, WKRTimeoutError) as exc:
                raise AssertionError(f"a client of the crashed {role} did not recover: "
                                     f"{type(exc).__name__}: {exc}") from exc
            assert wait_idle(idle)["workers"][0]["pid"] == worker["pid"]
        finally:
            gate.open()
            pending.close()
            idle.close()


def test_ventilator_dying_six_times_in_a_minute_halts_the_server(tmp_path):
    """The ventilator is killed five times and restarted each time (same ports, workers
    kept); the sixth death within a minute stops the server with exit code 1 and a
    failure naming the ventilator, and no process or port is left."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, ControlledWorker)
    server.start()
    ventilators: list[int] = []
    try:
        server.wait_ready(START_LIMIT_S)
        port, port_out = server.port, server.port_out
        status = fresh_status(server)
        sink, worker = status["sink_pid"], status["workers"][0]["pid"]
        for generation in range(1, MAX_RESTARTS + 1):
            ventilators.append(status["ventilator_pid"])
            kill_and_wait(ventilators[-1])
            status = fresh_status(server)
            assert status["ventilator_generation"] == generation, status
            assert status["ventilator_pid"] not in ventilators
            assert (status["sink_pid"], status["workers"][0]["pid"]) == (sink, worker)
        ventilators.append(status["ventilator_pid"])
        os.kill(ventilators[-1], signal.SIGKILL)
        server.join(STOP_LIMIT_S)
        assert not server.is_alive(), "the server kept restarting a dying ventilator"
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert "ventilator" in failure and f"{MAX_RESTARTS + 1} times" in failure, failure
        wait_until(lambda: all(gone(p) for p in [*ventilators, sink, worker]),
                   STOP_LIMIT_S, "every process to exit")
        assert port_refused(port) and port_refused(port_out), "a public port is still open"
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()


# -- the server halts ------------------------------------------------------------------


def test_restarted_worker_that_fails_to_boot_halts_the_server(tmp_path):
    """A worker dies with a request in hand and its restarted process cannot load the
    model: the slot is started again until it failed to boot MAX_BOOT_FAILURES (3) times
    in a row, then the server halts with that error and exit code 1 instead of
    crash-looping. The dead worker's request is answered (ShuttingDown, or ConnectionLost
    if the sink went first), never lost."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, BootOnceWorker)
    server.start()
    try:
        server.wait_ready(START_LIMIT_S)
        port, port_out = server.port, server.port_out
        with connect(server, timeout=60_000) as client:
            status = client.server_status
            pids = [status["ventilator_pid"], status["sink_pid"],
                    *(w["pid"] for w in status["workers"])]
            with pytest.raises((ShuttingDown, ConnectionLost)):
                client.encode({"cmd": "die"})
        server.join(STOP_LIMIT_S)
        assert not server.is_alive(), "the server kept running without a bootable worker"
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert "worker-0" in failure and "boot-again" in failure, failure
        assert f"{MAX_BOOT_FAILURES} times" in failure, failure
        boots = (tmp_path / "boots-0.txt").read_text().split()
        assert len(boots) == 1 + MAX_BOOT_FAILURES, (
            f"expected the first boot and {MAX_BOOT_FAILURES} restarts, saw {len(boots)} boots")
        wait_until(lambda: all(gone(p) for p in [*pids, *map(int, boots)]), STOP_LIMIT_S,
                   "every process to exit")
        assert port_refused(port) and port_refused(port_out)
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()


#: Six ways a worker dies while holding a batch: (the input, what its status row says).
DEATHS = [
    ({"cmd": "die"}, "exited with code 13"),  # os._exit(13)
    ({"cmd": "signal", "signal": "SIGSEGV"}, "SIGSEGV"),
    ({"cmd": "exit", "code": 3}, "exited with code 3"),  # sys.exit: the boot-failure code
    ({"cmd": "exit_now", "code": 0}, "exited with code 0"),  # os._exit(0), no cleanup
    ({"cmd": "signal", "signal": "SIGKILL"}, "SIGKILL"),
    ({"cmd": "signal", "signal": "SIGUSR1"}, "SIGUSR1"),
]


def test_inputs_killing_workers_six_ways_are_quarantined_and_the_server_serves_on(tmp_path):
    """Six different inputs that each kill the worker computing them (exit codes 13, 3
    and 0, SIGSEGV, SIGKILL, SIGUSR1): each kills two workers (in its batch, then alone)
    and gets PoisonInput. Twelve deaths within a minute, all with a request in hand, do
    not stop the server, which serves an innocent request after. Sent again, each is
    refused at once without reaching a worker."""
    args = server_args(tmp_path, "-num_worker", "2", "-cpu", "-graceful_timeout", "3")
    with running_server(args, DyingWorker) as server, \
            connect(server, timeout=30_000) as client:
        status = settled(client, 2)
        pids = {w["pid"] for w in status["workers"]}
        for n, (crash, why) in enumerate(DEATHS, 1):
            before = {r["index"]: r["restarts"] for r in status["workers"]}
            with pytest.raises(PoisonInput):
                client.encode(crash)
            wait_until(functools.partial(restarts_reached, client, 2 * n), RESTART_LIMIT_S,
                       f"the two workers killed by {crash} to be restarted")
            status = settled(client, 2)
            died = [r for r in status["workers"] if r["restarts"] != before[r["index"]]]
            assert died and all(why in r["last_error"] for r in died), (crash, status["workers"])
            pids |= {r["pid"] for r in status["workers"]}
            assert server.is_alive() and server.supervisor.failure is None
        assert len(pids) == 2 + 2 * len(DEATHS), "every death must start a new process"
        assert client.encode("innocent") == "innocent"
        status = wait_idle(client)
        assert status["quarantined_inputs"] == len(DEATHS)
        assert status["num_poisoned"] == len(DEATHS)
        assert status["num_retried_items"] == len(DEATHS)
        assert status["num_errors"].get("poison_input") == len(DEATHS)
        assert not status["num_errors"].get("worker_died"), status["num_errors"]

        for crash, _ in DEATHS:
            with pytest.raises(PoisonInput):
                client.encode(crash)
        after = wait_idle(client)
        assert ([(r["pid"], r["restarts"]) for r in after["workers"]]
                == [(r["pid"], r["restarts"]) for r in status["workers"]]), "a worker died"
        assert after["num_batches"] == status["num_batches"], "a quarantined input was computed"
        assert after["num_poisoned"] == 2 * len(DEATHS)
        assert client.encode_batch(["still", "serving"]) == ["still", "serving"]


def registered_after(client: WKRClient, restarts: int, seen: list[int]) -> dict[str, Any] | None:
    """The one worker's status row once a process not in ``seen`` is registered in its
    slot after ``restarts`` restarts (None before)."""
    (row,) = client.server_status["workers"]
    ok = row["pid"] is not None and row["pid"] not in seen and row["restarts"] == restarts
    return row if ok else None


def test_workers_dying_idle_again_and_again_halt_the_server(tmp_path):
    """A worker that dies with no request in hand (a broken environment, not an input) is
    restarted five times; the sixth such death within a minute stops the server with
    exit code 1 and a failure saying so, and no process is left."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    server = WKRServer(args, IdleDeathWorker)
    server.start()
    workers: list[int] = []
    try:
        server.wait_ready(START_LIMIT_S)
        port, port_out = server.port, server.port_out
        with connect(server) as client:
            status = client.server_status
            roles = [status["ventilator_pid"], status["sink_pid"]]
            for death in range(MAX_RESTARTS + 1):
                row = wait_until(functools.partial(registered_after, client, death, workers),
                                 RESTART_LIMIT_S, f"worker process #{death + 1} to be up")
                if death:
                    assert f"exited with code {IDLE_DEATH_CODE}" in row["last_error"], row
                    assert server.is_alive()
                workers.append(row["pid"])
                touch(os.path.join(str(tmp_path), f"die-{row['pid']}"))
                wait_until(functools.partial(gone, row["pid"]), DEATH_LIMIT_S,
                           "the worker to die idle")
            server.join(STOP_LIMIT_S)
        assert not server.is_alive(), "the server kept restarting workers that die idle"
        assert server.exit_code == 1
        failure = server.supervisor.failure or ""
        assert f"{MAX_RESTARTS + 1} times" in failure and "no request in hand" in failure, (
            failure)
        wait_until(lambda: all(gone(p) for p in [*roles, *workers]), STOP_LIMIT_S,
                   "every process to exit")
        assert port_refused(port) and port_refused(port_out)
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()
