"""The ready-made processing unit: drains a :class:`~.jobqueue.JobQueue` into a server.

    wkr-decentral-start wkr_serving.client.QueueWorker -redis_url redis://host:6379/0 \\
        -queue NAME -remote_servers '[["127.0.0.1", 8996, 8998]]' -num_client 4 \\
        -port 21324 -port_out 21326

Each ``do_work`` call is one iteration:

1. jobs to handle: this unit's own jobs that failed transiently, once its back-off has
   passed (``XCLAIM``: a new delivery); else, at most every ``claim_after / 2`` s, jobs
   other units held idle longer than ``-claim_after`` (``XAUTOCLAIM``: units that died
   or whose server is down); else new jobs (``XREADGROUP``, up to ``-prefetch``, blocking
   at most ``-block_ms`` so a stop request is seen quickly);
2. entries that are malformed (no id or input, larger than ``-max_job_bytes``, checked
   before decoding, or not msgpack) or delivered more than ``-max_attempts`` times go to
   the dead-letter stream, with an error result when their job id is readable;
3. jobs that already have a result (done by another unit, or cancelled) are only
   acknowledged;
4. the rest are sent to the server pipelined (one request per job, all in flight at
   once, so the server batches them; a failing job fails alone);
5. one MULTI/EXEC transaction per iteration writes each result (``SET NX EX``: first
   writer wins), acknowledges and deletes the entries (``XACK`` + ``XDEL``) and publishes
   the finished ids on the queue's channel.

Errors: :class:`ModelError`, :class:`BadInput` and :class:`PoisonInput` (and inputs the
client refuses) are the job's result at once. Anything else (:class:`WorkerDied`,
:class:`Overloaded`, :class:`ShuttingDown`, :class:`ConnectionLost`, timeouts, an
unreachable server) is transient: the job stays pending, the unit backs off (growing,
bounded, waiting on ``stopping``) and reconnects to its server before it takes new
work; while its server is unreachable it takes none, so what it holds goes idle and
units of other servers reclaim it. A job's attempts are its stream deliveries
(``XPENDING``'s times-delivered count). Redis errors (a restart) make the unit back off
and reconnect; results computed but not yet written are kept and written first.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .client import WKRClient
from .errors import (
    BadInput,
    ClientUsageError,
    DeadLettered,
    ModelError,
    PoisonInput,
    ProtocolError,
    ProtocolMismatch,
    ServerError,
    WKRError,
)
from .helper import dumps, import_redis, loads
from .jobqueue import MAX_JOB_BYTES, QueueKeys, encode_result, error_record
from .logs import LogThrottle
from .unit import WKRWorker

__all__ = ["QueueWorker"]

#: Errors that are the job's answer: retrying cannot change them.
PERMANENT = (ModelError, BadInput, PoisonInput, ProtocolError, ClientUsageError)
#: First back-off after a transient failure (s); it doubles up to -max_backoff.
FIRST_BACKOFF_S = 0.1
#: Longest wait for the server's handshake when (re)connecting (ms).
CONNECT_TIMEOUT_MS = 1000
#: Longest single wait on ``stopping`` while backing off (s).
WAIT_SLICE_S = 0.2
#: Most entries written by one call of WRITE_SCRIPT (Lua's unpack() limit is ~8000).
SCRIPT_CHUNK = 2000
#: KEYS: stream, result keys (n). ARGV: group, ttl ms, n, channel, n records, the stream
#: ids of every handled entry, the msgpack list of finished job ids to publish. Returns
#: how many results already existed (the job had been done or cancelled before).
WRITE_SCRIPT = """
local group, ttl, n, channel = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local dup = 0
for i = 1, n do
  if not redis.call('SET', KEYS[i + 1], ARGV[4 + i], 'NX', 'PX', ttl) then dup = dup + 1 end
end
local sids = {}
for i = 5 + n, #ARGV - 1 do sids[#sids + 1] = ARGV[i] end
if #sids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(sids))
  redis.call('XDEL', KEYS[1], unpack(sids))
end
if n > 0 then redis.call('PUBLISH', channel, ARGV[#ARGV]) end
return dup
"""


@dataclass
class Entry:
    """One stream entry being handled."""

    sid: bytes
    job_id: str | None = None
    x: Any = None
    t_submit: float | None = None
    deliveries: int = 1
    record: bytes | None = None  # the result to write (None: acknowledge only)
    dead: str | None = None  # why it is dead-lettered
    transient: str | None = None  # why it must be retried


@dataclass
class QueueState:
    """What ``get_model`` returns: the unit's connections and bookkeeping."""

    keys: QueueKeys
    consumer: str
    redis: Any = None
    client: WKRClient | None = None
    protocol: str = "obj"
    group_ready: bool = False
    retry: dict[bytes, float] = field(default_factory=dict)  # sid -> monotonic failure time
    unwritten: list[Entry] = field(default_factory=list)
    backoff: float = 0.0
    wait_until: float = 0.0
    redis_backoff: float = 0.0
    next_reclaim: float = 0.0
    reclaim_cursor: str = "0-0"
    warnings: dict[str, LogThrottle] = field(default_factory=dict)  # one per kind
    write_script: Any = None


class QueueWorker(WKRWorker):
    """A unit that serves a Redis-Stream job queue (see the module docstring)."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("QueueWorker (Redis job queue)")
        group.add_argument("-redis_url", type=str, default="redis://localhost:6379/0",
                           help="Redis holding the queue (redis://[:password@]host:port/db)")
        group.add_argument("-queue", type=str, default="default",
                           help="the queue's name (JobQueue(redis_url, name))")
        group.add_argument("-claim_after", type=_above(0.0, float), default=30.0,
                           help="seconds a job may stay idle in a unit before another "
                                "unit reclaims it")
        group.add_argument("-max_attempts", type=_above(0, int), default=3,
                           help="deliveries of a job before it is dead-lettered")
        group.add_argument("-prefetch", type=_above(0, int), default=256,
                           help="most jobs a unit holds (read at once, in flight together)")
        group.add_argument("-result_ttl", type=_above(0.0, float), default=3600.0,
                           help="seconds results are kept in Redis")
        group.add_argument("-max_job_bytes", type=_above(0, int), default=MAX_JOB_BYTES,
                           help="largest job input (bytes); larger entries are dead-lettered")
        group.add_argument("-block_ms", type=_above(0, int), default=200,
                           help="longest wait (ms) for new jobs in one iteration")
        group.add_argument("-job_timeout", type=_above(0, int), default=60_000,
                           help="ms the server may take for one job before it is retried")
        group.add_argument("-max_backoff", type=_above(0.0, float), default=5.0,
                           help="longest back-off (s) after transient failures")
        group.add_argument("-server_protocol", type=str, default="auto",
                           choices=("auto", "obj", "numpy"),
                           help="the server's -protocol (auto: ask it)")

    # -- options ------------------------------------------------------------------------

    def _opt(self, name: str) -> Any:
        value = getattr(self.options, name, None)
        if value is None:
            value = _DEFAULTS[name]
        return value

    # -- lifecycle ----------------------------------------------------------------------

    def get_model(self, ip: str, port: int, port_out: int) -> QueueState:
        """Connect Redis (creating the consumer group if missing) and the server; an
        unreachable Redis or server is retried by ``do_work``, never fatal here."""
        self.server = (ip, int(port), int(port_out))
        consumer = f"{socket.gethostname()}:{os.getpid()}:{self.index}:{uuid.uuid4().hex[:8]}"
        state = QueueState(QueueKeys(self._opt("queue")), consumer)
        protocol = self._opt("server_protocol")
        state.protocol = "obj" if protocol == "auto" else protocol
        redis = import_redis()
        block_s = self._opt("block_ms") / 1000.0
        # No retries inside redis-py (they would sleep without seeing ``stopping``):
        # do_work backs off and reconnects itself.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        state.redis = redis.Redis.from_url(
            self._opt("redis_url"), socket_connect_timeout=5.0, socket_timeout=block_s + 10.0,
            health_check_interval=30, retry=Retry(NoBackoff(), 0))
        logger = logging.getLogger(f"wkr.queueworker.{self.index}")
        try:
            self._ensure_group(state)
        except self._redis_errors():
            logger.warning("Redis at %s is not reachable yet; retrying", self._opt("redis_url"))
        self._connect_server(state, logger)
        return state

    def off_model(self, model: QueueState) -> None:
        """Write what was computed, hand the jobs this unit still holds to the other
        units at once, close the server client and Redis."""
        state = model
        logger = logging.getLogger(f"wkr.queueworker.{self.index}")
        try:
            if state.unwritten:
                self._write(state, state.unwritten, logger)
            self._release(state)
        except Exception as exc:  # Redis gone: what is held is reclaimed after claim_after
            logger.warning("could not release held jobs: %s", exc)
        if state.client is not None:
            state.client.close()
            state.client = None
        if state.redis is not None:
            state.redis.close()
            state.redis.connection_pool.disconnect()

    def do_work(self, model: QueueState, logger: logging.Logger) -> int:
        """One iteration; returns how many entries it handled."""
        state = model
        try:
            return self._iteration(state, logger)
        except self._redis_errors() as exc:
            self.count("redis_errors")
            state.redis_backoff = _grow(state.redis_backoff, self._opt("max_backoff"))
            state.wait_until = time.monotonic() + state.redis_backoff
            self._warn(state, logger, "redis", "Redis error (%s: %s); retrying in %.1f s",
                       type(exc).__name__, exc, state.redis_backoff)
            return 0

    # -- one iteration ------------------------------------------------------------------

    def _iteration(self, state: QueueState, logger: logging.Logger) -> int:
        if state.unwritten:  # results computed before Redis went away: write them first
            self._write(state, state.unwritten, logger)
            state.unwritten = []
        now = time.monotonic()
        if now < state.wait_until:
            self.stopping.wait(min(state.wait_until - now, WAIT_SLICE_S))
            return 0
        if not state.group_ready:
            self._ensure_group(state)
        state.redis_backoff = 0.0
        if state.client is None and not self._connect_server(state, logger):
            return 0  # server unreachable: take no new jobs (backing off)
        entries = self._claim_retries(state)
        if not entries:
            entries = self._reclaim(state)
        if not entries:
            entries = self._read_new(state)
        if entries:
            self._handle(state, entries, logger)
        return len(entries)

    def _ensure_group(self, state: QueueState) -> None:
        try:
            state.redis.xgroup_create(state.keys.stream, state.keys.group, id="0",
                                      mkstream=True)
        except import_redis().exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        state.group_ready = True

    def _connect_server(self, state: QueueState, logger: logging.Logger) -> bool:
        """(Re)connect the client with a handshake; on failure back off and return
        False."""
        if state.client is not None:
            state.client.close()
            state.client = None
        ip, port, port_out = self.server
        protocol = state.protocol
        for _ in range(2):  # a second try only after a protocol mismatch in "auto"
            try:
                state.client = WKRClient(ip, port, port_out, protocol=protocol,
                                         timeout=self._opt("job_timeout"),
                                         connect_timeout=CONNECT_TIMEOUT_MS,
                                         check_version=False)
                state.protocol = protocol
                return True
            except ProtocolMismatch:
                if self._opt("server_protocol") != "auto":
                    raise
                protocol = "numpy" if protocol == "obj" else "obj"
            except WKRError as exc:
                self._backoff(state)
                self._warn(state, logger, "server", "server %s:%s unreachable (%s); "
                           "retrying in %.1f s", ip, port, exc, state.backoff)
                return False
        return False

    def _backoff(self, state: QueueState) -> None:
        state.backoff = _grow(state.backoff, self._opt("max_backoff"))
        state.wait_until = time.monotonic() + state.backoff

    def _claim_retries(self, state: QueueState) -> list[Entry]:
        """This unit's jobs that failed transiently, claimed again (a new delivery)
        unless another unit took them meanwhile."""
        if not state.retry:
            return []
        now = time.monotonic()
        min_idle = min(now - t for t in state.retry.values())
        sids = list(state.retry)
        state.retry.clear()
        claimed = state.redis.xclaim(state.keys.stream, state.keys.group, state.consumer,
                                     max(0, int(min_idle * 1000) - 50), sids)
        return self._with_deliveries(state, claimed)

    def _reclaim(self, state: QueueState) -> list[Entry]:
        """Jobs idle longer than ``claim_after`` in any unit (rate-limited)."""
        now = time.monotonic()
        if now < state.next_reclaim:
            return []
        claim_after = float(self._opt("claim_after"))
        reply = state.redis.xautoclaim(state.keys.stream, state.keys.group, state.consumer,
                                       int(claim_after * 1000), state.reclaim_cursor,
                                       count=self._opt("prefetch"))
        cursor, claimed = reply[0], reply[1]
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        state.reclaim_cursor = cursor
        if cursor == "0-0":  # scanned the whole backlog: rest until the next period
            state.next_reclaim = now + max(0.05, claim_after / 2)
        claimed = [(sid, fields) for sid, fields in claimed if sid is not None]
        if claimed:
            self.count("reclaimed", len(claimed))
        return self._with_deliveries(state, claimed)

    def _read_new(self, state: QueueState) -> list[Entry]:
        reply = state.redis.xreadgroup(state.keys.group, state.consumer,
                                       {state.keys.stream: ">"},
                                       count=self._opt("prefetch"),
                                       block=max(1, int(self._opt("block_ms"))))
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries.extend(Entry(sid) if fields is None else _parsed(Entry(sid), fields, self)
                           for sid, fields in items)
        return entries

    def _with_deliveries(self, state: QueueState, claimed: list[Any]) -> list[Entry]:
        """Entries for claimed ``(sid, fields)`` with their delivery counts (XPENDING)."""
        if not claimed:
            return []
        pipe = state.redis.pipeline(transaction=False)
        for sid, _fields in claimed:
            pipe.xpending_range(state.keys.stream, state.keys.group, min=sid, max=sid,
                                count=1)
        counts = {}
        for rows in pipe.execute():
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        out = []
        for sid, fields in claimed:
            entry = Entry(sid, deliveries=counts.get(sid, 1))
            out.append(entry if fields is None else _parsed(entry, fields, self))
        return out

    # -- handling -----------------------------------------------------------------------

    def _handle(self, state: QueueState, entries: list[Entry], logger: logging.Logger) -> None:
        max_attempts = int(self._opt("max_attempts"))
        candidates = [e for e in entries if e.job_id is not None and e.dead is None]
        # Jobs that already have a result (another unit, a cancel): acknowledge only.
        stored = state.redis.mget([state.keys.result(e.job_id) for e in candidates]  # type: ignore[arg-type]
                                  ) if candidates else []
        done = {e.sid for e, v in zip(candidates, stored, strict=True) if v is not None}
        over = [e for e in candidates if e.sid not in done and e.deliveries > max_attempts]
        if over:  # the last transient error of each, for the dead letter
            pipe = state.redis.pipeline(transaction=False)
            for e in over:
                pipe.get(state.keys.error(e.job_id))  # type: ignore[arg-type]
            for e, last in zip(over, pipe.execute(), strict=True):
                why = (last.decode(errors="replace") if last else
                       "none recorded (the units holding it died?)")
                e.dead = (f"job {e.job_id} was delivered {e.deliveries} times "
                          f"(-max_attempts {max_attempts}); last error: {why}")
        todo = [e for e in entries
                if e.job_id is not None and e.dead is None and e.sid not in done]
        for e in entries:
            if e.dead is not None:
                e.record = None if e.job_id is None else error_record(
                    DeadLettered(e.dead), e.t_submit)
        if todo:
            self._compute(state, todo, logger)
        finished = [e for e in entries if e.transient is None]
        failed = [e for e in entries if e.transient is not None]
        if finished:
            try:
                self._write(state, finished, logger)
            except self._redis_errors():
                state.unwritten.extend(finished)  # written first once Redis is back
                raise
        if failed:
            self.count("transient_errors", len(failed))
            now = time.monotonic()
            pipe = state.redis.pipeline(transaction=False)
            for e in failed:
                state.retry[e.sid] = now
                pipe.set(state.keys.error(e.job_id), e.transient,  # type: ignore[arg-type]
                         px=max(1, int(self._opt("result_ttl") * 1000)))
            self._backoff(state)
            self._warn(state, logger, "transient", "%d job(s) failed transiently (%s); "
                       "retrying in %.1f s", len(failed), failed[0].transient, state.backoff)
            pipe.execute()
        elif todo:
            state.backoff = 0.0

    def _compute(self, state: QueueState, todo: list[Entry], logger: logging.Logger) -> None:
        """Send the jobs to the server and fill in each one's record or transient error.

        First deliveries go pipelined (the server batches them). Jobs delivered before
        go one at a time, so a job that kills the server's worker (WorkerDied) fails
        alone instead of taking its batch-mates with it again and again."""
        client = state.client
        assert client is not None
        first = [e for e in todo if e.deliveries <= 1]
        again = [e for e in todo if e.deliveries > 1]
        broken = self._send(client, first) if first else None
        for e in again:
            if broken is not None:
                e.transient = broken
                continue
            broken = self._send(client, [e])
            if broken is not None and broken.startswith("WorkerDied"):
                broken = None  # this job's own fault, probably: the server is up
        if any(e.transient is not None for e in todo):  # reconnect before more work
            client.close()
            state.client = None

    def _send(self, client: WKRClient, group: list[Entry]) -> str | None:
        """Send ``group`` pipelined and collect the replies; return why the server looks
        unusable (the first transient error), or None."""
        sent: list[Entry] = []
        broken: str | None = None
        for e in group:
            if broken is not None:
                e.transient = broken
                continue
            try:
                client.encode(e.x, blocking=False)
                sent.append(e)
            except PERMANENT as exc:
                e.record = error_record(_as_server_error(exc), e.t_submit)
                self.count("jobs_failed")
            except (WKRError, OSError) as exc:  # could not send: the server is stuck or gone
                broken = e.transient = f"{type(exc).__name__}: {exc}"
        replies: list[Any]
        try:
            replies = client.fetch_all(on_error="return") if sent else []
        except (WKRError, OSError) as exc:  # a timeout: the whole group is retried
            replies = [exc] * len(sent)
        for e, value in zip(sent, replies, strict=True):
            if not isinstance(value, BaseException):
                e.record = encode_result(True, value, e.t_submit)
                self.count("jobs_done")
            elif isinstance(value, PERMANENT):
                e.record = error_record(_as_server_error(value), e.t_submit)
                self.count("jobs_failed")
            else:
                e.transient = f"{type(value).__name__}: {value}"
                broken = broken or e.transient
        return broken

    def _write(self, state: QueueState, entries: list[Entry], logger: logging.Logger) -> None:
        """One transaction: dead letters (XADD), then the results (SET NX PX each: first
        writer wins), XACK + XDEL and one PUBLISH of the finished ids, all done by one
        server-side script call per :data:`SCRIPT_CHUNK` entries."""
        ttl_ms = max(1, int(self._opt("result_ttl") * 1000))
        keys = state.keys
        pipe = state.redis.pipeline(transaction=True)
        dead = 0
        for e in entries:
            if e.dead is not None:
                fields: dict[str, Any] = {"error": e.dead, "stream_id": e.sid,
                                          "deliveries": e.deliveries}
                if e.job_id is not None:
                    fields["id"] = e.job_id
                pipe.xadd(keys.dead, fields)
                dead += 1
        script = self._script(state)
        for start in range(0, len(entries), SCRIPT_CHUNK):
            part = entries[start:start + SCRIPT_CHUNK]
            written = [e for e in part if e.record is not None and e.job_id is not None]
            script(keys=[keys.stream, *(keys.result(e.job_id) for e in written)],  # type: ignore[arg-type]
                   args=[keys.group, ttl_ms, len(written), keys.channel,
                         *(e.record for e in written), *(e.sid for e in part),
                         dumps([e.job_id for e in written])],
                   client=pipe)
        replies = pipe.execute()
        if dead:
            self.count("dead_lettered", dead)
            self._warn(state, logger, "dead", "dead-lettered %d job(s): %s", dead,
                       next(e.dead for e in entries if e.dead is not None))
        duplicates = sum(int(r) for r in replies[dead:])
        if duplicates:
            self.count("duplicate_results", duplicates)

    @staticmethod
    def _script(state: QueueState) -> Any:
        if state.write_script is None:
            state.write_script = state.redis.register_script(WRITE_SCRIPT)
        return state.write_script

    def _release(self, state: QueueState) -> None:
        """Make the jobs this unit holds claimable by others at once (their idle time
        set past ``claim_after``; JUSTID keeps their delivery counts), then leave the
        group if nothing is held."""
        if state.redis is None or not state.group_ready:
            return
        held = state.redis.xpending_range(state.keys.stream, state.keys.group, min="-",
                                          max="+", count=10_000, consumername=state.consumer)
        sids = [row["message_id"] for row in held]
        idle_ms = int(float(self._opt("claim_after")) * 1000) + 1000
        for start in range(0, len(sids), 1000):
            state.redis.xclaim(state.keys.stream, state.keys.group, state.consumer, 0,
                               sids[start:start + 1000], idle=idle_ms, justid=True)
        if not sids:
            state.redis.xgroup_delconsumer(state.keys.stream, state.keys.group,
                                           state.consumer)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _redis_errors() -> tuple[type[BaseException], ...]:
        redis = import_redis()
        return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError)

    def _warn(self, state: QueueState, logger: logging.Logger, kind: str, msg: str,
              *args: Any) -> None:
        """Log a warning, at most once per second per kind (a stuck server or Redis
        must not flood the log; the next line says how many were left out)."""
        throttle = state.warnings.get(kind)
        if throttle is None:
            throttle = state.warnings[kind] = LogThrottle(logger, burst=1, period=1.0)
        throttle.log(msg, *args)


def _above(low: float, kind: type) -> Any:
    """An argparse type: a ``kind`` number greater than ``low``."""

    def convert(text: str) -> Any:
        value = kind(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be greater than {low:g}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


_DEFAULTS: dict[str, Any] = {}
_parser = argparse.ArgumentParser(add_help=False)
QueueWorker.add_arguments(_parser)
_DEFAULTS.update(vars(_parser.parse_args([])))
del _parser


def _grow(backoff: float, limit: float) -> float:
    return min(float(limit), max(FIRST_BACKOFF_S, backoff * 2))


def _as_server_error(exc: BaseException) -> ServerError:
    if isinstance(exc, ServerError):
        return exc
    return BadInput(f"{type(exc).__name__}: {exc}")


def _parsed(entry: Entry, fields: dict[bytes, bytes], unit: QueueWorker) -> Entry:
    """Fill ``entry`` from its stream fields; a malformed one gets ``dead`` set."""
    raw_id = fields.get(b"id")
    if isinstance(raw_id, bytes):
        try:
            job_id = raw_id.decode()
            if 0 < len(job_id) <= 256:
                entry.job_id = job_id
        except UnicodeDecodeError:
            pass
    try:
        entry.t_submit = float(fields.get(b"t", b""))
    except ValueError:
        entry.t_submit = None
    raw = fields.get(b"x")
    limit = int(unit._opt("max_job_bytes"))
    if entry.job_id is None:
        entry.dead = "malformed entry: no readable job id (field 'id')"
    elif raw is None:
        entry.dead = f"malformed entry for job {entry.job_id}: no input (field 'x')"
    elif len(raw) > limit:  # checked before decoding
        entry.dead = (f"job {entry.job_id} input is {len(raw)} bytes, over -max_job_bytes "
                      f"{limit}")
    else:
        try:
            entry.x = loads(raw)
        except ProtocolError as exc:
            entry.dead = f"malformed input for job {entry.job_id}: {exc}"
    return entry
