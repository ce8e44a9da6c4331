"""The messages the roles of one server send each other, each defined once.

The public wire (client <-> ventilator and sink) is described in
:mod:`wkr_serving.client.protocol`. This module names the *internal* messages: what a
BATCH segment, a DONE part and a failed part hold (typed tuples, which msgpack writes
as the same arrays as before), the names of the events a role sends the supervisor,
of the commands the supervisor sends a role, and of the actions of a FORWARD (the
ventilator asking the sink to answer a client), plus one builder and one parser per
message kind. Roles dispatch on the names with handler tables, never with string
if/elif chains.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

from wkr_serving.client import protocol as P
from wkr_serving.client.errors import ProtocolError

__all__ = [
    "Batch",
    "Control",
    "Done",
    "Event",
    "Failed",
    "FailedPart",
    "Feedback",
    "Forward",
    "Part",
    "PartError",
    "Ready",
    "Segment",
    "batch",
    "control",
    "done",
    "event",
    "feedback",
    "forward",
    "parse_batch",
    "parse_control",
    "parse_done",
    "parse_event",
    "parse_failed",
    "parse_feedback",
    "parse_forward",
    "parse_ready",
    "parse_ready_done",
    "ready",
    "ready_done",
    "retire",
    "retired",
    "worker_identity",
]

V = P.PROTOCOL_VERSION


def worker_identity(index: int, generation: int = 0) -> str:
    """The name of a worker process: its ZeroMQ identity towards the ventilator and
    the supervisor, its log role and its process title. ``generation`` tells apart the
    processes that serve one slot at the same time while a worker is recycled (the
    replacement loads while the old one still serves)."""
    return f"worker-{index}" if not generation else f"worker-{index}.{generation}"


class Event(str, Enum):
    """What a role tells the supervisor (EVENT, role -> supervisor)."""

    READY = "ready"  # booted; value: pid and what it bound
    BOOT_FAILED = "boot_failed"  # value: error, traceback, pid
    DRAINED = "drained"  # ventilator: nothing queued or in flight any more
    WORKERS = "workers"  # ventilator: the worker slots it can dispatch to
    TERMINATE = "terminate"  # ventilator: an authorised client asked to stop
    WORKER_HUNG = "worker_hung"  # ventilator: kill this worker (-worker_timeout)
    WORKER_LOST = "worker_lost"  # ventilator: what a dead worker held
    RECYCLE = "recycle"  # worker: replace me (-max_requests, -max_worker_rss)
    SWITCH = "switch"  # ventilator: an authorised client asked to switch the model


class Control(str, Enum):
    """What the supervisor tells a role (CONTROL, supervisor -> role)."""

    STOP = "stop"  # leave the loop now (after a drain, or at once)
    DRAIN = "drain"  # ventilator: refuse new requests, finish the queued ones
    WORKER_LOST = "worker_lost"  # ventilator: a worker process died
    RETIRE = "retire"  # worker: your replacement is ready; finish and leave
    REANNOUNCE = "reannounce"  # worker: the ventilator restarted; say READY again
    SINK_RESTARTED = "sink_restarted"  # ventilator: the sink restarted
    HANGUP = "hangup"  # worker: reopen the prediction log (SIGHUP)
    MODEL = "model"  # ventilator: the models served (current, by epoch) and the switch
    SWITCH_RESULT = "switch_result"  # ventilator: how the switch a client asked for ended


class Forward(str, Enum):
    """What the ventilator asks the sink to send a client (FORWARD actions)."""

    REPLY = "reply"  # a command's answer
    STATUS = "status"  # a status snapshot, which the sink completes
    ERROR = "error"  # an error for a whole request
    PART_ERROR = "part_error"  # an error for items that never reached a worker
    FAILED = "failed"  # a batch whose worker died or hung
    FORGET = "forget"  # a new sink: drop the parts of requests older than a serial


class Feedback(str, Enum):
    """What the sink tells the ventilator directly (sink PUSH -> ventilator PULL)."""

    CONGESTED = "congested"  # a client stopped (or started again) reading its replies
    DEAD_BATCH = "dead_batch"  # a dead worker's batch was not answered: retry it


class Segment(NamedTuple):
    """``n_items`` consecutive items of a request, starting at ``offset``, in a BATCH.

    ``serial`` numbers the requests the ventilator accepted (the sink reassembles
    split requests by it); ``options`` are the request's known options, sent only when
    the server logs predictions (else nil)."""

    client: bytes
    req_id: int
    offset: int
    total: int
    n_items: int
    t_recv: float
    deadline: float  # absolute monotonic time; 0.0: none
    metas: list[Any]
    serial: int
    options: dict[str, Any] | None


class Part(NamedTuple):
    """The answer to one segment, in a DONE: ``metas`` of its results (whose frames
    follow the header in part order), or ``error`` (then ``metas`` is None)."""

    client: bytes
    req_id: int
    offset: int
    total: int
    n_items: int
    t_recv: float
    metas: list[Any] | None
    error: Any
    serial: int

    @classmethod
    def of(cls, seg: Segment, metas: list[Any] | None, error: Any) -> Part:
        return cls(seg.client, seg.req_id, seg.offset, seg.total, seg.n_items, seg.t_recv,
                   metas, error, seg.serial)


class FailedPart(NamedTuple):
    """One segment of a batch whose worker died or hung (FORWARD ``failed``)."""

    client: bytes
    req_id: int
    offset: int
    total: int
    n_items: int
    t_recv: float
    serial: int


class PartError(NamedTuple):
    """FORWARD ``part_error``: ``n_items`` items of a request, from ``offset``, that no
    worker computed (expired, quarantined, the server stopping)."""

    offset: int
    total: int
    n_items: int
    t_recv: float
    error: Any
    serial: int


class Batch(NamedTuple):
    batch_id: int
    segments: list[Segment]


class Ready(NamedTuple):
    worker: int  # slot index
    pid: int
    device_id: int
    epoch: int  # the model it serves: 0 at start, one more for each model switch


class Done(NamedTuple):
    batch_id: int
    worker: int  # the worker's slot index
    pid: int  # ... and process: a batch is settled once per worker process
    parts: list[Part]
    user_stats: dict[str, list[float]]
    busy: float  # seconds the batch took


class Failed(NamedTuple):
    """FORWARD ``failed``: the batch ``batch_id`` of worker process ``(worker, pid)``."""

    worker: int
    pid: int
    batch_id: int
    parts: list[FailedPart]
    error: Any  # None: retry it if the worker did not answer it (see Feedback.DEAD_BATCH)


# -- builders ----------------------------------------------------------------------------


def batch(batch_id: int, segments: list[Segment]) -> bytes:
    return P.pack([V, P.BATCH, batch_id, segments])


def ready(index: int, pid: int, device_id: int, epoch: int = 0) -> bytes:
    return P.pack([V, P.READY, index, pid, device_id, epoch])


def ready_done(batch_id: int) -> bytes:
    """A READY's second frame: the batch it ends (a READY without one, sent when the
    worker starts or is asked to announce itself again, ends none). The ventilator
    matches it against the batches it sent, so a READY for a batch another ventilator
    sent (before a restart) returns no credit."""
    return batch_id.to_bytes(8, "little")


def retire(index: int, pid: int) -> bytes:
    """Worker -> ventilator: dispatch nothing more to me (I am being replaced)."""
    return P.pack([V, P.RETIRE, index, pid])


def retired() -> bytes:
    """Ventilator -> worker: nothing more will be sent to you; leave."""
    return P.pack([V, P.RETIRED])


def done(batch_id: int, worker: int, pid: int, parts: list[Part],
         user_stats: dict[str, list[float]], busy: float) -> bytes:
    return P.pack([V, P.DONE, batch_id, worker, pid, parts, user_stats, busy])


def forward(client: bytes, req_id: int, action: Forward, value: Any) -> bytes:
    return P.pack([V, P.FORWARD, client, req_id, action, value])


def event(name: Event, value: Any = None) -> bytes:
    return P.pack([V, P.EVENT, name, value])


def control(name: Control, value: Any = None) -> bytes:
    return P.pack([V, P.CONTROL, name, value])


def feedback(name: Feedback, value: Any = None) -> bytes:
    return P.pack([V, P.FEEDBACK, name, value])


# -- parsers -----------------------------------------------------------------------------


def parse_batch(header: list[Any]) -> Batch:
    """A BATCH whose header was unpacked (a worker reads BATCH and RETIRED on one
    socket)."""
    if header[1] != P.BATCH:
        raise ProtocolError(f"unexpected message kind {header[1]} (expected a BATCH)")
    return Batch(header[2], [Segment._make(s) for s in header[3]])


def parse_ready(buf: Any) -> Ready | tuple[int, int]:
    """A READY as :class:`Ready`, or a RETIRE as ``(index, pid)``."""
    header = P.unpack_header(buf)
    if header[1] == P.RETIRE:
        return header[2], header[3]
    if header[1] != P.READY:
        raise ProtocolError(f"unexpected message kind {header[1]} from a worker")
    return Ready(header[2], header[3], header[4], header[5])


def parse_ready_done(frames: list[Any]) -> int:
    """The batch a READY ends (0: none), from its frames as the ventilator reads them:
    the worker's identity, the READY header, and the batch id if there is one."""
    if len(frames) < 3:
        return 0
    buf = frames[2].buffer
    return int.from_bytes(buf, "little") if len(buf) == 8 else 0


def parse_done(header: list[Any]) -> Done:
    """A DONE whose header was unpacked (the sink reads DONE and FORWARD on one socket)."""
    return Done(header[2], header[3], header[4], [Part._make(p) for p in header[5]],
                header[6], header[7])


def parse_forward(header: list[Any]) -> tuple[bytes, int, str, Any]:
    """A FORWARD whose header was unpacked, as ``(client, req_id, action, value)``."""
    return header[2], header[3], header[4], header[5]


def parse_failed(value: Any) -> Failed:
    worker, pid, batch_id, parts, error = value
    return Failed(worker, pid, batch_id, [FailedPart._make(p) for p in parts], error)


def parse_event(buf: Any) -> tuple[str, Any]:
    header = P.unpack_header(buf, expect=P.EVENT)
    return header[2], header[3]


def parse_control(buf: Any) -> tuple[str, Any]:
    header = P.unpack_header(buf, expect=P.CONTROL)
    return header[2], header[3]


def parse_feedback(buf: Any) -> tuple[str, Any]:
    header = P.unpack_header(buf, expect=P.FEEDBACK)
    return header[2], header[3]
