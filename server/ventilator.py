"""The ventilator: receives every client frame, queues items, forms batches, dispatches.

Dispatch is credit-based: a worker holds at most ``WORKER_CREDIT`` (two) batches, the one
it computes and the next. A new worker's first READY gives it that credit; each later
READY names the batch it ends (workers compute their batches in order) and gives one
back. An idle worker is served first, by the batching rule (at once if the batch is full
or the server otherwise idle, else after ``-batch_group_timeout``); a worker computing
a batch under steady load gets its next one when a full batch is queued, or shortly
before it is expected to finish (its moving average of batch time, less
``PREFETCH_LEAD_S``), so it goes from one batch to the next without waiting for a round
trip through the ventilator, and the next batch is formed as late as that allows,
holding as many items as possible (``should_prefetch``: not for a batch that is overdue,
nor for workers with long batches). So a worker never holds a queue: at most one batch
waits in its hands. Replies the
ventilator makes itself (status, errors) travel through the sink, the one place that
writes to clients.

A client message is read part by part: its header first, checked and unpacked with
bounds (``-max_request_items``, the header's byte size, the sizes its metas declare)
before any payload part is looked at. A refused message's remaining parts are dropped
as they are read, a slice per turn of the loop, never kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
from wkr_serving.client import errors as E
from wkr_serving.client import protocol as P
from wkr_serving.client.access import authorize, peer_address
from wkr_serving.client.version import __version__

from . import messages as M
from .batching import (
    PREFETCH_GAP_S,
    WORKER_CREDIT,
    BatchQueue,
    Request,
    Slice,
    dispatch_wait,
    prefetch_wait,
    service_average,
    should_dispatch,
    should_prefetch,
)
from .config import ServerConfig
from .devices import describe
from .logs import LogThrottle
from .process import (
    LINGER_MS,
    MAX_DRAIN,
    Endpoints,
    Role,
    bind_internal,
    bind_port,
    drain,
    readable,
    send_frames,
)
from .stats import Histogram
from .status import VentilatorStatus, WorkerHistory, WorkerRow

__all__ = ["Ventilator"]

#: Messages libzmq buffers per client connection before it stops reading from it.
CLIENT_RCVHWM = 10_000
#: Poll interval (ms) when nothing is due; control messages wake the loop anyway.
IDLE_POLL_MS = 1000
#: Most parts of a refused message dropped in one turn of the loop, so that one of
#: millions of parts does not hold batches back from the workers meanwhile.
DISCARD_SLICE = 65_536
#: Longest client header frame: this many bytes, plus HEADER_ITEM_BYTES per item of
#: -max_request_items. A header needs far less (a meta is 1 byte, or about 10-30 for an
#: array); the cap bounds what unpacking one can allocate (a byte of msgpack can become
#: a Python object of ~64 bytes).
HEADER_BASE_BYTES = 64 * 1024
HEADER_ITEM_BYTES = 64
#: Inputs remembered as present at one worker death (most recent kept), and inputs
#: quarantined after a second one (oldest forgotten beyond this many).
SUSPECTS_MAX = 100_000
QUARANTINE_MAX = 10_000
#: Bits of a serial number or batch id below the ventilator's generation: a restarted
#: ventilator numbers on from where no earlier one can have reached.
GENERATION_SHIFT = 40
#: Longest model_dir, model_name or version a switch_model command may carry.
MAX_MODEL_ARG_CHARS = 4096


@dataclass(slots=True)
class _Batch:
    """A batch sent to a worker and not yet done."""

    batch_id: int
    slices: list[Slice]
    items: int


@dataclass(slots=True)
class _WorkerState:
    ident: bytes  # its ZeroMQ identity (worker-<index>[.<generation>])
    index: int  # its slot
    pid: int
    device_id: int
    epoch: int = 0  # the model it serves (see Request.epoch)
    retiring: bool = False  # being recycled: no more work once its batches are done
    #: Batches sent to it and not yet done, oldest first (at most WORKER_CREDIT): it
    #: computes them in this order, the first now.
    held: deque[_Batch] = field(default_factory=deque)
    #: When its first held batch started: when it was sent, to an idle worker, or when
    #: the READY for the batch before it came (for -worker_timeout and the average).
    started: float = 0.0
    #: Moving average (s) of its batches' service time, from start to READY (0.0: none
    #: timed yet; its first batch, which may include warming up, is not).
    service: float = 0.0
    #: Whether its first held batch followed the one before at once (PREFETCH_GAP_S):
    #: only then may it get its next batch ahead (see _prefetch).
    steady: bool = False
    idle_since: float = 0.0  # when it last finished all it held
    idle_turn: int = 0  # ... in which turn of the ventilator's loop
    batches: int = 0
    items: int = 0
    done: int = 0  # batches it finished


@dataclass(slots=True)
class _DeadBatch:
    """A dead worker's batch, until the sink says whether it answered it."""

    slices: list[Slice]
    death: str  # how the worker died
    #: The key of the batch it held behind this one: if this one was not answered, that
    #: one never started (the worker computes its batches in order).
    behind: tuple[int, int, int] | None = None
    #: False: it never started, so its items are retried without suspicion.
    ran: bool = True


#: The REQUEST options the server uses, with the type of each value.
KNOWN_OPTIONS = {"suppress_log_input": bool, "request_id": str, "evaluate": bool}


def _request_options(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Check a REQUEST's options map: ``(the known options or None, None)``, or ``(None,
    why it is refused)``. Unknown keys are ignored (a newer client may send them), but
    every value must still be small: nil, a boolean or a short string."""
    if value is None:
        return None, None
    if value.__class__ is not dict:
        return None, f"request options must be a map, got {P.brief(value)}"
    if len(value) > P.MAX_OPTIONS:
        return None, f"request options have {len(value)} entries (at most {P.MAX_OPTIONS})"
    known: dict[str, Any] = {}
    for key, item in value.items():
        if key.__class__ is not str or len(key) > P.MAX_OPTION_CHARS:
            return None, f"request option names are short strings, got {P.brief(key)}"
        if item is None:
            continue
        if not (item.__class__ is bool
                or (item.__class__ is str and len(item) <= P.MAX_OPTION_CHARS)):
            return None, (f"request option {key!r} must be a boolean or a string of at most "
                          f"{P.MAX_OPTION_CHARS} characters, got {P.brief(item)}")
        kind = KNOWN_OPTIONS.get(key)
        if kind is None:
            continue
        if item.__class__ is not kind:
            return None, (f"request option {key!r} must be a {kind.__name__}, got "
                          f"{P.brief(item)}")
        known[key] = item
    return known or None, None


def _fingerprint(meta: Any, frame: zmq.Frame) -> bytes:
    """What identifies an input across requests: its meta and its bytes."""
    digest = hashlib.blake2b(repr(meta).encode(), digest_size=16)
    digest.update(frame.buffer)
    return digest.digest()


def _bounded_add(store: OrderedDict[bytes, bool], key: bytes, limit: int) -> None:
    """Add ``key`` as the newest entry of ``store``, forgetting the oldest over ``limit``."""
    store[key] = True
    store.move_to_end(key)
    if len(store) > limit:
        store.popitem(last=False)


class Ventilator(Role):
    name = "ventilator"
    color = "magenta"

    def __init__(self, config: ServerConfig, endpoints: Endpoints, started_at: float,
                 generation: int = 0, history: dict[int, WorkerHistory] | None = None,
                 ) -> None:
        super().__init__(config, endpoints)
        self.started_at = started_at
        #: How many ventilators of this server came before this one (restarts): its
        #: serial numbers and batch ids start above any an earlier one used.
        self.generation = generation
        self.serial_base = generation << GENERATION_SHIFT
        self.port: int | None = None
        self.queue = BatchQueue()
        self.idle: deque[bytes] = deque()  # identities of idle workers, in READY order
        self.workers: dict[bytes, _WorkerState] = {}
        #: Workers computing a batch under steady load with credit for the next one (not
        #: retiring), in the order they began it: candidates for a batch ahead.
        self.open: dict[bytes, _WorkerState] = {}
        self.busy = 0  # workers holding at least one batch
        self.turn = 0  # turns of the loop so far
        self.batch_id = self.serial_base
        self.requests = 0
        self.items = 0
        self.rejected = 0
        self.expired = 0
        self.overloaded = 0
        self.retried = 0  # items retried after their worker died
        self.poisoned = 0  # requests answered PoisonInput
        self.batch_sizes = Histogram()
        # worker index -> restarts, last error (a restarted ventilator is given its
        # predecessor's by the supervisor)
        self.history: dict[int, WorkerHistory] = dict(history or {})
        self.congested: set[bytes] = set()  # clients whose results wait unread in the sink
        #: Batches of dead workers, until the sink says whether to retry them, by
        #: (worker index, pid, batch id).
        self.dead: dict[tuple[int, int, int], _DeadBatch] = {}
        self.suspects: OrderedDict[bytes, bool] = OrderedDict()  # inputs at one death
        self.quarantine: OrderedDict[bytes, bool] = OrderedDict()  # ... at two
        self.retry_prints: dict[tuple[int, int], bytes] = {}  # (serial, item) of retries
        self.draining = False
        self.drained_reported = False
        #: Model epoch -> how many workers of it are known: a request split by one epoch
        #: waits for that epoch's workers while any is left (BatchQueue.take).
        self.epochs: dict[int, int] = {}
        #: What the supervisor says is served: {"current": {name, version, dir, epoch,
        #: metadata}, "versions": {epoch: version}, "switch": state or None}.
        self.model: dict[str, Any] = {"current": {
            "name": self.config.model_name, "version": self.config.model_version,
            "dir": self.config.model_dir, "epoch": 0, "metadata": {}},
            "versions": {0: self.config.model_version}, "switch": None}
        #: The client waiting for the model switch it asked for: (client, request id).
        self.switch_waiter: tuple[bytes, int] | None = None
        self.max_header_bytes = HEADER_BASE_BYTES + HEADER_ITEM_BYTES * \
            self.config.max_request_items
        # -max_msg_size (or None: no limit) also caps what a request's metas declare.
        self.max_decoded = self.config.max_msg_size if self.config.max_msg_size > 0 else None
        self.more = False  # parts of the client message being read are still unread
        self.discarding = False  # ... and they belong to a refused message: drop them
        self.discarded = 0  # parts dropped in all
        self._control_handlers: dict[str, Callable[[Any], Any]] = {
            M.Control.WORKER_LOST: self._on_worker_lost,
            M.Control.DRAIN: self._on_drain,
            M.Control.SINK_RESTARTED: self._on_sink_restarted,
            M.Control.STOP: self._on_stop,
            M.Control.MODEL: self._on_model,
            M.Control.SWITCH_RESULT: self._on_switch_result,
        }
        #: The client commands, by name.
        self._commands: dict[str, Callable[[bytes, int, Any, Any], None]] = {
            "status": self._command_status,
            "ping": self._command_ping,
            "terminate": self._command_terminate,
            "metadata": self._command_metadata,
            "switch_model": self._command_switch_model,
        }

    # -- boot ---------------------------------------------------------------------------

    def boot(self) -> dict[str, Any]:
        assert self.context is not None
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # Per connection: a client sending faster than the ventilator reads is held back
        # by TCP (its send then times out) instead of growing this process's memory.
        self.frontend.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.secure_public(self.frontend)
        self.port = bind_port(self.frontend, self.config.bind, self.config.port, "-port")
        self.backend = self.context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its name
        bind_internal(self.backend, self.endpoints.workers)
        self.sink = self.context.socket(zmq.PUSH)
        self.sink.setsockopt(zmq.SNDHWM, 0)
        self.sink.setsockopt(zmq.LINGER, LINGER_MS)
        self.sink.connect(self.endpoints.sink)
        self.feedback = self.context.socket(zmq.PULL)  # from the sink, directly
        self.feedback.setsockopt(zmq.LINGER, 0)
        bind_internal(self.feedback, self.endpoints.feedback)
        self.bad_input_log = LogThrottle(self.logger)
        self.logger.info("listening for clients on %s:%d", self.config.bind, self.port)
        return {"port": self.port}

    # -- loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.feedback, zmq.POLLIN)
        timeout: float | None = None
        group_timeout = self.config.batch_group_timeout / 1000.0
        while True:
            self.turn += 1
            # Rounded up (poll counts whole ms): never woken before what it waits for.
            wait_ms = IDLE_POLL_MS if timeout is None else max(0, math.ceil(timeout * 1000))
            events = dict(poller.poll(wait_ms))
            if self.backend in events:
                drain(self.backend, self._on_worker, MAX_DRAIN)
            if self.frontend in events:
                self._read_clients(MAX_DRAIN)
            if self.feedback in events:
                drain(self.feedback, self._on_feedback, MAX_DRAIN)
            if self.control in events and self._on_control():
                return
            now = time.monotonic()
            timeout = self._dispatch(now, group_timeout)
            if self.config.worker_timeout and self.busy:
                hung_in = self._check_hung(now)
                timeout = hung_in if timeout is None else min(timeout, hung_in)
            if self.draining and not self.drained_reported and self._idle_now():
                self.drained_reported = True
                self.event(M.Event.DRAINED, {"requests": self.requests})

    def _idle_now(self) -> bool:
        return not self.queue.items and self.busy == 0

    # -- clients ------------------------------------------------------------------------

    def _read_clients(self, limit: int) -> None:
        """Handle up to ``limit`` waiting client messages, part by part. A refused
        message's remaining parts are dropped, at most DISCARD_SLICE of them per call:
        the loop goes on with the workers and comes back for the rest."""
        frontend = self.frontend
        n = 0
        while n < limit and readable(frontend):
            if self.discarding:
                if not self._discard(DISCARD_SLICE):
                    return
            else:
                self._on_client(self._next())
                if self.more:  # the message was refused before all of it was read
                    self.discarding = True
            n += 1

    def _next(self) -> zmq.Frame:
        """The next part of the client message being read (one is there: libzmq delivers
        a message's parts together)."""
        frame = self.frontend.recv(copy=False)
        self.more = frame.more
        return frame

    def _discard(self, limit: int) -> bool:
        """Drop up to ``limit`` remaining parts of a refused message, without copying or
        keeping them; True once none is left."""
        recv = self.frontend.recv
        dropped = 0
        more = self.more
        while more and dropped < limit:
            more = recv(copy=False).more
            dropped += 1
        self.discarded += dropped
        self.more = more
        self.discarding = more
        return not more

    def _payload(self, count: int) -> list[zmq.Frame]:
        """The rest of the message, as its payload frames, if there are at most ``count``;
        else ``count + 1`` of them, and the rest is left unread (and then discarded)."""
        frames: list[zmq.Frame] = []
        recv = self.frontend.recv
        more = self.more
        while more and len(frames) <= count:
            frame = recv(copy=False)
            more = frame.more
            frames.append(frame)
        self.more = more
        return frames

    def _on_client(self, ident: zmq.Frame) -> None:
        client = ident.bytes
        if not self.more:
            self._reject(client, -1, E.BadInput("empty message: a header frame is required"))
            return
        head = self._next()
        size = len(head)
        try:
            if size > self.max_header_bytes:
                raise P.HeaderLimitError(
                    f"header of {size} bytes is over the server's limit of "
                    f"{self.max_header_bytes} bytes (it grows with -max_request_items)")
            header = P.unpack_header(head.buffer, max_items=self.config.max_request_items)
        except E.ProtocolError as exc:
            # A header over the bounds, not unpacked: a REQUEST's id and number of items
            # are read from its first bytes, for the refusal.
            declared = P.declared_request(head.buffer) if isinstance(
                exc, P.HeaderLimitError) else None
            if declared is None:
                self._reject(client, -1, E.BadInput(str(exc)))
            elif declared[1] > self.config.max_request_items:
                self._reject(client, declared[0], self._too_many(declared[1]))
            else:
                self._reject(client, declared[0], E.BadInput(str(exc)))
            return
        kind, req_id = header[1], header[2]
        if not isinstance(req_id, int) or isinstance(req_id, bool):
            self._reject(client, -1, E.BadInput(
                f"request id must be an integer, got {P.brief(req_id)}"))
        elif kind == P.REQUEST:
            self._on_request(client, req_id, header)
        elif kind == P.COMMAND:
            if self.more:
                self._reject(client, req_id, E.BadInput("a command is one header frame"))
            else:
                self._on_command(client, req_id, header[4], header[5], head)
        else:
            self._reject(client, req_id, E.BadInput(f"message kind {kind} is not accepted here"))

    def _too_many(self, count: int) -> E.BadInput:
        limit, queue = self.config.max_request_items, self.config.max_queue_size
        also = f" (and its -max_queue_size {queue})" if count > queue else ""
        return E.BadInput(f"request of {count} items is over the server's -max_request_items "
                          f"{limit}{also}: send it in smaller requests")

    def _on_request(self, client: bytes, req_id: int, header: list[Any]) -> None:
        """A REQUEST whose header was read: everything its header says is checked before
        its payload parts are read."""
        timeout_ms, metas = header[3], header[4]
        options = None
        if len(header) > 5:  # the optional options map (the log's per-request settings)
            options, why = _request_options(header[5])
            if why is not None:
                self._reject(client, req_id, E.BadInput(why))
                return
        if not isinstance(metas, list) or not metas:
            self._reject(client, req_id, E.BadInput(
                f"request metas must be a non-empty list (one meta per item), got "
                f"{P.brief(metas)}"))
            return
        n = len(metas)
        if n > self.config.max_request_items:
            self._reject(client, req_id, self._too_many(n))
            return
        if (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
                or not 0 <= timeout_ms < 1e12):
            self._reject(client, req_id, E.BadInput(f"bad timeout_ms {P.brief(timeout_ms)}"))
            return
        limit = self.config.max_queue_size
        if n > limit:  # before looking at each item
            self._reject(client, req_id, E.BadInput(
                f"request of {n} items is larger than the server's -max_queue_size "
                f"{limit}: send it in smaller requests"))
            return
        try:
            P.check_metas(metas, self.max_decoded)
        except E.ProtocolError as exc:
            self._reject(client, req_id, E.BadInput(str(exc)))
            return
        frames = self._payload(n)
        if len(frames) != n:
            carried = f"more than {n}" if len(frames) > n else str(len(frames))
            self._reject(client, req_id, E.BadInput(
                f"request declares {n} items but carries {carried} payload frames"))
            return
        if self.draining:
            self._reject(client, req_id, E.ShuttingDown("server is shutting down"))
            return
        if client in self.congested:
            self.overloaded += 1
            self._forward(client, req_id, M.Forward.ERROR, E.Overloaded(
                "this client is not reading its results: the server holds them and accepts "
                "no new request from it until they are read").to_wire())
            return
        now = time.monotonic()
        if self.queue.items + n > limit:
            self._expire(now)
            if self.queue.items + n > limit:
                self.overloaded += 1
                self._forward(client, req_id, M.Forward.ERROR, E.Overloaded(
                    f"server overloaded: {self.queue.items} items queued (-max_queue_size "
                    f"{limit}); retry later").to_wire())
                return
        if self.quarantine:
            bad = self._quarantined_item(metas, frames)
            if bad is not None:
                self.poisoned += 1
                self._forward(client, req_id, M.Forward.ERROR, E.PoisonInput(
                    f"item {bad} of this request is quarantined: it was in the batches of "
                    "two workers that died, and is not computed again").to_wire())
                return
        deadline = now + timeout_ms / 1000.0 if timeout_ms else 0.0
        self.requests += 1
        self.queue.push(Request(client, req_id, now, deadline, metas, frames,
                                serial=self.serial_base + self.requests,
                                options=options))
        self.items += n

    def _on_command(self, client: bytes, req_id: int, name: Any, args: Any,
                    frame: zmq.Frame) -> None:
        # Look up only strings: an ndarray (or other unhashable value) is no name.
        if not isinstance(name, str):
            self._reject(client, req_id, E.UnknownCommand(
                f"a command name is a string, got {P.brief(name)}"))
            return
        handler = self._commands.get(name)
        if handler is None:
            self._reject(client, req_id, E.UnknownCommand(f"unknown command {P.brief(name)}"))
        else:
            handler(client, req_id, args, frame)

    def _command_status(self, client: bytes, req_id: int, args: Any, frame: Any) -> None:
        self._forward(client, req_id, M.Forward.STATUS, self._snapshot())

    def _command_ping(self, client: bytes, req_id: int, args: Any, frame: Any) -> None:
        """The client handshake's ping, which asks for the request limits too."""
        wants_limits = args.__class__ is dict and args.get("limits") is True
        self._forward(client, req_id, M.Forward.REPLY,
                      self._limits() if wants_limits else "pong")

    def _refused(self, name: str, client: bytes, req_id: int, args: Any,
                 frame: zmq.Frame) -> tuple[bool, str | None]:
        """``(refused, peer)`` for a command that stops or changes the server: a refusal
        is logged and answered Unauthorized here."""
        peer = peer_address(frame)
        refusal = self._authorize(args, peer)
        if refusal is not None:
            self.logger.warning("refused %s from %s (client %r): %s", name, peer, client,
                                refusal)
            self._forward(client, req_id, M.Forward.ERROR, E.Unauthorized(refusal).to_wire())
        return refusal is not None, peer

    def _command_terminate(self, client: bytes, req_id: int, args: Any,
                           frame: zmq.Frame) -> None:
        refused, peer = self._refused("terminate", client, req_id, args, frame)
        if refused:
            return
        self.logger.warning("terminate command from %s (client %r): stopping", peer, client)
        self._forward(client, req_id, M.Forward.REPLY, {"stopping": True,
                                                        "supervisor_pid": os.getppid()})
        self.event(M.Event.TERMINATE, {"peer": peer})

    def _command_metadata(self, client: bytes, req_id: int, args: Any, frame: Any) -> None:
        current = self.model["current"]
        self._forward(client, req_id, M.Forward.REPLY, {
            "model_name": current["name"], "model_version": current["version"],
            "model_dir": current["dir"], "epoch": current["epoch"],
            "metadata": current.get("metadata") or {}, "switch": self.model["switch"]})

    def _command_switch_model(self, client: bytes, req_id: int, args: Any,
                              frame: zmq.Frame) -> None:
        """Ask the supervisor to switch the model (it answers with SWITCH_RESULT, which
        is forwarded to this client). Needs the token or a loopback peer."""
        refused, peer = self._refused("switch_model", client, req_id, args, frame)
        if refused:
            return
        target: dict[str, str | None] = {}
        for key in ("model_dir", "model_name", "version"):
            value = args.get(key) if args.__class__ is dict else None
            if value is not None and (value.__class__ is not str or not value
                                      or len(value) > MAX_MODEL_ARG_CHARS):
                self._forward(client, req_id, M.Forward.ERROR, E.BadInput(
                    f"switch_model: {key} must be a non-empty string of at most "
                    f"{MAX_MODEL_ARG_CHARS} characters, got {P.brief(value)}").to_wire())
                return
            target[key] = value
        if self.switch_waiter is not None or self.draining:
            self._forward(client, req_id, M.Forward.ERROR, E.SwitchFailed(
                "the server is stopping" if self.draining else
                "another model switch is under way: wait for it to end").to_wire())
            return
        self.logger.warning("switch_model from %s (client %r): %s", peer, client, target)
        self.switch_waiter = (client, req_id)
        self.event(M.Event.SWITCH, target)

    def _limits(self) -> dict[str, Any]:
        """What a client checks before sending a request (the handshake ping's answer)."""
        return {"pong": True, "max_request_items": self.config.max_request_items,
                "max_msg_size": self.config.max_msg_size,
                "batch_size": self.config.batch_size, "num_worker": self.config.num_worker}

    def _authorize(self, args: Any, peer: str | None) -> str | None:
        """Why a command that stops or changes the server is refused (None: allowed)."""
        return authorize(self.config.auth_token, args, peer)

    def _reject(self, client: bytes, req_id: int, error: E.ServerError) -> None:
        self.rejected += 1
        self.bad_input_log.log("rejected message %r from client %r: %s", req_id, client,
                               error.message)
        self._forward(client, req_id, M.Forward.ERROR, error.to_wire())

    def _expire(self, now: float) -> None:
        """Answer the queued requests whose deadline passed, without computing them."""
        expired = self.queue.expire(now)
        if expired:
            self.expired += len(expired)
            self._fail_parts(expired, E.DeadlineExceeded(
                "deadline passed while the request waited in the queue"))

    def _fail_parts(self, slices: list[Slice], error: E.ServerError) -> None:
        """Fail items that never reached a worker (or go to none again)."""
        wire = error.to_wire()
        for req, offset, count in slices:
            self._forward(req.client, req.req_id, M.Forward.PART_ERROR, M.PartError(
                offset, req.total, count, req.t_recv, wire, req.serial))

    def _forward(self, client: bytes, req_id: int, action: M.Forward, value: Any) -> None:
        self.sink.send(M.forward(client, req_id, action, value))

    # -- workers ------------------------------------------------------------------------

    def _on_worker(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        message = M.parse_ready(frames[1].buffer)
        if not isinstance(message, M.Ready):
            self._on_retire(ident)
            return
        worker = self.workers.get(ident)
        if worker is not None and worker.pid != message.pid:
            self._lose_worker(ident, "was replaced")  # a restarted worker took its name
            worker = None
        if worker is None:
            worker = self.workers[ident] = _WorkerState(ident, message.worker, message.pid,
                                                        message.device_id, message.epoch)
            self.epochs[message.epoch] = self.epochs.get(message.epoch, 0) + 1
            self.logger.info("%s (pid %d, %s, model epoch %d) is ready", ident.decode(),
                             message.pid, describe(message.device_id), message.epoch)
            self._report_workers()
            self.idle.append(ident)  # its full credit: it holds nothing of this ventilator's
            return
        done = M.parse_ready_done(frames)
        if worker.held and done >= worker.held[0].batch_id:
            self._batches_done(worker, done, time.monotonic())
        # Else it ends no batch of ours: one an earlier ventilator sent, or none (said
        # again after a REANNOUNCE): no credit comes back.

    def _batches_done(self, worker: _WorkerState, done: int, now: float) -> None:
        """Worker ``worker`` finished its held batches up to ``done`` (its READY): one
        credit back for each; time them; the next one held starts now."""
        held = worker.held
        while held and held[0].batch_id <= done:
            self._batch_survived(held.popleft().slices)  # it did not die of it
            worker.done += 1
        if worker.done > 1:
            worker.service = service_average(worker.service, now - worker.started)
        if held:
            worker.started = now
            worker.steady = True
        else:
            worker.idle_since = now
            worker.idle_turn = self.turn
            self.busy -= 1
            if worker.retiring and not self._owes_share(worker):
                self._retired(worker)
                return
            self.idle.append(worker.ident)
        self._place(worker)

    def _place(self, worker: _WorkerState) -> None:
        """Keep :attr:`open` (workers that may get their next batch) up to date."""
        if 0 < len(worker.held) < WORKER_CREDIT and worker.steady and not worker.retiring:
            self.open[worker.ident] = worker
        else:
            self.open.pop(worker.ident, None)

    def _on_retire(self, ident: bytes) -> None:
        """A worker being recycled asks for nothing more: it leaves at once if idle, or
        after the batches already on their way (the READY for its last)."""
        worker = self.workers.get(ident)
        if worker is None:
            self.backend.send_multipart([ident, M.retired()])
        elif worker.held or self._owes_share(worker):
            worker.retiring = True
            self._place(worker)
        else:
            self._retired(worker)

    def _owes_share(self, worker: _WorkerState) -> bool:
        """Whether a retiring worker must first compute the queued rest of a request its
        model's workers began (it is the last of its model epoch): a request is answered
        by one model, even across a model switch."""
        return self.epochs.get(worker.epoch, 0) <= 1 and self.queue.pinned(worker.epoch)

    def _forget(self, ident: bytes) -> _WorkerState | None:
        """Stop dispatching to worker ``ident``; return its state (None: unknown)."""
        worker = self.workers.pop(ident, None)
        if worker is not None:
            self.open.pop(ident, None)
            if ident in self.idle:
                self.idle.remove(ident)
            left = self.epochs.get(worker.epoch, 0) - 1
            if left > 0:
                self.epochs[worker.epoch] = left
            else:
                self.epochs.pop(worker.epoch, None)
        return worker

    def _retired(self, worker: _WorkerState) -> None:
        self._forget(worker.ident)
        self.logger.info("%s (pid %d) retired", worker.ident.decode(), worker.pid)
        with contextlib.suppress(zmq.ZMQError):  # gone already: it was leaving anyway
            self.backend.send_multipart([worker.ident, M.retired()])
        self._report_workers()

    def _report_workers(self) -> None:
        """Tell the supervisor which worker slots can take work."""
        self.event(M.Event.WORKERS, sorted({w.index for w in self.workers.values()}))

    def _lose_worker(self, ident: bytes, why: str, hung: bool = False) -> int:
        """Forget a dead worker; return how many items it held. A hung worker's batch
        fails at once (WorkerDied); a dead one's are retried, unless the sink already had
        their answer (it is asked for each, oldest first, see :meth:`_on_dead_batch`).
        A batch held behind a hung one, or behind one the sink had no answer to, never
        started: it is retried too, its items not counted as suspects."""
        worker = self._forget(ident)
        if worker is None or not worker.held:
            return 0
        self.busy -= 1
        error = E.WorkerDied(f"worker {worker.index} (pid {worker.pid}) died while computing "
                             f"this request: it {why}")
        before: _DeadBatch | None = None
        for k, batch in enumerate(worker.held):
            if hung and k == 0:
                self._fail_batch(worker, batch, error)
                continue
            key = (worker.index, worker.pid, batch.batch_id)
            dead = self.dead[key] = _DeadBatch(batch.slices, error.message, ran=not hung)
            if before is not None:
                before.behind = key
            before = dead
            self._fail_batch(worker, batch, None)
        return sum(batch.items for batch in worker.held)

    def _check_hung(self, now: float) -> float:
        """Give up on batches running longer than ``-worker_timeout``: fail their requests
        and ask the supervisor to kill the worker. Returns seconds until the next check."""
        limit = self.config.worker_timeout
        next_in = limit
        for worker in [w for w in self.workers.values() if w.held]:
            left = worker.started + limit - now  # from when its current batch started
            if left > 0:
                next_in = min(next_in, left)
                continue
            self.logger.error("worker %d (pid %d) exceeded -worker_timeout %.1fs; killing it",
                              worker.index, worker.pid, limit)
            self._lose_worker(worker.ident,
                              f"exceeded -worker_timeout {limit:g}s and is being killed",
                              hung=True)
            self.event(M.Event.WORKER_HUNG, {"index": worker.index, "pid": worker.pid})
        return next_in

    def _fail_batch(self, worker: _WorkerState, batch: _Batch,
                    error: E.ServerError | None) -> None:
        """Tell the sink a worker's batch failed, in one message; it skips it if the
        worker's DONE for that batch already came (it died after answering). Without an
        error, the sink answers whether the batch is to be retried. A worker's batches
        are failed oldest first (the sink keeps the highest batch id settled)."""
        parts = [M.FailedPart(req.client, req.req_id, offset, req.total, count, req.t_recv,
                              req.serial) for req, offset, count in batch.slices]
        self.sink.send(M.forward(b"", 0, M.Forward.FAILED, M.Failed(
            worker.index, worker.pid, batch.batch_id, parts,
            error.to_wire() if error is not None else None)))

    # -- inputs that kill workers -------------------------------------------------------

    def _on_dead_batch(self, value: Any) -> None:
        """The sink's answer about a dead worker's batch: retry its items, each alone,
        unless the worker answered it before it died. An item present at two deaths is
        quarantined: its request gets PoisonInput, now and whenever it comes again. The
        items of a batch that never started are retried as they are."""
        dead = self.dead.pop((value["worker"], value["pid"], value["batch_id"]), None)
        if dead is None or not value["retry"]:
            return
        if dead.behind is not None and dead.behind in self.dead:
            self.dead[dead.behind].ran = False  # not answered: the one behind never began
        slices, death = dead.slices, dead.death
        if not dead.ran:
            for req, offset, count in slices:
                for k in range(offset, offset + count):
                    self.queue.retry((req, k, 1))
                    self.retried += 1
            return
        items = [(req, k, self.retry_prints.pop((req.serial, k), b"")
                  or _fingerprint(req.metas[k], req.frames[k]))
                 for req, offset, count in slices for k in range(offset, offset + count)]
        poisoned: dict[int, E.PoisonInput] = {}  # serial -> the error its request gets
        for req, k, fp in items:
            if self.suspects.pop(fp, False):
                self._quarantine(fp)
                poisoned.setdefault(req.serial, E.PoisonInput(
                    f"item {k} of this request was in the batches of two workers that died "
                    f"({death}): it is quarantined and "
                    "will not be computed again"))
        for req, k, fp in items:
            if req.serial in poisoned:  # the first part answers; the sink drops the rest
                self._fail_parts([(req, k, 1)], poisoned[req.serial])
                continue
            _bounded_add(self.suspects, fp, SUSPECTS_MAX)
            self.retry_prints[(req.serial, k)] = fp
            self.queue.retry((req, k, 1))
            self.retried += 1
        self.poisoned += len(poisoned)

    def _batch_survived(self, slices: list[Slice]) -> None:
        """A retried item was computed without killing its worker: no longer a suspect."""
        if not self.retry_prints:
            return
        for req, offset, count in slices:
            for k in range(offset, offset + count):
                fp = self.retry_prints.pop((req.serial, k), b"")
                if fp:
                    self.suspects.pop(fp, False)

    def _quarantine(self, fp: bytes) -> None:
        if fp not in self.quarantine:
            self.logger.error("an input was in the batches of two workers that died: "
                              "quarantined (%d quarantined inputs)", len(self.quarantine) + 1)
        _bounded_add(self.quarantine, fp, QUARANTINE_MAX)

    def _quarantined_item(self, metas: list[Any], frames: list[zmq.Frame]) -> int | None:
        """The index of the first quarantined item of a request, or None."""
        for k, (meta, frame) in enumerate(zip(metas, frames, strict=True)):
            if _fingerprint(meta, frame) in self.quarantine:
                return k
        return None

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self, now: float, group_timeout: float) -> float | None:
        """Send batches: to idle workers first, then the next batch to workers computing
        one (:meth:`_prefetch`). Return seconds until a wait expires (None: none)."""
        if not self.queue.items or not (self.idle or self.open):
            return None
        batch_size = self.config.batch_size
        self._expire(now)
        passed: list[bytes] = []  # idle workers for which nothing queued is theirs
        wait = None
        while self.idle and self.queue.items:
            oldest = self.queue.oldest()
            waited = now - oldest if oldest is not None else 0.0
            if not self.queue.retries and not should_dispatch(
                    self.queue.items, waited, self.busy, batch_size, group_timeout):
                wait = dispatch_wait(waited, group_timeout)
                break
            ident = self.idle.popleft()
            worker = self.workers.get(ident)
            if worker is None:
                continue
            slices = self.queue.take(batch_size, worker.epoch, self.epochs, worker.retiring)
            if slices:
                self._send_batch(worker, slices, now)
            elif worker.retiring:
                self._retired(worker)  # its model's share is done
            else:  # all that is queued is the rest of requests another model began
                passed.append(ident)
        if passed:
            self.idle.extendleft(reversed(passed))
        if wait is None and self.open and self.queue.items:
            # (While an idle worker waits for its batch to fill, none goes to a busy one.)
            wait = self._prefetch(now, batch_size)
        return wait

    def _prefetch(self, now: float, batch_size: int) -> float | None:
        """Send workers that compute a batch their next one, when a full batch is queued
        or the one they compute is about to end (:func:`should_prefetch`); return seconds
        until the next of those times (None: none), so the loop wakes for it."""
        wake: float | None = None
        for worker in list(self.open.values()):  # in the order they began their batch
            queue = self.queue
            if not queue.items:
                break
            if should_prefetch(queue.items, queue.retries, now, worker.started,
                               worker.service, batch_size):
                slices = queue.take(batch_size, worker.epoch, self.epochs)
                if slices:
                    self._send_batch(worker, slices, now)
                continue
            due_in = prefetch_wait(now, worker.started, worker.service)
            if due_in is not None:
                wake = due_in if wake is None else min(wake, due_in)
        return wake

    def _send_batch(self, worker: _WorkerState, slices: list[Slice], now: float) -> None:
        segments: list[M.Segment] = []
        frames: list[Any] = []
        for req, offset, count in slices:  # options: for the log, and evaluate requests
            end = offset + count
            segments.append(M.Segment(req.client, req.req_id, offset, req.total, count,
                                      req.t_recv, req.deadline, req.metas[offset:end],
                                      req.serial, req.options))
            frames.extend(req.frames[offset:end])
        self.batch_id += 1
        try:
            send_frames(self.backend, [worker.ident, M.batch(self.batch_id, segments),
                                       *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # Never delivered: the items go back to the queue (as retries, ahead of it),
            # and the worker is gone, with whatever it held.
            for req, offset, count in slices:
                for k in range(offset, offset + count):
                    self.queue.retry((req, k, 1))
            self._lose_worker(worker.ident, "disconnected from the ventilator")
            return
        if not worker.held:
            worker.started = now
            worker.steady = worker.done > 0 and (
                worker.idle_turn == self.turn or now - worker.idle_since <= PREFETCH_GAP_S)
            self.busy += 1
        worker.held.append(_Batch(self.batch_id, slices, len(frames)))
        worker.batches += 1
        worker.items += len(frames)
        self.batch_sizes.add(len(frames))
        self._place(worker)

    # -- control ------------------------------------------------------------------------

    def _on_control(self) -> bool:
        """Handle one supervisor message; True means stop now."""
        name, value = self.read_control()
        handler = self._control_handlers.get(name)
        return bool(handler(value)) if handler is not None else False

    def _on_worker_lost(self, value: Any) -> None:
        """The supervisor saw a worker process end: fail or retry what it held, and say
        how many items that was (a worker that dies with no work in hand, again and
        again, means a broken environment)."""
        index, pid = value["index"], value["pid"]
        self.history[index] = {"restarts": value["restarts"], "last_error": value["reason"]}
        held = 0
        for ident, worker in list(self.workers.items()):
            if worker.index == index and worker.pid == pid:
                held = self._lose_worker(ident, value["reason"])
        self.event(M.Event.WORKER_LOST, {"index": index, "pid": pid, "held": held})

    def _on_drain(self, value: Any) -> None:
        self.draining = True
        self.logger.info("draining: no new requests, finishing %d queued items",
                         self.queue.items)

    def _on_sink_restarted(self, value: Any) -> None:
        """A new sink knows none of the requests in flight, whose clients were failed
        (ConnectionLost) when their connection to the old one dropped: it is told to
        drop their parts, and nothing waits on its answers about dead batches."""
        self.congested.clear()
        self.dead.clear()
        self.sink.send(M.forward(b"", 0, M.Forward.FORGET, self.serial_base + self.requests + 1))

    def _on_model(self, value: Any) -> None:
        """The supervisor's word on the models served (at start, and as a switch goes)."""
        self.model = value

    def _on_switch_result(self, value: Any) -> None:
        """A model switch ended: answer the client that asked for it."""
        waiter, self.switch_waiter = self.switch_waiter, None
        if waiter is None:
            return
        client, req_id = waiter
        if value.get("error") is None:
            self._forward(client, req_id, M.Forward.REPLY, value.get("result"))
        else:
            error_class = E.BadInput if value.get("code") == E.BadInput.code else E.SwitchFailed
            self._forward(client, req_id, M.Forward.ERROR,
                          error_class(str(value["error"])).to_wire())

    def _on_stop(self, value: Any) -> bool:
        self._abandon_all()
        self._on_switch_result({"error": "the server stopped before the switch ended"})
        return True

    def _on_feedback(self, frames: list[zmq.Frame]) -> None:
        name, value = M.parse_feedback(frames[0].buffer)
        if name == M.Feedback.CONGESTED:
            if value["on"]:
                self.congested.add(value["client"])
            else:
                self.congested.discard(value["client"])
        elif name == M.Feedback.DEAD_BATCH:
            self._on_dead_batch(value)

    def _abandon_all(self) -> None:
        """Stopping before the queue drained: answer every request still held, so none is
        lost silently (the sink delivers these before it stops, and ignores a worker's
        late answer to a batch failed here)."""
        error = E.ShuttingDown("the server stopped before this request was computed")
        held = self.queue.items
        queued = self.queue.take_all()
        for dead in self.dead.values():
            queued.extend(dead.slices)
        self.dead.clear()
        if queued:
            self._fail_parts(queued, error)
        for worker in self.workers.values():
            for batch in worker.held:  # oldest first
                self._fail_batch(worker, batch, error)
        if queued or self.busy:
            self.logger.warning("stopped with %d queued items and %d busy workers: their "
                                "requests were answered ShuttingDown", held, self.busy)

    def _snapshot(self) -> VentilatorStatus:
        in_flight = sum(batch.items for w in self.workers.values() for batch in w.held)
        in_flight += sum(count for dead in self.dead.values() for _, _, count in dead.slices)
        current = self.model["current"]
        return {
            "server_version": __version__,
            "protocol": self.config.protocol,
            "protocol_version": P.PROTOCOL_VERSION,
            "versions": {"wkr_serving": __version__, "python": platform.python_version(),
                         "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                         "numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version))},
            "config": self.config.as_dict(redact=True),
            "ventilator_pid": os.getpid(),
            "supervisor_pid": os.getppid(),
            "uptime_s": time.time() - self.started_at,
            "ready": len({w.index for w in self.workers.values()}) >= self.config.num_worker,
            "draining": self.draining,
            "queue_items": self.queue.items,
            "in_flight_items": in_flight,
            "busy_workers": self.busy,
            "num_requests": self.requests,
            "num_items": self.items,
            "num_rejected": self.rejected,
            "num_discarded_parts": self.discarded,
            "num_overloaded": self.overloaded,
            "num_expired_in_queue": self.expired,
            "max_queue_size": self.config.max_queue_size,
            "max_request_items": self.config.max_request_items,
            "num_batches": self.batch_id - self.serial_base,
            "num_retried_items": self.retried,
            "num_poisoned": self.poisoned,
            "quarantined_inputs": len(self.quarantine),
            "ventilator_generation": self.generation,
            "model": {"name": current["name"], "version": current["version"],
                      "dir": current["dir"], "epoch": current["epoch"]},
            "switch": self.model["switch"],
            "batch_size": self.batch_sizes.snapshot(),
            "workers": self._worker_rows(),
        }

    def _worker_rows(self) -> list[WorkerRow]:
        rows: list[WorkerRow] = []
        by_slot: dict[int, list[_WorkerState]] = {}
        for worker in self.workers.values():
            by_slot.setdefault(worker.index, []).append(worker)
        for index in range(self.config.num_worker):
            history = self.history.get(index, {"restarts": 0, "last_error": None})
            # While a worker is recycled its slot has two processes: show the one staying.
            w = min(by_slot.get(index, []), key=lambda x: x.retiring, default=None)
            if w is None:
                rows.append({"index": index, "pid": None, "device": None,
                             "state": "restarting" if history["restarts"] else "starting",
                             "batches": 0, "items": 0, "epoch": -1, "model_version": None,
                             **history})
                continue
            rows.append({"index": index, "pid": w.pid, "device": describe(w.device_id),
                         "state": "busy" if w.held else "idle", "batches": w.batches,
                         "items": w.items, "epoch": w.epoch,
                         "model_version": self.model["versions"].get(w.epoch), **history})
        return rows
