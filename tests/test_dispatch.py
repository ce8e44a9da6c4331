"""How the server dispatches: no batching delay when idle, spreading over idle workers."""

from __future__ import annotations

import os
import time

import numpy as np
from helpers import connect, running_server, server_args, wait_idle, wait_until
from workers import EchoWorker, touch, wait_for_file


def test_lone_request_on_idle_server_pays_no_group_timeout(tmp_path):
    """-batch_group_timeout 5000 ms only fills batches while workers are busy."""
    args = server_args(tmp_path, "-batch_group_timeout", "5000", "-batch_size", "8",
                       "-protocol", "numpy")
    with running_server(args, EchoWorker) as server, connect(server) as client:
        x = np.arange(4, dtype=np.float32)
        client.encode(x)  # warm up the path once
        for i in range(3):
            started = time.monotonic()
            got = client.encode(x + i)
            elapsed = time.monotonic() - started
            np.testing.assert_array_equal(got, x + i)
            assert elapsed < 1.0, f"a lone request took {elapsed:.2f}s with an idle server"
        status = client.server_status
        assert status["config"]["batch_group_timeout"] == 5000
        assert status["batch_size"]["counts"] == {"1": 4}


def test_request_goes_to_the_idle_worker_while_the_other_is_busy(obj_server, tmp_path):
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with connect(obj_server) as blocker, connect(obj_server) as other:
        status = wait_idle(other)
        pids = {w["pid"] for w in status["workers"]}
        assert len(pids) == 2
        try:
            blocked_id = blocker.encode({"cmd": "block", "started": started,
                                         "release": release, "value": "slow"},
                                        blocking=False)
            assert wait_for_file(started, 20), "the blocking request never reached a worker"
            # One worker is stuck in predict; the other must serve this, and quickly.
            served = other.encode({"cmd": "pid", "value": "fast"}, timeout=10_000)
            assert served["value"] == "fast"
            assert served["pid"] in pids
            assert not os.path.exists(release)
            # The serving worker's READY may reach the ventilator a moment after its
            # result reached us: wait (bounded) for the snapshot to show it idle again.
            blocked_pid = list(pids - {served["pid"]})

            def only_blocked_busy():
                status = other.server_status
                busy = [w["pid"] for w in status["workers"] if w["state"] == "busy"]
                return status if busy == blocked_pid else None

            during = wait_until(only_blocked_busy, 20, "only the blocked worker to be busy")
            assert during["in_flight_items"] == 1
        finally:
            touch(release)
        responses = list(blocker.fetch())
        assert [r.id for r in responses] == [blocked_id]
        slow = responses[0].embedding
        assert slow["value"] == "slow" and slow["released"] is True
        assert slow["pid"] in pids and slow["pid"] != served["pid"]
