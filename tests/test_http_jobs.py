"""The jobs API of the HTTP bridge against a real server: ``POST /jobs`` answers 202 at
once, ``GET /jobs/<id>`` gives pending, then the result (or the error with its code);
unknown ids are 404; a full store of pending jobs refuses new ones with 429 while
finished jobs make room; finished jobs expire after ``-http_jobs_ttl``; the token guards
the routes. The bridge runs two processes (-http_workers 2) sharing one store (every call here
opens a new connection); the store itself is also checked with two real processes."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import Gate, bridge_connections, http_call, http_send, serve, wait_until
from prometheus_client.parser import text_string_to_metric_families
from wkr_serving.server import WKRServer
from wkr_serving.server.http.jobs import JobStore
from workers import ControlledWorker, touch

LIMIT_S = 30
#: -http_jobs_max of the main test server.
MAX_JOBS = 3
#: -http_jobs_ttl (s) of the expiry test server.
SHORT_TTL_S = 1.5
TOKEN = "j0bs"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def submit(server: WKRServer, body: Any, headers: dict[str, str] | None = None) -> str:
    status, _, answer = http_call(server, "/jobs", body, headers)
    assert status == 202, answer
    assert set(answer) == {"job_id"} and len(answer["job_id"]) == 32
    return answer["job_id"]


def finished(server: WKRServer, job_id: str, headers: dict[str, str] | None = None,
             ) -> dict[str, Any]:
    """Poll ``GET /jobs/<id>`` until the job is no longer pending (bounded)."""
    def poll():
        status, _, answer = http_call(server, f"/jobs/{job_id}", headers=headers)
        assert status == 200, answer
        assert answer["job_id"] == job_id
        return answer if answer["status"] != "pending" else None

    return wait_until(poll, LIMIT_S, f"job {job_id} to finish", interval=0.01)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WKRServer]:
    """ControlledWorker (obj), 1 worker, a store of MAX_JOBS jobs, default TTL."""
    yield from serve(tmp_path_factory, "http_jobs", ControlledWorker, "-http_port", "0", "-cpu",
                     "-num_worker", "1", "-batch_size", "4", "-http_jobs_max", str(MAX_JOBS),
                     "-http_workers", "2")


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory) -> Iterator[WKRServer]:
    """Same worker, finished jobs kept SHORT_TTL_S seconds, a bearer token."""
    yield from serve(tmp_path_factory, "http_jobs_ttl", ControlledWorker, "-http_port", "0", "-cpu",
                     "-num_worker", "1", "-http_jobs_ttl", str(SHORT_TTL_S), "-http_token", TOKEN)


def test_submit_then_poll_until_done(server):
    value = {"a": [1, "x", None], "b": 2.5}
    status, headers, answer = http_call(server, "/jobs", {"data": value},
                                        {"X-Request-ID": "job-req-1"})
    assert status == 202 and headers["X-Request-ID"] == "job-req-1"
    job = finished(server, answer["job_id"])
    assert job == {"job_id": answer["job_id"], "status": "done", "data": value}
    # a finished job stays readable (the TTL is 300 s here)
    status, _, again = http_call(server, f"/jobs/{answer['job_id']}")
    assert status == 200 and again == job


def test_a_batch_job_gives_the_list_of_results(server):
    job = finished(server, submit(server, {"batch": [1, "two", [3, 4]]}))
    assert job["status"] == "done" and job["data"] == [1, "two", [3, 4]]


def send(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
         ) -> tuple[int, Any]:
    """``http_send`` with the answer decoded from JSON."""
    status, raw = http_send(conn, method, path, body)
    return status, json.loads(raw)


def poll_on(conn: http.client.HTTPConnection, job_id: str) -> tuple[int, Any]:
    """``GET /jobs/<id>`` on ``conn`` until it is no longer a pending job (bounded)."""
    def poll() -> tuple[int, Any] | None:
        status, job = send(conn, "GET", f"/jobs/{job_id}")
        return None if status == 200 and job["status"] == "pending" else (status, job)

    return wait_until(poll, LIMIT_S, f"job {job_id} to finish")


def test_a_job_submitted_to_one_bridge_process_is_read_from_the_other(server):
    first, second = bridge_connections(server)
    try:
        for submit_on, read_on in ((first, second), (second, first)):
            status, answer = send(submit_on, "POST", "/jobs", {"data": ["cross", 1]})
            assert status == 202
            assert poll_on(read_on, answer["job_id"]) == (
                200, {"job_id": answer["job_id"], "status": "done", "data": ["cross", 1]})
    finally:
        first.close()
        second.close()


def test_a_failing_job_reports_its_error_code(server):
    job = finished(server, submit(server, {"data": {"cmd": "raise", "message": "boom-job"}}))
    assert job["status"] == "error"
    assert job["error_code"] == 500 and job["error_type"] == "model_error"
    assert "boom-job" in job["error_message"] and "data" not in job


@pytest.mark.parametrize("body", [b"not json", {"nothing": 1}, {"data": 1, "batch": [1]},
                                  {"batch": []}, {"data": 1, "timeout": -5},
                                  {"data": 1, "suppress_log_input": "yes"}])
def test_an_invalid_body_is_refused_at_once(server, body):
    status, _, answer = http_call(server, "/jobs", body)
    assert status == 400 and answer["error_type"] == "bad_input"
    assert answer["error_code"] == 400 and "job_id" not in answer


def test_an_unknown_job_is_404(server):
    status, _, answer = http_call(server, "/jobs/0123456789abcdef0123456789abcdef")
    assert status == 404 and answer["error_type"] == "unknown_job"
    status, _, answer = http_call(server, "/jobs/not-a-job-id")
    assert status == 404 and answer["error_type"] == "unknown_job"


def pending_gauge(server: WKRServer, headers: dict[str, str] | None = None) -> float:
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/metrics", headers=headers or {}),
            timeout=LIMIT_S) as response:
        text = response.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "wkr_http_jobs"]
    return sum(s.value for s in family.samples if s.labels["status"] == "pending")


def test_a_store_full_of_pending_jobs_refuses_new_ones_and_finished_jobs_make_room(
        server, tmp_path):
    gate = Gate(tmp_path, "jobs-full")
    try:
        first = submit(server, {"data": gate.item("first")})
        gate.wait_started()
        ids = [first, *(submit(server, {"data": i}) for i in range(MAX_JOBS - 1))]
        for job_id in ids:  # the worker is blocked: every job is still pending
            status, _, job = http_call(server, f"/jobs/{job_id}")
            assert status == 200 and job["status"] == "pending"
        assert pending_gauge(server) == MAX_JOBS
        status, _, answer = http_call(server, "/jobs", {"data": "one too many"})
        assert status == 429 and answer["error_type"] == "too_many_jobs"
    finally:
        gate.open()
    jobs = [finished(server, job_id) for job_id in ids]
    assert jobs[0]["data"]["value"] == "first" and jobs[0]["data"]["released"] is True
    assert [j["data"] for j in jobs[1:]] == list(range(MAX_JOBS - 1))
    # the store is full of finished jobs: a new one evicts the oldest of them
    newest = submit(server, {"data": "room"})
    gone = [job_id for job_id in ids if http_call(server, f"/jobs/{job_id}")[0] == 404]
    assert len(gone) == 1
    assert finished(server, newest)["data"] == "room"


def test_jobs_need_the_token_when_one_is_set(short_ttl_server):
    status, _, answer = http_call(short_ttl_server, "/jobs", {"data": 1})
    assert status == 401 and answer["error_type"] == "unauthorized"
    job_id = submit(short_ttl_server, {"data": 1}, AUTH)
    status, _, _ = http_call(short_ttl_server, f"/jobs/{job_id}")
    assert status == 401
    assert finished(short_ttl_server, job_id, AUTH)["data"] == 1


def test_a_finished_job_expires_after_the_ttl(short_ttl_server, tmp_path):
    gate = Gate(tmp_path, "jobs-ttl")
    try:
        job_id = submit(short_ttl_server, {"data": gate.item("ttl")}, AUTH)
        gate.wait_started()
        status, _, job = http_call(short_ttl_server, f"/jobs/{job_id}", headers=AUTH)
        assert status == 200 and job["status"] == "pending"
        opened = time.monotonic()
    finally:
        gate.open()
    seen: list[str] = []
    answered_at: list[float] = []

    def expired() -> bool:
        status, _, job = http_call(short_ttl_server, f"/jobs/{job_id}", headers=AUTH)
        answered_at.append(time.monotonic())
        if status == 200:
            seen.append(job["status"])
        return status == 404

    wait_until(expired, LIMIT_S, "the finished job to expire", interval=0.05)
    # it finished after the gate opened and expired SHORT_TTL_S later, never sooner (the
    # monotonic clock is system-wide: the bridge's and this process's agree)
    assert answered_at[-1] - opened >= SHORT_TTL_S
    assert set(seen) <= {"pending", "done"}
    status, _, answer = http_call(short_ttl_server, f"/jobs/{job_id}", headers=AUTH)
    assert status == 404 and answer["error_type"] == "unknown_job"


CHILD = textwrap.dedent("""
    import json, sys
    from wkr_serving.server.http.jobs import JobStore
    from workers import wait_for_file
    path, out, release = sys.argv[1:4]
    store = JobStore(path, max_jobs=3, ttl_s=300.0)
    done = store.create()
    store.finish(done, "done", {"data": {"from": "child"}})
    pending = [store.create(), store.create()]
    with open(out + ".tmp", "w") as fh:
        json.dump({"done": done, "pending": pending}, fh)
    import os
    os.replace(out + ".tmp", out)
    sys.exit(0 if wait_for_file(release, 60) else 3)
""")


def test_the_store_is_shared_by_processes_and_reclaims_a_dead_ones_jobs(tmp_path):
    path, out, release = (str(tmp_path / n) for n in ("jobs.sqlite3", "ids.json", "go"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, out, release], env=env)
    try:
        wait_until(lambda: os.path.exists(out) or child.poll() is not None, LIMIT_S,
                   "the child process to fill the store")
        assert child.poll() is None, f"child exited with {child.returncode}"
        with open(out, encoding="utf-8") as fh:
            ids = json.load(fh)
        store = JobStore(path, max_jobs=3, ttl_s=300.0)
        assert json.loads(store.get(ids["done"])) == {
            "job_id": ids["done"], "status": "done", "data": {"from": "child"}}
        for job_id in ids["pending"]:  # owned by a live process: pending
            assert json.loads(store.get(job_id))["status"] == "pending"
        assert store.counts() == {"pending": 2, "done": 1, "error": 0}
        # 1 finished + 2 pending of another process: evicting the finished one makes room
        mine = store.create()
        assert mine is not None and store.get(ids["done"]) is None
        assert store.create() is None  # 3 pending now, none of them evictable
        touch(release)
        assert child.wait(LIMIT_S) == 0
        # the child exited with two jobs pending: they are lost, and make room again
        lost = json.loads(store.get(ids["pending"][0]))
        assert lost["status"] == "error" and lost["error_type"] == "job_lost"
        assert store.create() is not None
        assert store.counts()["pending"] == 2  # mine and the new one
        store.close()
    finally:
        touch(release)
        if child.poll() is None:
            child.kill()
        child.wait(LIMIT_S)


def test_concurrent_submissions_never_exceed_the_bound(tmp_path):
    """Many threads racing for the last slots of one store: exactly max_jobs win."""
    store = JobStore(str(tmp_path / "race.sqlite3"), max_jobs=20, ttl_s=300.0)
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda _: store.create(), range(50)))
    assert sum(job_id is not None for job_id in created) == 20
    assert store.counts()["pending"] == 20


OPENER = textwrap.dedent("""
    import sys
    from wkr_serving.server.http.jobs import JobStore
    for path in sys.argv[1:]:
        if sys.stdin.buffer.read(1) != b"g":  # all children are let go at the same moment
            sys.exit(3)
        store = JobStore(path, max_jobs=1000, ttl_s=300.0)
        for i in range(5):
            job_id = store.create()
            store.finish(job_id, "done", {"data": i})
            assert '"data":%d' % i in store.get(job_id)
""")


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Bridge processes boot together and open the same new store: a race on making
    the file (it once failed with 'database is locked'). Several rounds, each on a new
    file, each started in every child at the same moment."""
    paths = [str(tmp_path / f"new{i}.sqlite3") for i in range(5)]
    children = [subprocess.Popen([sys.executable, "-c", OPENER, *paths],
                                 stdin=subprocess.PIPE) for _ in range(6)]
    try:
        for _ in paths:
            for child in children:
                assert child.stdin is not None
                child.stdin.write(b"g")
                child.stdin.flush()
        codes = [child.wait(LIMIT_S * 2) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(LIMIT_S)
            if child.stdin is not None:
                child.stdin.close()
    assert codes == [0] * len(children)
    for path in paths:
        assert JobStore(path).counts() == {"pending": 0, "done": 6 * 5, "error": 0}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".new")]  # no draft left
