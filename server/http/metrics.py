"""``GET /metrics``: the server and the bridge in Prometheus text format.

Two kinds of metrics, one page:

- **Server-wide** (``wkr_*`` except ``wkr_http_*``): read from ``server_status`` at each
  scrape by :class:`ServerCollector`, so every process of the bridge reports the same,
  whole-server numbers: requests, replies and errors by kind, the request latency
  histogram and recent percentiles, batch sizes, queue depth, items in flight, recovery
  (items retried after a worker died, requests refused as poison, quarantined inputs,
  ventilator restarts), per worker its state, batches, busy time and restarts, and the
  served model (``wkr_model_info{model_name,model_version,epoch} 1``,
  ``wkr_model_switches_total``, ``wkr_model_switch_state{state}``,
  ``wkr_model_switch_workers{kind}`` switched/total during a switch). If the
  server does not answer, only ``wkr_up 0`` is reported. The status is the bridge's own
  server's (same version), so every key of ``status.ServerStatus`` is there.
- **Bridge HTTP** (``wkr_http_*``): requests by route, method and status, errors by
  route and type, and an HTTP latency histogram per route, counted in every bridge
  process. With several bridge processes (``-http_workers``) a scrape reaches one of
  them, so these use prometheus-client's multiprocess mode: each process writes its
  counts to files in ``<bridge state dir>/metrics`` (see :mod:`.state`) and a scrape
  sums every process's files, those of exited processes included (counters never go
  back). With one process (the default) they are plain in-memory metrics, cheaper per
  request; they restart from zero if the bridge process is restarted (Prometheus reads
  that as a counter reset). The job store adds ``wkr_http_jobs{status}``.

With ``-http_token``, ``/metrics`` needs the bearer token like every route but health.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, request

from ..status import (
    LATENCY_BUCKETS_S,
    WORKER_STATES,
    ServerStatus,
    StatSummary,
    WorkerRow,
)
from . import state

__all__ = ["HTTP_LATENCY_BUCKETS_S", "ServerCollector", "register"]

#: Upper bounds (s) of the HTTP latency histogram's buckets: the server's own, so that the
#: bridge's latency and the server's compare bucket by bucket.
HTTP_LATENCY_BUCKETS_S = LATENCY_BUCKETS_S
#: The classic text format (every name here is a legal one in it), which every Prometheus
#: version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: States of a model switch (``wkr_model_switch_state``).
SWITCH_STATES = ("none", "switching", "done", "failed")
#: Label of requests that matched no route (keeps the label set bounded).
UNMATCHED = "<unmatched>"


def _multiprocess_dir() -> str | None:
    """Where this bridge's processes share their HTTP metrics (None: one process).

    ``PROMETHEUS_MULTIPROC_DIR`` if the environment sets it; in a bridge process, a
    folder of the bridge's state directory, then exported in this process's environment
    (prometheus-client reads it there). Must run before the HTTP metrics are made."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path and state.shared() and state.processes() > 1:
        path = os.path.join(state.state_dir(), "metrics")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus-client was imported before the variable was set: switch now
        values.ValueClass = values.MultiProcessValue()
    return path


class HTTPMetrics:
    """The bridge's own HTTP metrics (see the module docstring)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("wkr_http_requests", "HTTP requests answered by the bridge",
                                ["route", "method", "status"], registry=registry)
        self.errors = Counter("wkr_http_errors", "HTTP error answers (status >= 400), by "
                              "error type", ["route", "type"], registry=registry)
        self.latency = Histogram("wkr_http_request_duration_seconds", "time the bridge "
                                 "took to answer, by route", ["route"], registry=registry,
                                 buckets=HTTP_LATENCY_BUCKETS_S)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, response: Response) -> None:
        rule = request.url_rule
        started = g.get("started")
        self.count(rule.rule if rule is not None else UNMATCHED, request.method,
                   response.status_code,
                   None if started is None else time.perf_counter() - started,
                   _error_type(response) if response.status_code >= 400 else None)

    def count(self, route: str, method: str, status: int, seconds: float | None,
              error_type: str | None) -> None:
        """Count one answered request (also called by the ``/encode`` fast path)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # a bounded set: routes x methods x statuses
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route))
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)
        if status >= 400:
            self.errors.labels(route, error_type or f"http_{status}").inc()


def _error_type(response: Response) -> str:
    """The ``error_type`` of an error envelope, else ``http_<status>``."""
    if response.is_json and not response.direct_passthrough:
        body = response.get_json(silent=True)
        kind = body.get("error_type") if isinstance(body, dict) else None
        if isinstance(kind, str) and kind and len(kind) <= 64:
            return kind
    return f"http_{response.status_code}"


class ServerCollector:
    """Server-wide metrics from one ``server_status`` call per scrape."""

    def __init__(self, backend: Any, app: Flask | None = None) -> None:
        self.backend = backend
        self.app = app

    def describe(self) -> list[Any]:
        return []  # nothing to check up front: the names come from the status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = self.app.extensions.get("wkr_jobs") if self.app is not None else None
        if jobs is not None:
            family = GaugeMetricFamily("wkr_http_jobs", "jobs held by the bridge's job "
                                       "store, by status", labels=["status"])
            for job_status, count in sorted(jobs.counts().items()):
                family.add_metric([job_status], count)
            yield family
        try:
            status: ServerStatus = self.backend.server_status()
        except Exception:
            yield GaugeMetricFamily("wkr_up", "whether the server answered this scrape", 0)
            return
        yield GaugeMetricFamily("wkr_up", "whether the server answered this scrape", 1)
        yield from server_families(status)


def _gauge(name: str, doc: str, value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, float(value))


def _counter(name: str, doc: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, float(value))


def server_families(status: ServerStatus) -> Iterator[Any]:
    """Metric families from a ``server_status`` snapshot."""
    yield from _server_families(status)
    yield from _traffic_families(status)
    yield from _recovery_families(status)
    yield from _latency_families(status)
    yield from _batch_families(status)
    yield from _queue_families(status)
    yield from _worker_families(status["workers"])
    yield from _statistic_families(status["statistic"])


def _server_families(status: ServerStatus) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily("wkr_server_info", "the server's version and settings (1)",
                             labels=["version", "protocol", "model_name"])
    info.add_metric([status["server_version"], status["protocol"],
                     str(status["config"]["model_name"] or "")], 1)
    yield info
    yield from _model_families(dict(status))
    yield _gauge("wkr_ready", "1 when every worker has loaded its model", status["ready"])
    yield _gauge("wkr_draining", "1 while the server shuts down", status["draining"])
    yield _gauge("wkr_uptime_seconds", "seconds since the server started", status["uptime_s"])


def _model_families(status: dict[str, Any]) -> Iterator[Any]:
    """The served model and its switches (status ``model`` and ``switch``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    model = status.get("model")
    if not isinstance(model, dict):
        return  # a server that does not say
    info = GaugeMetricFamily("wkr_model_info", "the served model's name, version and epoch "
                             "(switches done since the server started) (1)",
                             labels=["model_name", "model_version", "epoch"])
    epoch = int(model.get("epoch") or 0)
    info.add_metric([str(model.get("name") or ""), str(model.get("version") or ""),
                     str(epoch)], 1)
    yield info
    yield CounterMetricFamily("wkr_model_switches", "model switches done since the server "
                              "started", float(epoch))
    switch = status.get("switch")
    state = GaugeMetricFamily("wkr_model_switch_state", "1 for the state of the latest "
                              "model switch (none: no switch yet)", labels=["state"])
    current = switch.get("state") if isinstance(switch, dict) else None
    for name in SWITCH_STATES:
        state.add_metric([name], 1.0 if (current or "none") == name else 0.0)
    yield state
    if isinstance(switch, dict):
        progress = GaugeMetricFamily("wkr_model_switch_workers", "workers of the latest "
                                     "switch: switched so far, and in all", labels=["kind"])
        progress.add_metric(["switched"], float(switch.get("switched") or 0))
        progress.add_metric(["total"], float(switch.get("total") or 0))
        yield progress


def _traffic_families(status: ServerStatus) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield _counter("wkr_requests", "requests received by the server (every client, the "
                   "bridge's included)", status["num_requests"])
    yield _counter("wkr_items", "items received (a batch request carries several)",
                   status["num_items"])
    errors = status["num_errors"]
    replies = CounterMetricFamily("wkr_replies", "requests answered, by outcome",
                                  labels=["outcome"])
    replies.add_metric(["ok"], float(status["num_results"]))
    replies.add_metric(["error"], float(sum(errors.values())))
    yield replies
    by_kind = CounterMetricFamily("wkr_errors", "error replies, by kind (error code)",
                                  labels=["kind"])
    for kind, count in sorted(errors.items()):
        by_kind.add_metric([str(kind)], float(count))
    yield by_kind
    refused = CounterMetricFamily("wkr_refused_requests", "requests refused on arrival, by "
                                  "reason", labels=["reason"])
    refused.add_metric(["invalid"], float(status["num_rejected"]))
    refused.add_metric(["overloaded"], float(status["num_overloaded"]))
    yield refused
    yield _counter("wkr_expired_in_queue_items", "items whose deadline passed while queued",
                   status["num_expired_in_queue"])
    yield _counter("wkr_undeliverable_replies", "replies for clients that had gone",
                   status["num_undeliverable"])
    throughput = GaugeMetricFamily("wkr_throughput_replies_per_second", "replies per "
                                   "second, mean over the last window", labels=["window"])
    rates = status["throughput_per_s"]
    for window, value in (("1s", rates["last_1s"]), ("10s", rates["last_10s"]),
                          ("60s", rates["last_60s"])):
        throughput.add_metric([window], float(value))
    yield throughput


def _recovery_families(status: ServerStatus) -> Iterator[Any]:
    """What the server did about workers that died and the inputs that killed them."""
    yield _counter("wkr_retried_items", "items queued again, each alone, after the worker "
                   "computing them died", status["num_retried_items"])
    yield _counter("wkr_poisoned_requests", "requests answered PoisonInput (error "
                   "poison_input): an item of theirs was in the batches of two workers "
                   "that died", status["num_poisoned"])
    yield _gauge("wkr_quarantined_inputs", "inputs quarantined (in the batches of two "
                 "workers that died): never computed again", status["quarantined_inputs"])
    yield _counter("wkr_ventilator_restarts", "times the ventilator crashed and was "
                   "restarted (the server's other counters restart from zero with it)",
                   status["ventilator_generation"])


def _latency_families(status: ServerStatus) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    hist = status["latency_histogram"]
    yield _histogram("wkr_request_latency_seconds", "time from a request's arrival at the "
                     "server to its reply", hist["buckets_s"], hist["counts"], hist["sum_s"])
    latency = status["latency_ms"]
    recent = GaugeMetricFamily("wkr_request_latency_recent_seconds", "percentiles of the "
                               "latency of the most recent requests (up to 4096)",
                               labels=["quantile"])
    if latency["window"]:  # before the first reply, the percentiles are NaN
        for q, ms in (("0.5", latency["p50"]), ("0.9", latency["p90"]),
                      ("0.99", latency["p99"])):
            recent.add_metric([q], float(ms) / 1000.0)
    yield recent


def _batch_families(status: ServerStatus) -> Iterator[Any]:
    yield _counter("wkr_batches", "batches dispatched to workers", status["num_batches"])
    sizes = {int(k): int(v) for k, v in status["batch_size"]["counts"].items()}
    bounds = _batch_bounds(int(status["config"]["batch_size"]))
    counts = [0] * (len(bounds) + 1)
    for size, count in sizes.items():
        counts[next((i for i, b in enumerate(bounds) if size <= b), len(bounds))] += count
    yield _histogram("wkr_batch_size", "items per batch given to predict", bounds, counts,
                     float(sum(k * v for k, v in sizes.items())))


def _queue_families(status: ServerStatus) -> Iterator[Any]:
    yield _gauge("wkr_queue_items", "items waiting for a worker", status["queue_items"])
    yield _gauge("wkr_queue_capacity_items", "most items the queue takes (-max_queue_size)",
                 status["max_queue_size"])
    yield _gauge("wkr_in_flight_items", "items in batches being computed",
                 status["in_flight_items"])
    yield _gauge("wkr_busy_workers", "workers computing a batch", status["busy_workers"])
    yield _gauge("wkr_congested_clients", "clients not reading their replies",
                 status["congested_clients"])
    yield _gauge("wkr_held_replies", "replies held for congested clients",
                 status["held_replies"])
    yield _gauge("wkr_pending_split_requests", "requests split across batches, not yet "
                 "complete", status["pending_split_requests"])


def _worker_families(workers: list[WorkerRow]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily("wkr_worker_state", "1 for each worker's current state",
                              labels=["worker", "state"])
    info = GaugeMetricFamily("wkr_worker_info", "each worker's pid and device (1)",
                             labels=["worker", "pid", "device"])
    restarts = CounterMetricFamily("wkr_worker_restarts", "times each worker was restarted",
                                   labels=["worker"])
    busy = CounterMetricFamily("wkr_worker_busy_seconds", "time each worker spent in "
                               "predict", labels=["worker"])
    batches = CounterMetricFamily("wkr_worker_batches", "batches each worker completed",
                                  labels=["worker"])
    for row in workers:
        worker = str(row["index"])
        for name in WORKER_STATES:
            state.add_metric([worker, name], 1.0 if row["state"] == name else 0.0)
        info.add_metric([worker, str(row["pid"] or ""), str(row["device"] or "")], 1)
        restarts.add_metric([worker], float(row["restarts"]))
        # the sink adds these once the worker's slot answered its first batch
        busy.add_metric([worker], float(row.get("busy_s", 0.0)))
        batches.add_metric([worker], float(row.get("batches_done", 0)))
    yield from (state, info, restarts, busy, batches)


def _statistic_families(statistic: dict[str, StatSummary]) -> Iterator[Any]:
    """Statistics recorded by the model (``record_statistic``), if any."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not statistic:
        return
    observed = CounterMetricFamily("wkr_user_statistic_observations", "values recorded "
                                   "with record_statistic, by name", labels=["name"])
    summary = GaugeMetricFamily("wkr_user_statistic", "mean, min, max and recent median "
                                "of values recorded with record_statistic",
                                labels=["name", "stat"])
    for name, snap in sorted(statistic.items()):
        observed.add_metric([str(name)], float(snap["count"]))
        for stat, value in (("mean", snap.get("mean")), ("min", snap.get("min")),
                            ("max", snap.get("max")), ("p50", snap.get("p50"))):
            if value is not None:  # none of them before the first value
                summary.add_metric([str(name), stat], float(value))
    yield observed
    yield summary


def _batch_bounds(batch_size: int) -> list[float]:
    """Bucket bounds for batch sizes: powers of two below ``batch_size``, and itself."""
    bounds, b = [], 1
    while b < batch_size:
        bounds.append(float(b))
        b *= 2
    return [*bounds, float(max(1, batch_size))]


def _histogram(name: str, doc: str, bounds: list[float], counts: list[int],
               total: float) -> Any:
    """A histogram family from per-bucket (not cumulative) ``counts``, the last one
    counting values above every bound."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    cumulative, buckets = 0, []
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        cumulative += count
        buckets.append((floatToGoString(bound), float(cumulative)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def register(app: Flask, backend: Any) -> None:
    """Add ``GET /metrics`` to ``app`` and count every HTTP request it answers."""
    shared = _multiprocess_dir()
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(backend, app))
    if shared is None:
        http = HTTPMetrics(registry)
    else:
        from prometheus_client.multiprocess import MultiProcessCollector

        http = HTTPMetrics(None)  # counted in files, summed over processes at scrape time
        MultiProcessCollector(registry, path=shared)
    app.extensions["wkr_metrics"] = http

    @app.after_request
    def _count(response: Response) -> Response:
        http.observe(response)
        return response

    @app.get("/metrics")
    def metrics() -> Any:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE)
