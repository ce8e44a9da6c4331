"""At-least-once job queue on a Redis Stream, drained by :class:`~.queueworker.QueueWorker`
units of a decentralized pool.

Keys of a queue ``NAME`` (the ``{NAME}`` braces are a Redis Cluster hash tag: every key of
one queue lives on one node, so the units' MULTI/EXEC transactions work there too)::

    wkr:{NAME}:jobs        stream: one entry per job, fields id, x (input), t (submit time)
                           read by the consumer group "units"
    wkr:{NAME}:r:<job id>  the job's result record (SET NX, with a TTL): first writer wins
    wkr:{NAME}:e:<job id>  the last transient error of the job (TTL), for the dead letter
    wkr:{NAME}:dead        stream: dead-lettered jobs, with the reason
    wkr:{NAME}:done        pub/sub channel: each message is a msgpack list of the ids of
                           jobs whose results one unit just wrote

A result record is msgpack ``["ok", value, t_submit, t_done]`` or ``["error", [code,
message, traceback], t_submit, t_done]`` (times are ``time.time()`` seconds); an error is
raised to the caller as its typed exception (:class:`ModelError`, :class:`BadInput`,
:class:`JobCancelled`, :class:`DeadLettered`...).

A caller waiting for results never polls in a loop: it subscribes to the queue's channel
first, then reads the results already stored, then waits for notifications up to its
deadline, re-reading everything still missing only after a quiet second or two (a
notification can be lost when Redis restarts).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import (
    ClientUsageError,
    JobCancelled,
    ProtocolError,
    ServerError,
    WKRTimeoutError,
    error_from_wire,
)
from .helper import dumps, import_redis, loads

__all__ = ["JobQueue", "QueueKeys", "decode_result", "encode_result"]

#: Default largest encoded job input (bytes), checked before sending.
MAX_JOB_BYTES = 64 * 1024 * 1024
#: Longest job id (characters).
MAX_JOB_ID = 256
#: Keys per MGET / entries per pipelined XADD chunk.
CHUNK = 1000
#: Seconds without a notification after which a waiter re-reads what is still missing.
RECHECK_S = 2.0
GROUP = "units"
OK = "ok"
ERROR = "error"


class QueueKeys:
    """The Redis key names of one queue (see the module docstring)."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "{}\r\n "):
            raise ClientUsageError(
                f"queue name must be a non-empty string without braces or spaces, got "
                f"{name!r}")
        self.name = name
        base = f"wkr:{{{name}}}"
        self.stream = f"{base}:jobs"
        self.dead = f"{base}:dead"
        self.channel = f"{base}:done"
        self.group = GROUP
        self._result = f"{base}:r:"
        self._error = f"{base}:e:"

    def result(self, job_id: str) -> str:
        return self._result + job_id

    def error(self, job_id: str) -> str:
        return self._error + job_id


def encode_result(ok: bool, body: Any, t_submit: float | None,
                  t_done: float | None = None) -> bytes:
    """A result record: ``body`` is the value, or ``[code, message, traceback]``."""
    return dumps([OK if ok else ERROR, body, t_submit,
                  time.time() if t_done is None else t_done])


def error_record(error: ServerError, t_submit: float | None) -> bytes:
    return encode_result(False, error.to_wire(), t_submit)


def decode_result(raw: Any) -> tuple[bool, Any, float | None, float | None]:
    """``(ok, value or typed error, t_submit, t_done)`` of a stored record."""
    record = loads(raw)
    if not (isinstance(record, list) and len(record) == 4 and record[0] in (OK, ERROR)):
        raise ProtocolError("malformed result record")
    if record[0] == OK:
        return True, record[1], record[2], record[3]
    return False, error_from_wire(record[1]), record[2], record[3]


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID:
        raise ClientUsageError(
            f"a job id must be a string of 1..{MAX_JOB_ID} characters, got {job_id!r:.80}")
    return job_id


class JobQueue:
    """Submit jobs to a queue served by :class:`QueueWorker` units, and wait for results.

    :param redis_url: e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS,
        ``redis://:password@host:port/db``).
    :param name: the queue's name (the units' ``-queue``).
    :param result_ttl: seconds a cancel marker is kept (results are written by the
        units with their own ``-result_ttl``).
    :param max_job_bytes: largest encoded input accepted by :meth:`submit` (keep it at or
        below the units' ``-max_job_bytes``, which dead-letter larger entries).

    Inputs and results are msgpack values with ndarrays as raw buffers (no pickle). A
    job is delivered at least once; a job delivered twice still has exactly one
    result (the first written).
    """

    def __init__(self, redis_url: str = "redis://localhost:6379/0", name: str = "default",
                 *, result_ttl: float = 3600.0, max_job_bytes: int = MAX_JOB_BYTES,
                 socket_timeout: float = 30.0, **redis_options: Any) -> None:
        redis = import_redis()
        self.keys = QueueKeys(name)
        self.name = name
        self.redis_url = redis_url
        self.result_ttl = float(result_ttl)
        self.max_job_bytes = int(max_job_bytes)
        redis_options.setdefault("socket_connect_timeout", 10.0)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout,
                                          **redis_options)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._closed = False

    # -- submitting ---------------------------------------------------------------------

    def _entry(self, x: Any, job_id: str | None) -> tuple[str, dict[str, Any]]:
        payload = dumps(x)
        if len(payload) > self.max_job_bytes:
            raise ClientUsageError(
                f"job input is {len(payload)} bytes encoded, over max_job_bytes="
                f"{self.max_job_bytes}; split it or raise the limit (here and the units' "
                "-max_job_bytes)")
        job_id = uuid.uuid4().hex if job_id is None else check_job_id(job_id)
        return job_id, {"id": job_id, "x": payload, "t": repr(time.time())}

    def submit(self, x: Any, job_id: str | None = None) -> str:
        """Queue one job; return its id (``job_id``, or a new random one)."""
        job_id, fields = self._entry(x, job_id)
        self.redis.xadd(self.keys.stream, fields)
        return job_id

    def submit_many(self, xs: Iterable[Any], job_ids: Sequence[str] | None = None) -> list[str]:
        """Queue many jobs, pipelined (one round trip per :data:`CHUNK` jobs); return
        their ids in order. Inputs are all encoded and checked before any is queued."""
        xs = list(xs)
        if job_ids is not None and len(job_ids) != len(xs):
            raise ClientUsageError("submit_many: job_ids and xs differ in length")
        entries = [self._entry(x, None if job_ids is None else job_ids[n])
                   for n, x in enumerate(xs)]
        for start in range(0, len(entries), CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for _, fields in entries[start:start + CHUNK]:
                pipe.xadd(self.keys.stream, fields)
            pipe.execute()
        return [job_id for job_id, _ in entries]

    def cancel(self, job_id: str) -> bool:
        """Mark the job cancelled; True if that happened before any result existed (a
        unit then skips it), False if it already had a result."""
        record = error_record(JobCancelled(f"job {job_id} was cancelled"), None)
        done = self.redis.set(self.keys.result(check_job_id(job_id)), record, nx=True,
                              px=max(1, int(self.result_ttl * 1000)))
        if done:
            self.redis.publish(self.keys.channel, dumps([job_id]))
        return bool(done)

    # -- results ------------------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = 60.0) -> Any:
        """Wait up to ``timeout`` seconds (None: no limit) for one job's result; raise its
        typed error (:class:`ModelError`, :class:`BadInput`, :class:`JobCancelled`,
        :class:`DeadLettered`...), or :class:`WKRTimeoutError`."""
        return self.results([job_id], timeout)[0]

    def results(self, job_ids: Sequence[str], timeout: float | None = 60.0,
                on_error: str = "raise") -> list[Any]:
        """Wait for the results of many jobs (in the order of ``job_ids``), at most
        ``timeout`` seconds in all (None: no limit).

        ``on_error="raise"`` raises the first failed job's error once every result is
        in; ``"return"`` puts the exception in its place. Raises
        :class:`WKRTimeoutError` naming how many are missing when time runs out.
        """
        details = self.wait(job_ids, timeout)
        out = []
        first_error: Exception | None = None
        for ok, value, _t_submit, _t_done in details:
            if not ok:
                first_error = first_error or value
            out.append(value)
        if first_error is not None and on_error == "raise":
            raise first_error
        return out

    def wait(self, job_ids: Sequence[str], timeout: float | None = 60.0,
             ) -> list[tuple[bool, Any, float | None, float | None]]:
        """Like :meth:`results`, but every entry is ``(ok, value or error, t_submit,
        t_done)`` (the times the job was submitted and its result written)."""
        ids = [check_job_id(j) for j in job_ids]
        deadline = None if timeout is None else time.monotonic() + timeout
        found: dict[str, tuple[bool, Any, float | None, float | None]] = {}
        missing = set(ids)
        pubsub = None
        try:
            while missing:
                if pubsub is None:  # subscribe first, then read what is already stored
                    pubsub = self._subscribe(deadline)
                    self._read(missing, found)
                    last_check = time.monotonic()
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WKRTimeoutError(
                        f"{len(missing)} of {len(ids)} jobs of queue {self.name!r} have no "
                        f"result after {timeout} s (are units running on this queue?)")
                wait = RECHECK_S if remaining is None else min(remaining, RECHECK_S)
                try:
                    message = pubsub.get_message(timeout=wait)
                except self._errors:  # Redis went away: subscribe again and re-read all
                    pubsub.close()
                    pubsub = None
                    self._pause(deadline)
                    continue
                if message is None:
                    if time.monotonic() - last_check >= RECHECK_S * 0.9:
                        self._read(missing, found)
                        last_check = time.monotonic()
                    continue
                if message.get("type") != "message":
                    continue
                try:
                    done = loads(message["data"])
                except ProtocolError:
                    continue
                if isinstance(done, list):
                    hits = {j for j in done if isinstance(j, str) and j in missing}
                    if hits:
                        self._read(hits, found, missing)
        except self._errors as exc:
            raise WKRTimeoutError(f"Redis unreachable while waiting for results: {exc}"
                                  ) from exc
        finally:
            if pubsub is not None:
                pubsub.close()
        return [found[j] for j in ids]

    def _pause(self, deadline: float | None) -> None:
        """Wait a moment before reconnecting to Redis (bounded by the deadline)."""
        import threading

        left = 0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic()))
        threading.Event().wait(left)

    def _subscribe(self, deadline: float | None) -> Any:
        """A pub/sub connection subscribed to the queue's channel (confirmed by Redis, so
        no notification sent after this returns is missed)."""
        for _attempt in range(10_000):
            pubsub = self.redis.pubsub()
            try:
                pubsub.subscribe(self.keys.channel)
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise WKRTimeoutError(
                            f"could not subscribe to {self.keys.channel} in time")
                    message = pubsub.get_message(timeout=min(remaining or 1.0, 1.0))
                    if message is not None and message.get("type") == "subscribe":
                        return pubsub
            except self._errors:
                pubsub.close()
                self._pause(deadline)
            except BaseException:
                pubsub.close()
                raise
        raise WKRTimeoutError(f"could not subscribe to {self.keys.channel}")

    def _read(self, ids: set[str], found: dict[str, Any],
              missing: set[str] | None = None) -> None:
        """Read the stored results of ``ids`` (chunked MGET, one round trip) into
        ``found``, removing them from ``missing`` (default: ``ids`` itself)."""
        missing = ids if missing is None else missing
        todo = list(ids)
        for start in range(0, len(todo), CHUNK * 20):
            part = todo[start:start + CHUNK * 20]
            pipe = self.redis.pipeline(transaction=False)
            for n in range(0, len(part), CHUNK):
                pipe.mget([self.keys.result(j) for j in part[n:n + CHUNK]])
            values = [v for chunk in pipe.execute() for v in chunk]
            for job_id, raw in zip(part, values, strict=True):
                if raw is None:
                    continue
                try:
                    found[job_id] = decode_result(raw)
                except ProtocolError as exc:
                    found[job_id] = (False, exc, None, None)
                missing.discard(job_id)

    # -- inspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``queued`` (entries in the stream: waiting or in flight), ``pending`` (read
        by a unit, not yet acknowledged) and ``dead`` (dead-lettered entries)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.stream)
        pipe.xlen(self.keys.dead)
        pipe.xpending(self.keys.stream, self.keys.group)
        try:
            queued, dead, pending = pipe.execute()
        except Exception as exc:  # NOGROUP: no unit created the group yet
            if "NOGROUP" not in str(exc):
                raise
            queued, dead, pending = self.redis.xlen(self.keys.stream), self.redis.xlen(
                self.keys.dead), {"pending": 0}
        return {"queued": int(queued), "pending": int(pending["pending"] or 0),
                "dead": int(dead)}

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The oldest ``count`` dead-lettered entries: ``stream_id``, ``job_id`` (None when
        unreadable), ``error`` and ``deliveries``."""
        out = []
        for sid, fields in self.redis.xrange(self.keys.dead, count=count):
            f = {k.decode(errors="replace"): v for k, v in fields.items()}
            out.append({"stream_id": sid.decode(),
                        "job_id": f["id"].decode(errors="replace") if "id" in f else None,
                        "error": f.get("error", b"").decode(errors="replace"),
                        "deliveries": int(f.get("deliveries", b"0") or 0)})
        return out

    def close(self) -> None:
        """Close the connections. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.redis.close()
            self.redis.connection_pool.disconnect()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
