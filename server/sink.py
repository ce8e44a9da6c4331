"""The sink: the only role that writes to clients.

It receives DONE messages from workers and FORWARD messages from the ventilator,
reassembles requests that were split across batches, and sends each reply to exactly
the client identity it came from (a ROUTER socket: exact identity, never a prefix).
It also keeps the request statistics reported by ``server_status``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Any

import zmq
from wkr_serving.client import errors as E
from wkr_serving.client import protocol as P
from wkr_serving.client.version import __version__

from . import messages as M
from .config import ServerConfig
from .jobs import Reassembler
from .logs import LogThrottle
from .process import (
    MAX_DRAIN,
    NOBLOCK,
    Endpoints,
    Role,
    bind_internal,
    bind_port,
    drain,
    send_frames,
    spin,
)
from .stats import RateMeter, Summary, Window
from .status import LATENCY_BUCKETS_S, ServerStatus, VentilatorStatus, WorkerStats

__all__ = ["Sink"]

V = P.PROTOCOL_VERSION
#: How often (ms) replies held for a client that is not reading are offered again.
BACKLOG_RETRY_MS = 10
#: Longest (s) a stopping sink keeps offering held replies to clients that are not reading.
BACKLOG_FLUSH_S = 1.0


class Sink(Role):
    name = "sink"
    color = "green"

    def __init__(self, config: ServerConfig, endpoints: Endpoints) -> None:
        super().__init__(config, endpoints)
        self.jobs = Reassembler()
        self.results = 0
        self.errors: dict[str, int] = {}
        self.undeliverable = 0
        self.latency = Window(4096)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0
        self.result_rate = RateMeter()
        self.worker_stats: dict[int, WorkerStats] = {}
        # (worker index, pid) -> id of its last batch answered (DONE) or failed (worker
        # died or hung): a batch is answered once, whichever of the two comes first. A
        # worker holds up to two batches and computes them in order; the ventilator fails
        # a dead worker's batches oldest first, so a higher id settles the lower ones.
        self.settled: dict[tuple[int, int], int] = {}
        # Parts of requests with a lower serial are dropped: a sink started after its
        # predecessor died is told where the requests it can still answer begin.
        self.forget_below = 0
        self._forward_handlers: dict[str, Any] = {
            M.Forward.REPLY: self._forward_reply,
            M.Forward.STATUS: self._forward_status,
            M.Forward.ERROR: self._forward_error,
            M.Forward.PART_ERROR: self._forward_part_error,
            M.Forward.FAILED: self._forward_failed,
            M.Forward.FORGET: self._forward_forget,
        }
        # Replies held for clients that stopped reading (their libzmq queue is full),
        # oldest first. Such a client is "congested": the ventilator refuses its new
        # requests (Overloaded) until this is delivered, so the backlog stays bounded by
        # what the client already had in flight.
        self.backlog: dict[bytes, deque[list[Any]]] = {}
        self.statistic: dict[str, Summary] = {}
        self.hello = {"server_version": __version__, "protocol": self.config.protocol,
                      "protocol_version": V, "max_msg_size": self.config.max_msg_size}

    def boot(self) -> dict[str, Any]:
        assert self.context is not None
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        bind_internal(self.pull, self.endpoints.sink)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Per client: once this many replies wait unread in libzmq, sends to that client
        # fail with EAGAIN and the sink holds its replies itself (see _send).
        self.router.setsockopt(zmq.SNDHWM, self.config.max_queue_size)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.secure_public(self.router)
        port_out = bind_port(self.router, self.config.bind, self.config.port_out,
                             "-port_out")
        self.feedback = self.context.socket(zmq.PUSH)  # to the ventilator, directly
        self.feedback.setsockopt(zmq.SNDHWM, 0)
        self.feedback.setsockopt(zmq.LINGER, 0)
        self.feedback.connect(self.endpoints.feedback)

        self.bad_input_log = LogThrottle(self.logger)
        self.gone_log = LogThrottle(self.logger, logging.INFO)
        self.congestion_log = LogThrottle(self.logger, logging.INFO)
        self.logger.info("returning results on %s:%d", self.config.bind, port_out)
        return {"port_out": port_out}

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        busy_poll_us = self.config.busy_poll_us
        while True:
            if busy_poll_us:  # -busy_poll_us: running when the next message comes
                spin((self.pull, self.router), busy_poll_us)
            events = dict(poller.poll(BACKLOG_RETRY_MS if self.backlog else None))
            if self.backlog:
                self._flush_backlog()
            if self.pull in events:
                drain(self.pull, self._on_internal, MAX_DRAIN)
            if self.router in events:
                drain(self.router, self._on_client, MAX_DRAIN)
            if self.control in events:
                name, _ = self.read_control()
                if name == "stop":
                    # Roles upstream have stopped: deliver whatever they already sent.
                    while drain(self.pull, self._on_internal, MAX_DRAIN):
                        pass
                    self._last_flush()
                    return

    # -- sending ------------------------------------------------------------------------

    def _send(self, client: bytes, frames: list[Any]) -> None:
        backlog = self.backlog.get(client)
        if backlog is not None:  # keep its replies in order behind the held ones
            backlog.append(frames)
            return
        try:
            send_frames(self.router, [client, *frames], NOBLOCK, copy=False)
        except zmq.Again:  # this client's queue is full: it is not reading
            self.backlog[client] = deque([frames])
            self._congested(client, True)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._gone(client, 1)

    def _gone(self, client: bytes, replies: int) -> None:
        self.undeliverable += replies
        self.gone_log.log("client %r is not connected; %d repl%s dropped", client, replies,
                          "y" if replies == 1 else "ies")

    def _flush_backlog(self) -> None:
        """Offer held replies again, oldest first, while their clients take them."""
        for client in list(self.backlog):
            backlog = self.backlog[client]
            while backlog:
                try:
                    send_frames(self.router, [client, *backlog[0]], NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    self._gone(client, len(backlog))
                    backlog.clear()
                    break
                backlog.popleft()
            if not backlog:
                del self.backlog[client]
                self._congested(client, False)

    def _last_flush(self) -> None:
        """Stopping: give clients that are not reading a last, bounded chance."""
        deadline = time.monotonic() + BACKLOG_FLUSH_S
        pause = threading.Event()
        while self.backlog and time.monotonic() < deadline:
            self._flush_backlog()
            pause.wait(BACKLOG_RETRY_MS / 1000.0)
        for client, backlog in self.backlog.items():
            self._gone(client, len(backlog))

    def _congested(self, client: bytes, on: bool) -> None:
        """Tell the ventilator to refuse, or again accept, new requests from ``client``."""
        self.congestion_log.log("client %r %s", client, "stopped reading: holding its "
                                "replies, refusing its new requests" if on else
                                "reads again: backlog delivered")
        self.feedback.send(M.feedback(M.Feedback.CONGESTED, {"client": client, "on": on}))

    def _send_error(self, client: bytes, req_id: int, error: list[Any]) -> None:
        self._count_error(error)
        self._send_replies(client, [(req_id, P.ERROR, error, [])])

    def _count_error(self, error: Any) -> None:
        code = error[0] if isinstance(error, list) and error else "server_error"
        self.errors[code] = self.errors.get(code, 0) + 1

    def _send_replies(self, client: bytes, replies: list[tuple[int, int, Any, list[Any]]],
                      ) -> None:
        """Send ``(req_id, kind, body, frames)`` replies to one client: one message for
        all of them, so a batch holding several of its requests costs one send."""
        if len(replies) == 1:
            req_id, kind, body, frames = replies[0]
            self._send(client, [P.pack([V, kind, req_id, body]), *frames])
            return
        header = P.pack([V, P.REPLIES, [[req_id, kind, body] for req_id, kind, body, _ in replies]])
        self._send(client, [header, *(f for *_, frames in replies for f in frames)])

    def _on_client(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        try:
            if len(frames) != 2:
                raise E.ProtocolError("a message on port_out must be exactly one header frame")
            header = P.unpack_header(frames[1].buffer, expect=P.HELLO)
            if not isinstance(header[2], int) or isinstance(header[2], bool):
                raise E.ProtocolError(
                    f"request id must be an integer, got {P.brief(header[2])}")
        except E.ProtocolError as exc:
            self.bad_input_log.log("rejected message on port_out from client %r: %s", client,
                                   exc)
            self._send_error(client, -1, E.BadInput(str(exc)).to_wire())
            return
        self._send_replies(client, [(header[2], P.REPLY, self.hello, [])])

    # -- internal messages --------------------------------------------------------------

    def _on_internal(self, frames: list[zmq.Frame]) -> None:
        header = P.unpack_header(frames[0].buffer)
        if header[1] == P.DONE:
            self._on_done(M.parse_done(header), frames)
        elif header[1] == P.FORWARD:
            client, req_id, action, value = M.parse_forward(header)
            self._forward_handlers[action](client, req_id, value)

    def _forward_reply(self, client: bytes, req_id: int, value: Any) -> None:
        self._send_replies(client, [(req_id, P.REPLY, value, [])])

    def _forward_status(self, client: bytes, req_id: int, value: Any) -> None:
        self._send_replies(client, [(req_id, P.REPLY, self._status(value), [])])

    def _forward_error(self, client: bytes, req_id: int, value: Any) -> None:
        self._send_error(client, req_id, value)

    def _forward_part_error(self, client: bytes, req_id: int, value: Any) -> None:
        """Items that never reached a worker (or will not again)."""
        part = M.PartError._make(value)
        self._fail_part(client, req_id, part.serial, part.offset, part.total, part.n_items,
                        part.t_recv, part.error)

    def _forward_failed(self, client: bytes, req_id: int, value: Any) -> None:
        """A batch whose worker died or hung, unless its DONE came first. With an error,
        its requests get it; without, the ventilator is told to retry the batch."""
        failed = M.parse_failed(value)
        key = (failed.worker, failed.pid)
        fresh = self.settled.get(key, 0) < failed.batch_id
        if fresh:
            self.settled[key] = failed.batch_id
        if failed.error is None:
            self.feedback.send(M.feedback(M.Feedback.DEAD_BATCH, {
                "worker": failed.worker, "pid": failed.pid, "batch_id": failed.batch_id,
                "retry": fresh}))
            return
        if fresh:
            for p in failed.parts:
                self._fail_part(p.client, p.req_id, p.serial, p.offset, p.total, p.n_items,
                                p.t_recv, failed.error)

    def _forward_forget(self, client: bytes, req_id: int, value: Any) -> None:
        """This sink replaced one that died: the requests below serial ``value`` were
        failed by their clients when the old sink's connection dropped."""
        self.forget_below = max(self.forget_below, int(value))
        dropped = self.jobs.forget_below(self.forget_below)
        self.logger.info("new sink: parts of requests before serial %d are dropped (%d "
                         "partly answered forgotten)", self.forget_below, dropped)

    def _fail_part(self, client: bytes, req_id: int, serial: int, offset: int, total: int,
                   count: int, t_recv: float, error: Any) -> None:
        if serial < self.forget_below:
            return
        reply = self._finish(client, serial, offset, total, count, t_recv, None, [], error,
                             time.monotonic())
        if reply is not None:
            self._send_replies(client, [(req_id, *reply)])

    def _on_done(self, done: M.Done, frames: list[zmq.Frame]) -> None:
        key = (done.worker, done.pid)
        if self.settled.get(key, 0) >= done.batch_id:
            return  # already failed: the worker was given up on (hung) before it answered
        self.settled[key] = done.batch_id
        now = time.monotonic()
        pos = 1
        outbox: dict[bytes, list[tuple[int, int, Any, list[Any]]]] = {}
        for part in done.parts:
            part_frames = []
            if part.error is None:
                part_frames = frames[pos:pos + part.n_items]
                pos += part.n_items
            if part.serial < self.forget_below:
                continue
            reply = self._finish(part.client, part.serial, part.offset, part.total,
                                 part.n_items, part.t_recv, part.metas, part_frames,
                                 part.error, now)
            if reply is not None:
                outbox.setdefault(part.client, []).append((part.req_id, *reply))
        for client, replies in outbox.items():
            self._send_replies(client, replies)
        stats = self.worker_stats.setdefault(done.worker, {"batches_done": 0, "busy_s": 0.0})
        stats["batches_done"] += 1
        stats["busy_s"] += done.busy
        for key_, values in done.user_stats.items():
            summary = self.statistic.get(key_)
            if summary is None:
                summary = self.statistic[key_] = Summary()
            for value in values:
                summary.add(value)

    def _finish(self, client: bytes, serial: int, offset: int, total: int, count: int,
                t_recv: float, metas: list[Any] | None, frames: list[Any], error: Any,
                now: float) -> tuple[int, Any, list[Any]] | None:
        """Account one part of request ``serial``; once the request is decided, return its
        reply as ``(kind, body, frames)``."""
        done = self.jobs.add(client, serial, offset, total, count, metas, frames, error)
        if done is None:
            return None
        elapsed = now - t_recv
        self.latency.add(elapsed)
        self.latency_counts[bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1
        self.latency_sum += elapsed
        self.result_rate.add(now)
        if done.error is not None:
            self._count_error(done.error)
            return P.ERROR, done.error, []
        self.results += 1
        return P.RESULT, done.metas, done.frames or []

    def _status(self, status: VentilatorStatus) -> ServerStatus:
        """Complete the ventilator's status snapshot with what only the sink knows."""
        now = time.monotonic()
        ms = {k: v * 1000.0 for k, v in self.latency.percentiles((50, 90, 99)).items()}
        full: ServerStatus = {
            **status,
            "sink_pid": os.getpid(),
            "congested_clients": len(self.backlog),
            "held_replies": sum(len(b) for b in self.backlog.values()),
            "num_results": self.results,
            "num_errors": dict(self.errors),
            "num_undeliverable": self.undeliverable,
            "pending_split_requests": len(self.jobs),
            "latency_ms": {"p50": ms["p50"], "p90": ms["p90"], "p99": ms["p99"],
                           "window": len(self.latency)},
            "latency_histogram": {"buckets_s": list(LATENCY_BUCKETS_S),
                                  "counts": list(self.latency_counts),
                                  "sum_s": self.latency_sum},
            "throughput_per_s": {"last_1s": self.result_rate.rate(now - 1, 1),
                                 "last_10s": self.result_rate.rate(now, 10),
                                 "last_60s": self.result_rate.rate(now, 60)},
            "statistic": {k: s.snapshot() for k, s in sorted(self.statistic.items())},
        }
        for worker in full["workers"]:
            stats = self.worker_stats.get(worker["index"])
            if stats is not None:
                worker.update(stats)
        return full
