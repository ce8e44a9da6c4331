"""Fault tests of the whole pool under load (issue 8): ``wkr-decentral-start
wkr_serving.client.QueueWorker`` draining a real redis-server into real
``wkr-serving-start`` servers while processes are killed, Redis restarts, the server
list is switched and garbage is written into the stream. Every job must end with
exactly one result, its own (EchoWorker returns each input), and none may be lost.
"""

from __future__ import annotations

import os
import signal

import numpy as np
from helpers import wait_until
from poolhelp import servers_arg
from wkr_serving.client import JobQueue
from wkr_serving.client.jobqueue import QueueKeys

SERVER = ["workers.EchoWorker", "-protocol", "numpy", "-cpu", "-num_worker", "1",
          "-batch_size", "64"]
#: Jobs per test: enough that the fault lands while units hold jobs.
N_JOBS = 3000
RESULT_LIMIT_S = 180.0


def _inputs(n: int = N_JOBS) -> list[np.ndarray]:
    return [np.full(4, i, dtype=np.float32) for i in range(n)]


def _queue_pool(pools, redis_server, queue: str, *servers, units: int = 2, extra=()):
    return pools("wkr_serving.client.QueueWorker", "-redis_url", redis_server.url,
                 "-queue", queue, "-remote_servers", servers_arg(*servers), "-num_client",
                 str(units), "-claim_after", "1", "-restart_backoff", "0.1",
                 "-max_attempts", "10", *extra)


def _done(pool) -> int:
    return sum(u["counters"].get("jobs_done", 0) for u in pool.status()["units"])


def _check_all(jq: JobQueue, ids: list[str], xs: list[np.ndarray]) -> None:
    results = jq.results(ids, timeout=RESULT_LIMIT_S)
    assert len(results) == len(xs)
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(np.asarray(r), x)
    stats = jq.stats()
    assert stats["dead"] == 0 and stats["pending"] == 0, stats


def test_kill_9_of_a_unit_holding_jobs_loses_nothing(pools, redis_server, cli_server):
    server = cli_server(SERVER)
    server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "kill-unit", server)
    victim = pool.wait_running(2)["units"][0]
    xs = _inputs()
    with JobQueue(redis_server.url, "kill-unit") as jq:
        ids = jq.submit_many(xs)
        wait_until(lambda: _done(pool) >= 300, 60, "work under way")
        os.kill(victim["pid"], signal.SIGKILL)
        _check_all(jq, ids, xs)
    status = pool.status()
    assert status["units"][0]["restarts"] == 1
    assert "SIGKILL" in status["units"][0]["last_error"]


def test_kill_9_of_one_of_two_servers_all_jobs_complete_through_the_other(
        pools, redis_server, cli_server):
    doomed, survivor = cli_server(SERVER), cli_server(SERVER)
    for server in (doomed, survivor):
        server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "kill-server", doomed, survivor, units=1)
    pool.wait_running(2)
    xs = _inputs()
    with JobQueue(redis_server.url, "kill-server") as jq:
        ids = jq.submit_many(xs)
        wait_until(lambda: _done(pool) >= 300, 60, "work under way")
        doomed.proc.kill()  # the supervisor; its roles die with it
        doomed.wait_exit()
        _check_all(jq, ids, xs)
    status = pool.wait_status(lambda s: s["servers"][0]["reachable"] is False,
                              "the killed server to be probed unreachable")
    assert status["servers"][1]["reachable"] is True


def test_redis_restart_mid_run_the_pool_reconnects_and_finishes(pools, redis_server,
                                                                cli_server):
    server = cli_server(SERVER)
    server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "redis-restart", server)
    pool.wait_running(2)
    xs = _inputs()
    with JobQueue(redis_server.url, "redis-restart") as jq:
        ids = jq.submit_many(xs)
        wait_until(lambda: _done(pool) >= 300, 60, "work under way")
        redis_server.restart()  # append-only file on: the stream and group survive
        _check_all(jq, ids, xs)
    assert pool.status()["units_running"] == 2


def test_switch_to_another_server_under_load_loses_nothing(pools, redis_server, cli_server):
    first, second = cli_server(SERVER), cli_server(SERVER)
    for server in (first, second):
        server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "switch", first)
    pool.wait_running(2)
    xs = _inputs()
    with JobQueue(redis_server.url, "switch") as jq:
        ids = jq.submit_many(xs)
        wait_until(lambda: _done(pool) >= 300, 60, "work under way")
        done = pool.cli("switch", "-remote_servers", servers_arg(second))
        assert done.returncode == 0, done.stderr
        _check_all(jq, ids, xs)
    status = pool.wait_running(2)
    assert {u["server"] for u in status["units"]} == {
        f"127.0.0.1:{second.port}/{second.port_out}"}
    assert status["restarts"] == 0  # the old units stopped when asked, none crashed


def test_malformed_stream_entries_are_dead_lettered_and_the_pool_goes_on(
        pools, redis_server, cli_server):
    import redis

    server = cli_server(SERVER)
    server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "garbage", server,
                       extra=("-max_job_bytes", "100000"))
    pool.wait_running(2)
    keys = QueueKeys("garbage")
    raw = redis.Redis.from_url(redis_server.url)
    xs = _inputs(500)
    with JobQueue(redis_server.url, "garbage") as jq:
        ids = jq.submit_many(xs[:250])
        raw.xadd(keys.stream, {"id": "bad-1", "data": b"\xc1\xc1 not msgpack"})
        raw.xadd(keys.stream, {"no": "fields"})
        raw.xadd(keys.stream, {"id": "bad-3", "data": b"\x00" * 200_000})
        ids += jq.submit_many(xs[250:])
        _check_all_but_dead(jq, ids, xs, dead=3)
        letters = {d["job_id"]: d["error"] for d in jq.dead_letters()}
        assert set(letters) == {"bad-1", None, "bad-3"}, letters
        assert all(letters.values())
    raw.close()
    assert pool.status()["restarts"] == 0


def _check_all_but_dead(jq: JobQueue, ids, xs, dead: int) -> None:
    results = jq.results(ids, timeout=RESULT_LIMIT_S)
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(np.asarray(r), x)
    stats = wait_until(lambda: (s := jq.stats())["dead"] == dead and s, 30,
                       "the malformed entries to be dead-lettered")
    assert stats["pending"] == 0


def test_kill_9_of_the_central_leaves_no_unit_and_a_new_pool_finishes_the_jobs(
        pools, redis_server, cli_server):
    from helpers import gone

    server = cli_server(SERVER)
    server.client(protocol="numpy").close()
    pool = _queue_pool(pools, redis_server, "kill-central", server)
    units = [u["pid"] for u in pool.wait_running(2)["units"]]
    xs = _inputs()
    with JobQueue(redis_server.url, "kill-central") as jq:
        ids = jq.submit_many(xs)
        wait_until(lambda: _done(pool) >= 300, 60, "work under way")
        pool.proc.kill()
        pool.wait_exit()
        wait_until(lambda: all(gone(pid) for pid in units), 30,
                   "the units to die with their central")
        again = _queue_pool(pools, redis_server, "kill-central", server)
        again.wait_running(2)
        _check_all(jq, ids, xs)
