"""The server's status as one typed structure: what ``WKRClient.server_status`` returns.

Two processes build it, so it is typed in two halves: the ventilator answers the status
command with a :class:`VentilatorStatus` (configuration, what arrived and was dispatched,
the queue, the workers), and the sink, the one role that writes to clients, completes it
into a :class:`ServerStatus` (what was answered, latency, throughput, per-worker time)
before sending it. Readers (``/metrics``, the dashboard, the run scripts) index it by the
names below, and a test checks that a running server's status has exactly these keys, so
a key added on one side and forgotten on the other fails there instead of reading as 0.

Counters count since the process that keeps them started: the ventilator's restart from
zero when a crashed ventilator is restarted (``ventilator_generation`` says how often),
the sink's when the sink is. Pure: no zmq, so any process may import it.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, get_args

__all__ = [
    "LATENCY_BUCKETS_S",
    "WORKER_STATES",
    "BatchSizes",
    "LatencyHistogram",
    "LatencyMs",
    "ModelInfo",
    "ServerStatus",
    "StatSummary",
    "SwitchState",
    "Throughput",
    "VentilatorStatus",
    "Versions",
    "WorkerHistory",
    "WorkerRow",
    "WorkerState",
    "WorkerStats",
]

#: Upper bounds (s) of the request latency histogram's buckets (``latency_histogram``,
#: ``/metrics``); one more bucket counts the slower requests. Its one home: the sink
#: counts with it, readers take it from the status.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0)

#: What a worker slot is doing: its process not up yet (``starting``; ``restarting``
#: after it died), waiting for a batch, or computing one.
WorkerState = Literal["starting", "restarting", "idle", "busy"]
#: Every worker state, in that order (``/metrics`` reports each, 1 for the current one).
WORKER_STATES: tuple[WorkerState, ...] = get_args(WorkerState)


class Versions(TypedDict):
    """Versions of the server and of what it runs on (``status["versions"]``)."""

    wkr_serving: str
    python: str
    pyzmq: str
    libzmq: str
    numpy: str
    msgpack: str


class BatchSizes(TypedDict):
    """Items per batch dispatched (``status["batch_size"]``, ``stats.Histogram``)."""

    counts: dict[str, int]  # batch size (a string: msgpack and JSON map keys) -> batches
    mean: float  # mean items per batch (0.0 before the first batch)


class WorkerHistory(TypedDict):
    """What the supervisor told the ventilator about a worker slot's deaths."""

    restarts: int  # times the slot's process was restarted
    last_error: str | None  # why its last process ended (None: never died)


class WorkerStats(TypedDict):
    """What the sink counts per worker slot, from the batches it answered (DONE)."""

    batches_done: int  # batches answered by the slot's processes, over restarts
    busy_s: float  # seconds they spent in predict


class _WorkerRowBase(WorkerHistory):
    index: int  # the slot (0 .. num_worker - 1)
    pid: int | None  # its process (None while starting or restarting)
    device: str | None  # "cpu" or "gpu:<id>" (None while starting or restarting)
    state: WorkerState
    batches: int  # batches dispatched to its current process
    items: int  # items in those batches
    epoch: int  # the model its process serves: 0 at start, one more per model switch
    model_version: str | None  # ... that model's version (-model_version)


class WorkerRow(_WorkerRowBase, total=False):
    """One row of ``status["workers"]`` per worker slot. ``batches_done`` and ``busy_s``
    (:class:`WorkerStats`) are added by the sink once the slot answered a batch."""

    batches_done: int
    busy_s: float


class LatencyMs(TypedDict):
    """Percentiles (ms) of the latency of the most recent requests (``latency_ms``)."""

    p50: float  # NaN before the first reply
    p90: float
    p99: float
    window: int  # how many recent requests they are computed over (at most 4096)


class LatencyHistogram(TypedDict):
    """Every request's latency since the sink started (``latency_histogram``)."""

    buckets_s: list[float]  # upper bounds, LATENCY_BUCKETS_S
    counts: list[int]  # per bucket, not cumulative; one more than bounds (the slower ones)
    sum_s: float  # sum of all latencies


class Throughput(TypedDict):
    """Replies (results and errors) per second, mean over each window."""

    last_1s: float
    last_10s: float
    last_60s: float


class _StatCount(TypedDict):
    count: int  # values recorded


class StatSummary(_StatCount, total=False):
    """One ``record_statistic`` name (``stats.Summary``): the rest once ``count`` > 0."""

    mean: float
    min: float
    max: float
    p50: float  # over the most recent values (at most 1024)


class ModelInfo(TypedDict):
    """The model served (``status["model"]``); during a switch, the one switched from."""

    name: str | None  # -model_name
    version: str | None  # -model_version
    dir: str  # -model_dir
    epoch: int  # 0 at start, one more for each model switch begun


class SwitchState(TypedDict):
    """The last model switch (``status["switch"]``; None before the first)."""

    state: str  # "switching", "done" or "failed"
    to: dict[str, Any]  # the model switched to: name, version, dir
    error: str | None  # why it failed
    started_at: float  # unix time
    seconds: float | None  # how long it took, once ended
    switched: int  # workers serving the new model
    total: int  # workers to switch


class VentilatorStatus(TypedDict):
    """The ventilator's half (``Ventilator._snapshot``), sent to the sink to complete."""

    server_version: str  # wkr_serving's version
    protocol: str  # the serialization clients must speak (-protocol)
    protocol_version: int  # the wire protocol's version
    versions: Versions
    config: dict[str, Any]  # every setting by name (ServerConfig.as_dict, secrets redacted)
    ventilator_pid: int
    supervisor_pid: int
    uptime_s: float  # seconds since the server started
    ready: bool  # every worker slot has a process with its model loaded
    draining: bool  # stopping: no new requests taken
    queue_items: int  # items waiting for a worker
    in_flight_items: int  # items in batches being computed, or of dead workers, unsettled
    busy_workers: int  # workers computing a batch
    num_requests: int  # requests accepted
    num_items: int  # items in them
    num_rejected: int  # messages refused on arrival: invalid, or sent while draining
    num_discarded_parts: int  # payload parts of refused messages, dropped unread
    num_overloaded: int  # requests refused because the queue was full (Overloaded)
    num_expired_in_queue: int  # items whose deadline passed in the queue
    max_queue_size: int  # most items the queue holds (-max_queue_size)
    max_request_items: int  # most items one request may carry (-max_request_items)
    num_batches: int  # batches dispatched
    num_retried_items: int  # items queued again after the worker holding them died
    num_poisoned: int  # requests answered PoisonInput (poison_input), on arrival or not
    quarantined_inputs: int  # inputs quarantined: present at two worker deaths
    ventilator_generation: int  # times the ventilator was restarted after a crash
    model: ModelInfo
    switch: SwitchState | None
    batch_size: BatchSizes
    workers: list[WorkerRow]  # one per slot, by index


class ServerStatus(VentilatorStatus):
    """The whole status, as clients get it: the ventilator's half completed by the sink
    (``Sink._status``), which adds the keys below and each worker's :class:`WorkerStats`."""

    sink_pid: int
    congested_clients: int  # clients not reading their replies (their replies are held)
    held_replies: int  # replies held for them
    num_results: int  # requests answered with a result
    num_errors: dict[str, int]  # requests answered with an error, by code
    num_undeliverable: int  # replies for clients that had gone
    pending_split_requests: int  # requests split across batches, partly answered
    latency_ms: LatencyMs
    latency_histogram: LatencyHistogram
    throughput_per_s: Throughput
    statistic: dict[str, StatSummary]  # what the model recorded, by name
