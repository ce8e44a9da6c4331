"""JobQueue + QueueWorker against a real WKR server and a real redis-server.

Units run in threads (``queue_units.UnitThread``) or in spawned processes of their own
(``queue_units.unit_process``), calling get_model / do_work / off_model directly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import uuid

import numpy as np
import pytest
from helpers import Gate, running_server, server_args, wait_until
from queue_units import UnitThread, server_tuple, unit_options, unit_process
from wkr_serving.client.errors import (
    ClientUsageError,
    DeadLettered,
    JobCancelled,
    ModelError,
    PoisonInput,
    WKRTimeoutError,
)
from wkr_serving.client.helper import dumps
from wkr_serving.client.jobqueue import JobQueue
from workers import ControlledWorker

LIMIT_S = 60.0


def _name() -> str:
    return f"q{uuid.uuid4().hex[:8]}"


@pytest.fixture
def queue(redis_server):
    with JobQueue(redis_server.url, _name()) as q:
        yield q


def _units(server, queue, n=1, *extra):
    units = [UnitThread(server_tuple(server), unit_options(queue.redis_url, queue.name,
                                                           *extra), index=i)
             for i in range(n)]
    for u in units:
        u.start()
    for u in units:
        assert u.ready.wait(LIMIT_S)
    return units


def _stop(units):
    for u in units:
        u.unit.stopping.set()
    for u in units:
        u.stop()


def _raw(queue):
    return queue.redis


def test_many_jobs_in_order(obj_server, queue):
    xs = [n if n % 3 else {"n": n, "a": np.full(3, n, dtype=np.float32)} for n in range(600)]
    units = _units(obj_server, queue, 2, "-prefetch", "64")
    try:
        ids = queue.submit_many(xs)
        assert len(set(ids)) == len(ids) == 600
        out = queue.results(ids, LIMIT_S)
    finally:
        _stop(units)
    for x, y in zip(xs, out, strict=True):
        if isinstance(x, dict):
            assert y["n"] == x["n"]
            np.testing.assert_array_equal(y["a"], x["a"])
        else:
            assert y == x
    assert sum(u.unit.counters["jobs_done"] for u in units) == 600
    assert queue.stats() == {"queued": 0, "pending": 0, "dead": 0}
    details = queue.wait(ids[:5], 5)
    assert all(ok and t_done >= t_sub for ok, _, t_sub, t_done in details)
    assert queue.result(ids[1], 5) == 1  # results can be read again


def test_poisoned_input_fails_alone(obj_server, queue):
    xs = [1, 2, {"cmd": "raise", "message": "poisoned"}, 4, 5]
    units = _units(obj_server, queue)
    try:
        ids = queue.submit_many(xs)
        out = queue.results(ids, LIMIT_S, on_error="return")
        with pytest.raises(ModelError, match="poisoned"):
            queue.result(ids[2], LIMIT_S)
        with pytest.raises(ModelError):
            queue.results(ids, LIMIT_S)
    finally:
        _stop(units)
    assert out[:2] == [1, 2] and out[3:] == [4, 5]
    assert isinstance(out[2], ModelError)
    assert units[0].unit.counters["jobs_failed"] == 1


def test_timeout_and_size_limit(redis_server):
    with JobQueue(redis_server.url, _name(), max_job_bytes=100) as q:
        with pytest.raises(WKRTimeoutError, match="1 of 1 jobs"):
            q.result("no-such-job", timeout=0.3)
        with pytest.raises(ClientUsageError, match="max_job_bytes"):
            q.submit(b"x" * 200)
        with pytest.raises(ClientUsageError):
            q.submit(object())
        assert q.stats()["queued"] == 0


def test_cancel(obj_server, queue):
    job = queue.submit("never computed")
    assert queue.cancel(job) is True
    assert queue.cancel(job) is False
    with pytest.raises(JobCancelled):
        queue.result(job, 5)
    units = _units(obj_server, queue)
    try:
        later = queue.submit("computed")
        assert queue.result(later, LIMIT_S) == "computed"
        assert queue.cancel(later) is False  # it has a result
        wait_until(lambda: queue.stats()["queued"] == 0, LIMIT_S, "the cancelled job acked")
    finally:
        _stop(units)
    with pytest.raises(JobCancelled):
        queue.result(job, 5)
    assert units[0].unit.counters["jobs_done"] == 1


def test_duplicate_delivery_one_result(obj_server, queue, tmp_path):
    """Two units computing the same job (the second took it over with XCLAIM): both
    results are computed, the first written wins, the caller sees only that one."""
    gate = Gate(tmp_path, "dup")
    opts = unit_options(queue.redis_url, queue.name)
    a = UnitThread(server_tuple(obj_server), opts, 0)
    b = UnitThread(server_tuple(obj_server), opts, 1)
    ma = a.unit.get_model(*a.unit.server)
    mb = b.unit.get_model(*b.unit.server)
    import logging
    import threading

    log = logging.getLogger("test")
    try:
        job = queue.submit(gate.item("v"))
        entries = a.unit._read_new(ma)
        assert len(entries) == 1
        claimed = mb.redis.xclaim(queue.keys.stream, queue.keys.group, mb.consumer, 0,
                                  [entries[0].sid])
        assert len(claimed) == 1
        ta = threading.Thread(target=a.unit._handle, args=(ma, entries, log))
        ta.start()
        gate.wait_started()
        tb = threading.Thread(target=b.unit._handle,
                              args=(mb, b.unit._with_deliveries(mb, claimed), log))
        tb.start()
        wait_until(lambda: mb.client is not None and mb.client.num_requests >= 1, LIMIT_S,
                   "the second unit to send the job")
        gate.open()
        ta.join(LIMIT_S)
        tb.join(LIMIT_S)
        assert not ta.is_alive() and not tb.is_alive()
        result = queue.result(job, 5)
        assert result["value"] == "v" and result["released"] is True
        counters = a.unit.counters + b.unit.counters
        assert counters["jobs_done"] == 2
        assert counters["duplicate_results"] == 1
        assert queue.result(job, 5) == result
        assert queue.stats() == {"queued": 0, "pending": 0, "dead": 0}
    finally:
        gate.open()
        a.unit.off_model(ma)
        b.unit.off_model(mb)


def test_malformed_entries_dead_lettered(obj_server, queue):
    raw = _raw(queue)
    units = _units(obj_server, queue, 1, "-max_job_bytes", "1000")
    try:
        good = queue.submit_many(list(range(20)))
        stream = queue.keys.stream
        raw.xadd(stream, {"id": "no-input"})
        raw.xadd(stream, {"x": dumps(1)})  # no id
        raw.xadd(stream, {"id": "garbage", "x": b"\xc1\xc1\xc1"})
        raw.xadd(stream, {"id": "huge", "x": dumps(b"y" * 5000)})
        raw.xadd(stream, {"id": "bad-ext", "x": b"\xd4\x07\x00"})
        more = queue.submit_many(list(range(20, 40)))
        assert queue.results(good + more, LIMIT_S) == list(range(40))
        for job in ("no-input", "garbage", "huge", "bad-ext"):
            with pytest.raises(DeadLettered):
                queue.result(job, LIMIT_S)
        wait_until(lambda: queue.stats()["dead"] == 5, LIMIT_S, "5 dead letters")
    finally:
        _stop(units)
    dead = queue.dead_letters()
    assert {d["job_id"] for d in dead} == {"no-input", None, "garbage", "huge", "bad-ext"}
    assert any("max_job_bytes" in d["error"] for d in dead)
    assert units[0].unit.counters["dead_lettered"] == 5
    assert queue.stats() == {"queued": 0, "pending": 0, "dead": 5}


def test_unit_killed_jobs_reclaimed(obj_server, queue, tmp_path):
    """kill -9 of a unit process holding jobs: another unit reclaims them after
    -claim_after, and every job ends with exactly one result."""
    gate = Gate(tmp_path, "kill")
    argv = ["-redis_url", queue.redis_url, "-queue", queue.name, "-claim_after", "1",
            "-prefetch", "32"]
    ctx = mp.get_context("spawn")
    ready, stop = str(tmp_path / "ready"), str(tmp_path / "stop")
    xs = [gate.item("first"), *range(1, 30)]
    ids = queue.submit_many(xs)  # all queued before the unit reads: it takes all 30
    proc = ctx.Process(target=unit_process,
                       args=(server_tuple(obj_server), argv, ready, stop, 0), daemon=True)
    proc.start()
    survivor = None
    try:
        gate.wait_started()  # the unit process holds the jobs, waiting for the first
        assert queue.stats()["pending"] == 30
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(LIMIT_S)
        gate.open()
        survivor = _units(obj_server, queue, 1, "-claim_after", "1")[0]
        out = queue.results(ids, LIMIT_S)
        assert out[0]["value"] == "first" and out[1:] == list(range(1, 30))
        assert survivor.unit.counters["reclaimed"] == 30
        assert queue.stats() == {"queued": 0, "pending": 0, "dead": 0}
        keys = [queue.keys.result(j) for j in ids]
        assert all(v is not None for v in queue.redis.mget(keys))
    finally:
        gate.open()
        if proc.is_alive():
            proc.kill()
            proc.join(LIMIT_S)
        if survivor is not None:
            _stop([survivor])


def test_redis_restart_mid_run(obj_server, redis_server):
    """redis-server restarted (append-only file on) while units work: every job
    finishes, each with its own result."""
    name = _name()
    with JobQueue(redis_server.url, name) as queue:
        units = _units(obj_server, queue, 2, "-prefetch", "16")
        try:
            ids = queue.submit_many(list(range(3000)))
            wait_until(lambda: queue.redis.xlen(queue.keys.stream) < 2500, LIMIT_S,
                       "some jobs done")
            redis_server.restart()
            out = queue.results(ids, LIMIT_S)
        finally:
            _stop(units)
        assert out == list(range(3000))
        assert sum(u.unit.counters["redis_errors"] for u in units) >= 1
        assert sum(u.unit.counters["jobs_done"] for u in units) >= 3000


def test_attempts_exhausted_dead_lettered(queue, tmp_path_factory, tmp_path):
    """A job whose worker hangs past -worker_timeout every time (WorkerDied, transient)
    is retried, then dead-lettered after -max_attempts deliveries with an error result;
    the jobs batched with it still succeed."""
    args = server_args(tmp_path_factory.mktemp("hang_model"), "-protocol", "obj",
                       "-num_worker", "1", "-batch_size", "8", "-cpu", "-worker_timeout", "1")
    hang = Gate(tmp_path, "hang")  # never released: each delivery hangs its worker
    with running_server(args, ControlledWorker) as server:
        units = _units(server, queue, 1, "-max_attempts", "2", "-claim_after", "30")
        try:
            ids = queue.submit_many([1, 2, hang.item("hang"), 4])
            out = queue.results(ids, LIMIT_S, on_error="return")
        finally:
            hang.open()
            _stop(units)
    assert out[:2] == [1, 2] and out[3] == 4
    assert isinstance(out[2], DeadLettered)
    assert "WorkerDied" in str(out[2]) and "delivered 3 times" in str(out[2])
    assert queue.stats() == {"queued": 0, "pending": 0, "dead": 1}


def test_a_job_that_kills_its_worker_gets_poison_input_at_once(queue, tmp_path_factory):
    """A job whose input kills the server's worker: the server retries it alone, then
    quarantines it (PoisonInput), which is the job's result (permanent: not delivered
    again, not dead-lettered); the jobs batched with it still succeed."""
    args = server_args(tmp_path_factory.mktemp("die_model"), "-protocol", "obj",
                       "-num_worker", "1", "-batch_size", "8", "-cpu")
    with running_server(args, ControlledWorker) as server:
        units = _units(server, queue, 1, "-max_attempts", "2", "-claim_after", "30")
        try:
            ids = queue.submit_many([1, 2, {"cmd": "die"}, 4])
            out = queue.results(ids, LIMIT_S, on_error="return")
        finally:
            _stop(units)
    assert out[:2] == [1, 2] and out[3] == 4
    assert isinstance(out[2], PoisonInput), out[2]
    assert queue.stats() == {"queued": 0, "pending": 0, "dead": 0}


def test_server_stopped_jobs_finish_on_another(queue, tmp_path_factory):
    """The server of unit A stops: A's jobs stay pending (transient), A takes no new
    work while its server is unreachable, and unit B of a second server reclaims
    them: every job finishes."""
    flags = ("-protocol", "obj", "-num_worker", "1", "-batch_size", "8", "-cpu")
    args_a = server_args(tmp_path_factory.mktemp("model_a"), *flags)
    args_b = server_args(tmp_path_factory.mktemp("model_b"), *flags)
    with running_server(args_a, ControlledWorker) as server_a:
        unit_a = _units(server_a, queue, 1, "-claim_after", "1", "-job_timeout", "5000")[0]
        try:
            assert queue.result(queue.submit("warm"), LIMIT_S) == "warm"
            server_a.close(30)
            ids = queue.submit_many(list(range(50)))
            wait_until(lambda: unit_a.unit.counters["transient_errors"] >= 1, LIMIT_S,
                       "unit A to fail transiently")
            with running_server(args_b, ControlledWorker) as server_b:
                unit_b = _units(server_b, queue, 1, "-claim_after", "1")[0]
                try:
                    assert queue.results(ids, LIMIT_S) == list(range(50))
                finally:
                    _stop([unit_b])
        finally:
            _stop([unit_a])
    assert unit_a.unit.counters["jobs_done"] == 1  # only the warm-up job
    assert unit_b.unit.counters["jobs_done"] == 50
    assert unit_b.unit.counters["reclaimed"] == unit_a.unit.counters["transient_errors"]
    assert queue.stats() == {"queued": 0, "pending": 0, "dead": 0}
