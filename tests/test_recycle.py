"""Worker exits after readiness, and worker recycling (-max_requests, -max_worker_rss).

A worker that calls ``sys.exit(3)`` in predict is a crash like any other (exit code 3
is also "boot failed", which used to stop the whole server). A recycled worker finishes
its batch, a replacement loads, then it leaves: no request fails and the slot never
has fewer serving processes than before.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from helpers import connect, gone, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import PoisonInput
from wkr_serving.server.worker import WorkerProcess
from workers import LifecycleWorker

#: Bounds of the -max_requests load: rounds and seconds (a replacement takes about a
#: second to start on a busy 2-core machine, the rounds far less).
MAX_ROUNDS = 20_000
LOAD_LIMIT_S = 90.0


def worker_pids(client: Any) -> dict[int, int | None]:
    return {row["index"]: row["pid"] for row in client.server_status["workers"]}


def test_sys_exit_3_in_predict_is_a_crash_not_a_boot_failure(tmp_path):
    """exit code 3 after the worker became ready: the input is retried, then quarantined
    (PoisonInput); the server keeps serving with restarted workers."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    with running_server(args, LifecycleWorker) as server, connect(server) as client:
        first = worker_pids(client)[0]
        with pytest.raises(PoisonInput) as info:
            client.encode({"cmd": "exit", "code": 3})
        assert "exited with code 3" in info.value.message, info.value.message
        assert server.is_alive() and server.supervisor.failure is None
        assert client.encode("after") == "after"
        status = wait_idle(client)
        assert status["workers"][0]["restarts"] == 2  # one death per try
        assert status["workers"][0]["pid"] != first
        assert status["quarantined_inputs"] == 1 and status["num_poisoned"] == 1
        assert gone(first)


def test_max_requests_recycles_without_failing_a_request(tmp_path):
    """-max_requests 5 (+0..2): pipelined rounds of 10 requests on 2 workers until six
    worker processes have served (each replacement loads while the old one serves on):
    every request gets its own result, and there are never more than num_worker + 1
    worker processes."""
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "2", "-cpu",
                       "-max_requests", "5", "-max_requests_jitter", "2",
                       "-graceful_timeout", "3")
    with running_server(args, LifecycleWorker) as server, connect(server) as client:
        seen: set[int] = set()
        most = 0

        def count_workers() -> int:
            children = list(server.supervisor.children.values())
            return sum(1 for c in children if isinstance(c.role, WorkerProcess)
                       and c.process.is_alive())

        rounds = 0
        deadline = time.monotonic() + LOAD_LIMIT_S
        while len(seen) < 6 and rounds < MAX_ROUNDS and time.monotonic() < deadline:
            values = [{"round": rounds, "n": n} for n in range(10)]
            for value in values:
                client.encode(value, blocking=False)
                most = max(most, count_workers())
            assert client.fetch_all() == values
            seen |= {r["pid"] for r in client.encode_batch([{"cmd": "whoami"}] * 2)}
            rounds += 1
        assert len(seen) >= 6, f"only {len(seen)} worker processes after {rounds} rounds"
        status = wait_idle(client)
        assert status["num_errors"] == {}, status["num_errors"]
        assert most <= 3, f"{most} worker processes at once (num_worker 2, one extra)"
        assert server.supervisor.failure is None
        assert all(r["restarts"] == 0 for r in status["workers"]), status["workers"]


def test_max_worker_rss_recycles_a_growing_worker(tmp_path):
    """-max_worker_rss: a worker that grew over the limit is replaced after its batch;
    the request that made it grow still gets its answer, and the next ones are served
    by the replacement."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-max_worker_rss", "300",
                       "-graceful_timeout", "3")
    with running_server(args, LifecycleWorker) as server, connect(server) as client:
        old = client.encode({"cmd": "whoami"})["pid"]
        rss = client.encode({"cmd": "grow", "mb": 400})
        assert rss > 300

        def replaced() -> Any:
            who = client.encode({"cmd": "whoami"})
            return who["pid"] != old and who

        wait_until(replaced, 60, "the grown worker to be replaced")
        wait_until(lambda: gone(old), 30, "the grown worker to leave")
        status = wait_idle(client)
        assert status["num_errors"] == {}
        assert status["workers"][0]["restarts"] == 0
        assert server.supervisor.failure is None


def test_a_recycled_worker_killed_while_retiring_loses_nothing(tmp_path):
    """kill -9 of a worker while it is being recycled: its replacement takes the slot,
    and requests are answered (retried if it held any)."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-max_requests", "3",
                       "-graceful_timeout", "3")
    with running_server(args, LifecycleWorker) as server, connect(server) as client:
        first = client.encode({"cmd": "whoami"})["pid"]
        for n in range(3):
            assert client.encode(n) == n
        os.kill(first, signal.SIGKILL)
        results = [client.encode({"after": n}) for n in range(10)]
        assert results == [{"after": n} for n in range(10)]
        assert server.supervisor.failure is None
        assert wait_idle(client)["workers"][0]["pid"] != first


def test_a_restarted_ventilator_keeps_the_workers_history(tmp_path):
    """A worker killed, then the ventilator: the new ventilator's status still shows that
    worker's restart and last error (the supervisor hands them over)."""
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "3")
    with running_server(args, LifecycleWorker) as server, connect(server) as client:
        first = client.encode({"cmd": "whoami"})["pid"]
        os.kill(first, signal.SIGKILL)
        row = wait_until(lambda: (lambda r: r["pid"] not in (None, first) and r)(
            client.server_status["workers"][0]), 60, "the worker to be restarted")
        assert row["restarts"] == 1 and "SIGKILL" in row["last_error"]
        ventilator = client.server_status["ventilator_pid"]
        os.kill(ventilator, signal.SIGKILL)

        def new_ventilator() -> Any:
            try:
                status = client.server_status
            except Exception:  # ConnectionLost while it restarts: ask again
                return None
            return (status["ventilator_pid"] != ventilator and status["ready"]
                    and status)

        status = wait_until(new_ventilator, 60, "a new ventilator")
        (row,) = status["workers"]
        assert row["restarts"] == 1 and "SIGKILL" in row["last_error"], row
        assert status["ventilator_generation"] == 1
