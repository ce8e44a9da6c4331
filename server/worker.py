"""Workers: the user's model class and the process that runs it.

A user subclasses :class:`WKRHardWorker` and overrides ``get_env``, ``get_model`` and
``predict``. :class:`WorkerProcess` runs one instance in its own process: it pins the
device, builds the model, asks the ventilator for work (READY), runs each batch through
preprocess -> predict -> postprocess and sends the results to the sink (DONE), then at
once a READY naming that batch. The ventilator may send a worker its next batch before
that READY (up to ``WORKER_CREDIT`` batches in its hands), so the next batch is usually
already waiting in the socket when one ends.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import psutil
import zmq
from wkr_serving.client import errors as E
from wkr_serving.client import protocol as P
from wkr_serving.client.loader import import_class

from . import messages as M
from .config import ServerConfig
from .devices import describe, pin_device
from .logs import set_logger
from .messages import worker_identity
from .predlog import Entry, PredictionLog, capture, log_path
from .process import LINGER_MS, Endpoints, Role, readable, send_frames
from .scratch import prepare_worker_dirs

__all__ = ["WKRHardWorker", "WorkerProcess", "load_worker_class"]

#: Most milliseconds an idle worker waits before looking for a supervisor command.
CONTROL_CHECK_MS = 200
#: Most lost prediction-log lines reported in one DONE (the rest go with the next ones).
LOST_REPORT_MAX = 1000
#: Seconds a stopping worker gives its prediction log to write what is queued.
PREDLOG_CLOSE_S = 2.0
#: Longest a retiring worker waits for the ventilator's RETIRED before it leaves anyway.
RETIRE_WAIT_S = 30.0
#: Least seconds between two looks at the worker's resident memory (-max_worker_rss).
RSS_CHECK_S = 1.0
MIB = 1024 * 1024
_EXPIRED = E.DeadlineExceeded("deadline passed before a worker could compute the request"
                              ).to_wire()


class WKRHardWorker:
    """Base class of a served model. Override the hooks; the server calls them in order.

    Attributes available in every hook: ``worker_id``, ``device_id`` (``-1`` for CPU),
    ``model_dir``, ``model_name``, ``model_version``, ``batch_size``, ``tmp_dir``,
    ``gpu_memory_fraction``, ``protocol`` and ``config``.
    """

    def __init__(self, worker_id: int, device_id: int, config: ServerConfig,
                 logger: logging.Logger | None = None) -> None:
        self.worker_id = worker_id
        self.device_id = device_id
        self.config = config
        self.model_dir = config.model_dir
        self.model_name = config.model_name
        self.batch_size = config.batch_size
        self.tmp_dir = config.tmp_dir
        self.gpu_memory_fraction = config.gpu_memory_fraction
        self.protocol = config.protocol
        self.model_version = config.model_version
        self._logger = logger or logging.getLogger("wkr_serving")
        self._statistics: list[tuple[str, float]] = []
        #: ``get_metadata()["labels"]``, once known: the default evaluate names classes
        #: with it when the model outputs scores per class.
        self._labels: Any = None

    # -- hooks to override ---------------------------------------------------------------

    def get_env(self, device_id: int, tmp_dir: str) -> Any:
        """Import frameworks and prepare the environment; runs after device pinning."""
        return []

    def get_model(self, envs: Any, model_dir: str, model_name: str | None, tmp_dir: str) -> Any:
        """Load and return the model."""
        return []

    def get_preprocess(self, envs: Any) -> Callable[[Any], Any] | None:
        """Return a function applied to each batch before ``predict`` (None: identity)."""
        return None

    def get_postprocess(self, envs: Any) -> Callable[[Any], Any] | None:
        """Return a function applied to ``predict``'s output (None: identity)."""
        return None

    def predict(self, model: Any, input: Any) -> Any:
        """Compute one batch: ``input`` holds 1..batch_size items; return as many results.

        With ``-protocol numpy`` and items of one dtype and shape, ``input`` is one stacked
        ndarray of shape ``(n, *item_shape)``; otherwise it is a list of items.
        """
        return input

    def get_metadata(self, model: Any) -> dict[str, Any]:
        """Describe the loaded model, for ``GET /metadata`` and
        :meth:`WKRClient.metadata <wkr_serving.client.WKRClient.metadata>`. Any
        msgpack-able mapping; the server uses these keys when present: ``labels`` (a
        list, or a mapping from class index to name: ``GET /label``), ``data_sample``
        (a list of inputs: ``GET /predict/test`` computes them), ``prediction_sample``,
        ``data_type``, ``data_structure``, ``prediction_type``, ``prediction_structure``.
        Called once per worker, after ``get_model``."""
        return {}

    def evaluate(self, predictions: list[Any], labels: list[Any]) -> dict[str, Any]:
        """Score the model's ``predictions`` (its own outputs for the evaluated inputs,
        in order) against ``labels``; return a msgpack-able mapping. The default
        computes accuracy, macro precision/recall/F1 and a confusion matrix when the
        labels are classes (strings, booleans, integers), and MAE, RMSE and R² when they
        are numbers (see :func:`wkr_serving.client.evaluation.default_evaluate`)."""
        from wkr_serving.client.evaluation import default_evaluate

        return default_evaluate(predictions, labels, self._labels)

    def teardown(self, model: Any) -> None:
        """Release the model's resources when the worker stops."""

    # -- services for the hooks ----------------------------------------------------------

    def new_logger(self, error_logger: bool = False) -> logging.Logger:
        """The worker's logger. Errors always also go to ``<log_name>.err`` with
        ``-log_dir``; ``error_logger`` is accepted for compatibility with the seed."""
        return self._logger

    def record_statistic(self, values: Mapping[str, float]) -> None:
        """Record named numbers; ``server_status['statistic']`` summarises them per key."""
        for key, value in values.items():
            self._statistics.append((str(key), float(value)))

    def _take_statistics(self) -> dict[str, list[float]]:
        grouped: dict[str, list[float]] = {}
        for key, value in self._statistics:
            grouped.setdefault(key, []).append(value)
        self._statistics.clear()
        return grouped


def load_worker_class(spec: str, directory: str | None = None) -> type[WKRHardWorker]:
    """Import ``<file>.<Class>`` from ``directory`` (default: the current one).

    ``spec`` may start with a directory, as in ``example/noop_worker.Worker``.
    """
    return import_class(spec, WKRHardWorker, directory)


class WorkerProcess(Role):
    name = "worker"
    color = "blue"

    def __init__(self, config: ServerConfig, endpoints: Endpoints, index: int,
                 device_id: int, worker_class: type[WKRHardWorker], generation: int = 0,
                 epoch: int = 0) -> None:
        super().__init__(config, endpoints)
        self.index = index
        self.device_id = device_id
        self.worker_class = worker_class
        #: Tells apart the processes of one slot while a worker is recycled.
        self.generation = generation
        #: The model it serves: 0 for the first, one more for each model switch (its
        #: config names that model).
        self.epoch = epoch
        # Made in boot (in the child process):
        self.vent: zmq.Socket | None = None
        self.sink: zmq.Socket | None = None
        self.worker: WKRHardWorker | None = None
        self.model: Any = None
        self.preprocess: Callable[[Any], Any] | None = None
        self.postprocess: Callable[[Any], Any] | None = None
        self.stack = False
        self.allow_pickle = False
        self.predlog: PredictionLog | None = None
        self._lost_lines = 0  # prediction-log lines lost and not yet reported
        self._ready_frame = b""
        self.pid = 0  # this process's id, known in boot
        self._control_handlers: dict[str, Callable[[Any], None]] = {}
        #: Requests answered, and the count after which this worker asks to be recycled.
        self.answered = 0
        self.recycle_after = 0
        self._next_rss_check = 0.0
        self.recycling = False  # the supervisor was asked for a replacement
        self.retiring = 0.0  # when it told the ventilator it leaves (0.0: it does not)
        self.leaving = False

    @property
    def identity(self) -> str:
        return worker_identity(self.index, self.generation)

    def boot(self) -> dict[str, Any]:
        pin_device(self.device_id)  # before any user code can initialise CUDA
        threads = self.config.worker_threads()
        if threads is not None:
            _limit_threads(threads)
        assert self.context is not None
        self.vent = self.context.socket(zmq.DEALER)
        self.vent.setsockopt(zmq.IDENTITY, self.identity.encode())
        self.vent.setsockopt(zmq.LINGER, 0)
        self.vent.connect(self.endpoints.workers)
        self.sink = self.context.socket(zmq.PUSH)
        self.sink.setsockopt(zmq.SNDHWM, 0)
        self.sink.setsockopt(zmq.LINGER, LINGER_MS)
        self.sink.connect(self.endpoints.sink)

        user_logger = set_logger(self.identity.upper(), self.config.log_dir,
                                 self.config.log_name, self.config.verbose, self.color,
                                 self.config.log_format)
        self.worker = self.worker_class(self.index, self.device_id, self.config, user_logger)
        self.logger.info("using %s, %s BLAS/OpenMP thread(s); loading model %s from %s",
                         describe(self.device_id), threads or "default",
                         self.config.model_name, self.config.model_dir)
        prepare_worker_dirs(self.config)  # -model_dir must exist; makes tmp_dir
        started = time.perf_counter()
        envs = self.worker.get_env(self.device_id, self.config.tmp_dir)
        self.preprocess = self.worker.get_preprocess(envs)
        self.postprocess = self.worker.get_postprocess(envs)
        self.model = self.worker.get_model(envs, self.config.model_dir, self.config.model_name,
                                           self.config.tmp_dir)
        self.logger.info("model ready in %.2fs", time.perf_counter() - started)
        metadata = self._metadata()
        self.stack = self.config.protocol == "numpy"
        self.allow_pickle = self.config.allow_pickle
        self.pid = os.getpid()  # once: getpid is a system call, and DONE carries it
        self._ready_frame = M.ready(self.index, self.pid, self.device_id, self.epoch)
        if self.config.log_predictions:
            assert self.config.log_dir is not None  # checked by ServerConfig
            self.predlog = PredictionLog(log_path(self.config.log_dir, self.config.log_name),
                                         logger=self.logger)
        if self.config.max_requests:
            self.recycle_after = self.config.max_requests + random.randint(
                0, self.config.max_requests_jitter)
        self._control_handlers = {
            M.Control.STOP: self._on_stop,
            M.Control.RETIRE: self._on_retire,
            M.Control.REANNOUNCE: self._on_reannounce,
            M.Control.HANGUP: self._on_hangup,
        }
        return {"index": self.index, "device_id": self.device_id,
                "generation": self.generation, "epoch": self.epoch, "metadata": metadata}

    def _metadata(self) -> dict[str, Any]:
        """The model's own description (``get_metadata``), checked to be a mapping that
        travels (msgpack): a bad one fails the boot, with the reason."""
        assert self.worker is not None
        metadata = self.worker.get_metadata(self.model)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, Mapping):
            raise TypeError(f"get_metadata must return a dict, got {type(metadata).__name__}")
        metadata = dict(metadata)
        try:
            P.pack(metadata)
        except Exception as exc:
            raise TypeError(f"get_metadata returned a value that cannot be sent: "
                            f"{type(exc).__name__}: {exc}") from None
        self.worker._labels = metadata.get("labels")
        return metadata

    def serve(self) -> None:
        # A timed blocking recv costs less per batch than polling two sockets; the
        # supervisor's socket is looked at between batches and on each timeout.
        assert self.vent is not None and self.control is not None
        self.vent.setsockopt(zmq.RCVTIMEO, CONTROL_CHECK_MS)
        self._ready()
        while not self.leaving:
            try:
                frames = self.vent.recv_multipart(copy=False)
            except zmq.Again:
                if self.retiring and time.monotonic() - self.retiring > RETIRE_WAIT_S:
                    self.logger.warning("no answer from the ventilator to retiring within "
                                        "%gs: leaving anyway", RETIRE_WAIT_S)
                    return
            else:
                self._on_vent(frames)
            while readable(self.control):
                name, value = self.read_control()
                handler = self._control_handlers.get(name)
                if handler is not None:
                    handler(value)

    def shutdown(self) -> None:
        if self.predlog is not None:
            self.predlog.close(PREDLOG_CLOSE_S)
        if self.model is not None and self.worker is not None:
            try:
                self.worker.teardown(self.model)
            except Exception:
                self.logger.exception("teardown failed")

    def _ready(self, done: int = 0) -> None:
        """READY: batch ``done`` is finished (0: none; the worker is there and holds
        nothing). The ventilator may already have sent the next batch: it is read at once."""
        assert self.vent is not None
        if done:
            send_frames(self.vent, [self._ready_frame, M.ready_done(done)])
        else:
            self.vent.send(self._ready_frame)

    def _on_vent(self, frames: list[zmq.Frame]) -> None:
        header = P.unpack_header(frames[0].buffer)
        if header[1] == P.RETIRED:
            self.logger.info("retired: replaced after %d requests", self.answered)
            self.leaving = True
            return
        self._handle(M.parse_batch(header), frames)
        if not self.recycling and (self.recycle_after or self.config.max_worker_rss):
            self._check_recycle()

    # -- control ------------------------------------------------------------------------

    def _on_stop(self, value: Any) -> None:
        self.leaving = True

    def _on_retire(self, value: Any) -> None:
        """The replacement is ready: stop taking work. The ventilator answers RETIRED
        once nothing more is on its way here (the batches it already sent are
        computed first)."""
        assert self.vent is not None
        self.retiring = time.monotonic()
        self.vent.send(M.retire(self.index, self.pid))

    def _on_reannounce(self, value: Any) -> None:
        """A restarted ventilator does not know this worker: say READY again (a READY
        that ends no batch of the ventilator's returns no credit)."""
        if not self.retiring:
            self._ready()

    def _on_hangup(self, value: Any) -> None:
        """SIGHUP, forwarded by the supervisor: reopen the prediction log (logrotate)."""
        if self.predlog is not None:
            self.logger.info("SIGHUP: reopening the prediction log")
            self.predlog.reopen()

    def _check_recycle(self) -> None:
        """Ask the supervisor for a replacement once this worker answered
        ``-max_requests`` (plus jitter) requests or grew over ``-max_worker_rss`` MiB."""
        reason = None
        if self.recycle_after and self.answered >= self.recycle_after:
            reason = f"answered {self.answered} requests (-max_requests)"
        elif self.config.max_worker_rss:
            now = time.monotonic()
            if now >= self._next_rss_check:
                self._next_rss_check = now + RSS_CHECK_S
                rss = psutil.Process().memory_info().rss / MIB
                if rss > self.config.max_worker_rss:
                    reason = (f"resident memory {rss:.0f} MiB is over -max_worker_rss "
                              f"{self.config.max_worker_rss}")
        if reason is not None:
            self.recycling = True
            self.logger.info("asking to be recycled: %s", reason)
            self.event(M.Event.RECYCLE, {"index": self.index, "pid": self.pid,
                                         "reason": reason})

    # -- one batch ----------------------------------------------------------------------

    def _handle(self, batch: M.Batch, frames: list[zmq.Frame]) -> None:
        payload = frames[1:]
        parts: list[M.Part] = []
        live: list[M.Segment] = []  # segments whose items are valid
        items: list[Any] = []  # raw items stay frames; msgpack items are decoded here
        metas: list[Any] = []
        result_frames: list[Any] = []
        pos = 0
        now = time.monotonic()
        known: list[Any] = [None, -1]  # the raw-array meta checked last, and its byte size
        for seg in batch.segments:
            seg_frames = payload[pos:pos + seg.n_items]
            pos += seg.n_items
            if seg.deadline and seg.deadline <= now:  # no one waits for it any more
                parts.append(M.Part.of(seg, None, _EXPIRED))
                continue
            try:
                decoded = _checked_items(seg.metas, seg_frames, self.allow_pickle, known)
            except E.ProtocolError as exc:
                parts.append(M.Part.of(seg, None, E.BadInput(str(exc)).to_wire()))
                continue
            if seg.options and seg.options.get("evaluate"):
                self._evaluate(seg, decoded, parts, result_frames)
                continue
            items.extend(decoded)
            metas.extend(seg.metas)
            live.append(seg)
        started = time.perf_counter()
        if live:
            self._run_batch(live, items, metas, parts, result_frames)
        busy = time.perf_counter() - started
        self.answered += len(batch.segments)
        assert self.worker is not None and self.sink is not None
        stats = self.worker._take_statistics()
        if self.predlog is not None:
            self._count_lost_lines(stats)
        # DONE, then READY at once, then the rest: once the ventilator counts a batch
        # done, its results are already on their way to the sink (a dead worker's batches
        # still in its hands are retried unless the sink had their DONE).
        send_frames(self.sink, [M.done(batch.batch_id, self.index, self.pid, parts, stats,
                                       busy), *result_frames], copy=False)
        self._ready(batch.batch_id)
        if self.predlog is not None:
            self._log(batch.segments, payload, parts, result_frames)

    # -- the prediction log -------------------------------------------------------------

    def _count_lost_lines(self, stats: dict[str, list[float]]) -> None:
        """Report the prediction-log lines lost (queue full, write failed) as the
        ``prediction_log_dropped`` statistic: one value 1.0 per line, so its ``count``
        is the number lost."""
        assert self.predlog is not None
        self._lost_lines += self.predlog.take_lost()
        if self._lost_lines:
            report = min(self._lost_lines, LOST_REPORT_MAX)
            self._lost_lines -= report
            stats.setdefault("prediction_log_dropped", []).extend([1.0] * report)

    def _log(self, segments: list[M.Segment], payload: list[zmq.Frame],
             parts: list[M.Part], result_frames: list[Any]) -> None:
        """Queue one prediction-log entry per part, after its DONE went: a bounded
        snapshot, formatted and written by the log's own thread."""
        assert self.predlog is not None
        now, wall = time.monotonic(), time.time()
        batch_size = len(payload)
        where: dict[tuple[int, int], tuple[M.Segment, int]] = {}  # (serial, offset) -> seg
        pos = 0
        for seg in segments:
            where[(seg.serial, seg.offset)] = (seg, pos)
            pos += seg.n_items
        out = 0
        for part in parts:
            seg, start = where[(part.serial, part.offset)]
            options = seg.options
            inputs = None
            if not (options and options.get("suppress_log_input")):
                inputs = [capture(m, f.buffer) for m, f in
                          zip(seg.metas, payload[start:start + part.n_items], strict=False)]
            outputs = None
            if part.error is None:
                assert part.metas is not None
                outputs = [capture(m, b) for m, b in
                           zip(part.metas, result_frames[out:out + part.n_items], strict=True)]
                out += part.n_items
            self.predlog.put(Entry(
                wall, now - part.t_recv, part.client, part.req_id,
                options.get("request_id") if options else None, part.offset, part.n_items,
                part.total, batch_size, self.index, part.error, inputs, outputs,
                self.config.model_name, self.config.model_version))

    def _evaluate(self, seg: M.Segment, decoded: list[Any], parts: list[M.Part],
                  result_frames: list[Any]) -> None:
        """An evaluate request (option ``evaluate``): one item, ``{"predictions": [...],
        "labels": [...]}``, scored by the model's ``evaluate``; its result is the dict."""
        assert self.worker is not None
        item = decoded[0] if len(decoded) == 1 else None
        if (not isinstance(item, dict) or not isinstance(item.get("predictions"), list)
                or not isinstance(item.get("labels"), list)):
            parts.append(M.Part.of(seg, None, E.BadInput(
                "an evaluate request is one item: a map with the lists 'predictions' and "
                "'labels'").to_wire()))
            return
        try:
            result = self.worker.evaluate(item["predictions"], item["labels"])
            meta, buf = P.encode_item(result, "obj", self.allow_pickle)
        except Exception as exc:
            error = E.ModelError(f"evaluate failed: {type(exc).__name__}: {exc}",
                                 traceback.format_exc())
            self.logger.error("evaluate request %s failed: %s", seg.req_id, error.message,
                              extra={"request_id": _request_id(seg)})
            parts.append(M.Part.of(seg, None, error.to_wire()))
            return
        parts.append(M.Part.of(seg, [meta], None))
        result_frames.append(buf)

    def _run_batch(self, live: list[M.Segment], items: list[Any], metas: list[Any],
                   parts: list[M.Part], result_frames: list[Any]) -> None:
        group: list[tuple[M.Segment, int, int]] = []  # (segment, first item, end item)
        start = 0
        for seg in live:
            group.append((seg, start, start + seg.n_items))
            start += seg.n_items
        self._run_group(group, items, metas, parts, result_frames)

    def _run_group(self, group: list[tuple[M.Segment, int, int]], items: list[Any],
                   metas: list[Any], parts: list[M.Part], result_frames: list[Any]) -> None:
        """Compute the items of ``group``'s segments together. If that fails, split the
        group in halves and retry each, so only the requests whose items fail get the
        error and the other requests of the batch still get their results."""
        lo, hi = group[0][1], group[-1][2]
        try:
            outputs = self._predict(self._batch_input(items[lo:hi], metas[lo:hi]))
            if len(outputs) != hi - lo:
                raise ValueError(f"predict returned {len(outputs)} results for "
                                 f"{hi - lo} inputs")
            out_metas, out_bufs = _encode_outputs(outputs, self.config.protocol,
                                                  self.allow_pickle)
        except Exception as exc:
            if len(group) > 1:
                half = len(group) // 2
                self._run_group(group[:half], items, metas, parts, result_frames)
                self._run_group(group[half:], items, metas, parts, result_frames)
                return
            error = E.ModelError(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            # The traceback goes to the client (ModelError); JSON logs carry it too.
            self.logger.error("request %s (%d items) failed: %s", group[0][0].req_id,
                              hi - lo, error.message,
                              exc_info=self.config.log_format == "json",
                              extra={"request_id": _request_id(group[0][0])})
            parts.append(M.Part.of(group[0][0], None, error.to_wire()))
            return
        for seg, start, end in group:
            parts.append(M.Part.of(seg, out_metas[start - lo:end - lo], None))
            result_frames.extend(out_bufs[start - lo:end - lo])

    def _batch_input(self, items: list[Any], metas: list[Any]) -> Any:
        """The ``input`` given to predict: with ``-protocol numpy`` and items of one dtype
        and shape, one stacked, writable array (a single copy of the payload bytes);
        otherwise a list of items."""
        first = metas[0]
        if self.stack and isinstance(first, list) and all(m == first for m in metas):
            joined = bytearray().join(f.buffer for f in items)
            return np.frombuffer(joined, dtype=P.parse_dtype(first[0])).reshape(
                len(items), *first[1])
        # Raw items were validated by _checked_items: view them without checking again.
        return [item if not isinstance(m, list) else
                np.frombuffer(item.buffer, dtype=P.parse_dtype(m[0])).reshape(m[1])
                for m, item in zip(metas, items, strict=True)]

    def _predict(self, batch: Any) -> Any:
        assert self.worker is not None
        if self.preprocess is not None:
            batch = self.preprocess(batch)
        outputs = self.worker.predict(self.model, batch)
        if self.postprocess is not None:
            outputs = self.postprocess(outputs)
        return outputs


def _request_id(seg: M.Segment) -> str:
    """A request's id for log lines: the caller's ``request_id`` option, else
    ``<client hex>:<req id>`` (as the prediction log writes it)."""
    given = seg.options.get("request_id") if seg.options else None
    return given if isinstance(given, str) else f"{seg.client.hex()}:{seg.req_id}"


#: Environment variables read by the common BLAS/OpenMP runtimes when they load.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _limit_threads(threads: int) -> None:
    """Cap math-library thread pools: several workers (plus the ventilator and sink) each
    running a pool as wide as the machine oversubscribe it, and spinning BLAS threads
    then slow every process down."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)  # for frameworks imported later (torch, TF)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # for libraries already loaded (numpy's BLAS)


def _checked_items(metas: list[Any], frames: list[zmq.Frame], allow_pickle: bool,
                   known: list[Any]) -> list[Any]:
    """Validate a segment's input items: msgpack (and allowed pickle) items are decoded
    now, raw arrays are checked against their meta and kept as frames until the batch is
    assembled. ``known`` is ``[meta, byte size]`` of the raw-array meta checked last in
    this batch: an item with an equal meta (the usual case) only has its size compared."""
    items: list[Any] = []
    for meta, frame in zip(metas, frames, strict=True):
        if meta.__class__ is not list:
            items.append(P.decode_item(meta, frame.buffer, allow_pickle))
            continue
        if meta != known[0] or len(frame) != known[1]:
            P.check_raw(meta, frame.buffer)  # raises ProtocolError, naming the problem
            known[0], known[1] = meta, len(frame)
        items.append(frame)
    return items


def _encode_outputs(outputs: Any, protocol: str, allow_pickle: bool,
                    ) -> tuple[list[Any], list[Any]]:
    """Encode each result as ``(meta, buffer)``, slicing one buffer when outputs are an
    ndarray so no per-item copy is made."""
    if isinstance(outputs, np.ndarray) and outputs.ndim >= 1:
        arr = np.ascontiguousarray(outputs)
        P.encode_item(arr[:0], protocol)  # validates the dtype once
        meta = [arr.dtype.str, list(arr.shape[1:])]
        flat = arr.reshape(len(arr), -1).view(np.uint8) if arr.size else None
        if flat is not None:
            return [meta] * len(arr), list(flat)
    metas: list[Any] = []
    bufs: list[Any] = []
    for value in outputs:
        meta, buf = P.encode_item(value, protocol, allow_pickle)
        metas.append(meta)
        bufs.append(buf)
    return metas, bufs
