"""Jobs: submit work over HTTP now, fetch the result later.

- ``POST /jobs`` takes the body of ``POST /encode`` and answers ``202 {"job_id": ...}``
  at once (a body that is not valid gets ``400`` at once, as from ``/encode``); the work
  runs in a bounded thread pool of the bridge process that took the POST.
- ``GET /jobs/<id>`` answers ``{"job_id", "status": "pending"}``, ``{"job_id", "status":
  "done", "data": ...}`` (``data`` as ``/encode`` gives it) or ``{"job_id", "status":
  "error", "error_code": <HTTP status>, "error_type": <code>, "error_message": ...}``
  (the fields of ``/encode``'s error envelope); ``404`` for an id it does not know.

The store is bounded: at most ``-http_jobs_max`` jobs; a finished job is kept
``-http_jobs_ttl`` seconds, then it is gone (``404``). When the store is full, the
oldest finished jobs make room; when every job in it is still pending, ``POST /jobs``
gets ``429``.

The bridge may run several processes and a GET may reach another process than its
POST, so the store is shared by all of them: a small SQLite file (WAL journal) in a
directory of the bridge (see :mod:`.state`). A job whose process exited
before finishing it is reported as an error (``job_lost``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, Response, g, jsonify, request
from wkr_serving.client.protocol import MAX_OPTION_CHARS

from . import jsonio, state
from .app import EncodeCall, envelope_error, failure, read_call, run_encode

__all__ = ["JobStore", "register"]

logger = logging.getLogger(__name__)

#: Threads of a bridge process running jobs, at most.
MAX_JOB_THREADS = 32
#: Seconds a process waits for another one holding the store's write lock.
LOCK_WAIT_S = 10.0

#: The answer of a job whose process exited before finishing it.
LOST = json.dumps({"status": "error", "error_code": 500, "error_type": "job_lost",
                   "error_message": "the bridge process running this job exited"})

class JobStore:
    """Jobs in one SQLite file that every process of the bridge opens.

    Each row: id, owner (``<pid>-<start time>`` of the process running it), status,
    expiry (monotonic seconds, set when finished; the monotonic clock is system-wide on
    Linux) and the answer as JSON text. Any thread of any process may call any method;
    each thread keeps its own connection.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            status TEXT NOT NULL,
            expires REAL,
            answer TEXT
        );
        CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires);
    """

    def __init__(self, path: str, max_jobs: int = 10_000, ttl_s: float = 300.0) -> None:
        self.path = path
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._local = threading.local()
        self._create_file()

    def _create_file(self) -> None:
        """Make the file, in WAL mode and with its table, unless it exists. Processes
        starting together may race: each prepares its own copy and links it into place
        (atomic; the first one wins), as switching a shared file to WAL is not safe."""
        if os.path.exists(self.path):
            return
        draft = f"{self.path}.{os.getpid()}-{threading.get_ident()}.new"
        db = sqlite3.connect(draft, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(self.SCHEMA)
        finally:
            db.close()
        try:
            os.link(draft, self.path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, isolation_level=None)
            db.execute("PRAGMA synchronous=OFF")  # scratch data: no need to survive a crash
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def create(self) -> str | None:
        """A new pending job owned by this process; None when the store is full of
        pending jobs. Expired jobs go first, then the oldest finished ones if needed."""
        job_id = secrets.token_hex(16)
        db = self._db()
        now = time.monotonic()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM jobs WHERE expires <= ?", (now,))
            (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if count >= self.max_jobs:
                self._reclaim_lost(db, now)
                db.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE expires "
                           "IS NOT NULL ORDER BY expires LIMIT ?)",
                           (count - self.max_jobs + 1,))
                (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if count >= self.max_jobs:
                db.execute("COMMIT")
                return None
            db.execute("INSERT INTO jobs (id, owner, status) VALUES (?, ?, 'pending')",
                       (job_id, state.this_process()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return job_id

    def _reclaim_lost(self, db: sqlite3.Connection, now: float) -> None:
        """Fail the pending jobs of processes that exited (so they can be evicted)."""
        owners = [o for (o,) in db.execute(
            "SELECT DISTINCT owner FROM jobs WHERE expires IS NULL").fetchall() if state.gone(o)]
        for owner in owners:
            db.execute("UPDATE jobs SET status = 'error', expires = ?, answer = ? WHERE "
                       "owner = ? AND expires IS NULL", (now + self.ttl_s, LOST, owner))

    def finish(self, job_id: str, status: str, answer: dict[str, Any]) -> None:
        """Record a job's outcome (``status`` "done" or "error"; ``answer``: the fields
        GET adds to ``job_id`` and ``status``, JSON-ready). Its TTL starts now."""
        text = jsonio.dumps({"status": status, **answer}).decode()
        self._db().execute("UPDATE jobs SET status = ?, expires = ?, answer = ? WHERE id = ?",
                           (status, time.monotonic() + self.ttl_s, text, job_id))

    def get(self, job_id: str) -> str | None:
        """The job's answer as JSON text, or None if unknown, expired or evicted."""
        row = self._db().execute("SELECT owner, expires, answer FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
        if row is None:
            return None
        owner, expires, answer = row
        if expires is None:
            if state.gone(owner):
                self._db().execute("UPDATE jobs SET status = 'error', expires = ?, answer = ? "
                                   "WHERE id = ? AND expires IS NULL",
                                   (time.monotonic() + self.ttl_s, LOST, job_id))
                return self.get(job_id)
            return json.dumps({"job_id": job_id, "status": "pending"})
        if expires <= time.monotonic():
            self._db().execute("DELETE FROM jobs WHERE id = ? AND expires <= ?",
                               (job_id, time.monotonic()))
            return None
        return '{"job_id":' + json.dumps(job_id) + "," + answer[1:]

    def counts(self) -> dict[str, int]:
        """Jobs held, by status (expired ones not counted)."""
        rows = self._db().execute(
            "SELECT status, COUNT(*) FROM jobs WHERE expires IS NULL OR expires > ? "
            "GROUP BY status", (time.monotonic(),)).fetchall()
        counts = {"pending": 0, "done": 0, "error": 0}
        counts.update({status: n for status, n in rows})
        return counts

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class _Runner:
    """This process's thread pool for jobs (made on first use, so a fork gets its own)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, fn: Any, *args: Any) -> None:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wkr-job")
                self._pid = os.getpid()
            self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def register(app: Flask, backend: Any, store: JobStore | None = None) -> None:
    """Add ``POST /jobs`` and ``GET /jobs/<id>`` to ``app``. The store defaults to one
    in :mod:`.state` sized by ``-http_jobs_max`` and ``-http_jobs_ttl``."""
    if store is None:
        config = backend.config
        store = JobStore(os.path.join(state.state_dir(), "jobs.sqlite3"),
                         config.http_jobs_max, config.http_jobs_ttl)
    jobs = store
    # Half of this process's calls in flight at most, so that jobs never starve /encode.
    runner = _Runner(max(1, min(MAX_JOB_THREADS, backend.config.http_max_connect // 2)))
    app.extensions["wkr_jobs"] = jobs
    atexit.register(runner.shutdown)

    def run(job_id: str, call: EncodeCall, request_id: str) -> None:
        try:
            try:
                jobs.finish(job_id, "done", {"data": run_encode(backend, call, request_id)})
            except Exception as exc:  # every failure is the job's outcome
                _, payload = failure(exc)
                del payload["data"]
                jobs.finish(job_id, "error", payload)
        except Exception:  # the store itself failed: the job stays pending until lost
            logger.exception("job %s (request %s): cannot record its outcome", job_id,
                             request_id)

    @app.post("/jobs")
    def submit_job() -> Any:
        call = read_call(backend, request.get_data(cache=False))
        if not isinstance(call, EncodeCall):
            status, payload = call
            return jsonify(payload), status
        job_id = jobs.create()
        if job_id is None:
            return envelope_error(429, "too_many_jobs", f"{jobs.max_jobs} jobs are pending: "
                                  "retry later")
        runner.submit(run, job_id, call, g.get("request_id", "")[:MAX_OPTION_CHARS])
        return jsonify({"job_id": job_id}), 202

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str) -> Any:
        answer = jobs.get(job_id)
        if answer is None:
            return envelope_error(404, "unknown_job", f"no job {job_id!r}: unknown, or "
                                  "expired and removed")
        return Response(answer, mimetype="application/json")
