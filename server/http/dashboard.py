"""The live dashboard of the HTTP bridge: a page for people, and the JSON it polls.

Routes:

- ``GET /dashboard``: the page (``static/dashboard.html``). It polls ``dashboard/data``
  every second and draws, without reloading: throughput (requests, results and errors per
  second), latency p50/p99, queue depth and in-flight items, the batch-size distribution,
  errors by kind, a table of the workers and the other processes of the server, and
  what the server recovered from (items retried after a worker died, requests refused
  as poison, quarantined inputs, ventilator restarts), the served model (name, version,
  epoch, each worker's version) and the latest switch, and a form that switches the
  model (``POST /v2/repository/models/{name}/load``, :mod:`.lifecycle`; with
  ``-http_token`` it sends the token the page was opened with, or the one typed in).
- ``GET /dashboard/static/<file>``: the page's script, style sheet and the vendored chart
  library (uPlot, from npm: ``scripts/vendor_js.sh``). Only files of the package's
  ``static`` directory are served (no CDN, no path outside that directory).
- ``GET /dashboard/data``: the essentials of ``server_status`` plus, per process, CPU and
  memory (psutil, by pid) and, when the machine has NVIDIA GPUs, each GPU's utilisation
  and memory (GPUtil). 503 with ``{"ok": false, "error": ...}`` when the server does
  not answer.

State: the bridge may run in several processes (-http_workers), and each poll may land
on any of them, so these routes keep no history. Everything that moves over time (rates,
the time series the charts draw) is computed by the page from successive snapshots of the
server's own counters, which every process reads alike. The only per-process memory is a
cache: psutil ``Process`` handles (their CPU percentage is measured since the previous poll
that reached the same bridge process; ``cpu_s``, cumulative CPU seconds, lets the page
compute exact rates instead) and GPUtil's answer for :data:`GPU_TTL_S` seconds (it runs
``nvidia-smi``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, redirect, send_from_directory

from ..status import ServerStatus, WorkerRow

__all__ = ["STATIC_DIR", "collect", "gpu_rows", "process_row", "register"]

#: The page's files: part of the package (``[tool.setuptools.package-data]``).
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Seconds one GPUtil (nvidia-smi) answer is reused; after a failure, seconds to wait.
GPU_TTL_S = 2.0
GPU_RETRY_S = 30.0
#: Seconds browsers may cache the static files (the page itself is never cached).
STATIC_MAX_AGE_S = 300

_procs_lock = threading.Lock()
_procs: dict[int, Any] = {}  # pid -> psutil.Process (kept for cpu_percent deltas)
_gpu_lock = threading.Lock()
_gpu_cache: dict[str, Any] = {"at": -1e9, "rows": [], "error": None, "ttl": GPU_TTL_S}


def process_row(pid: int | None) -> dict[str, Any]:
    """CPU and memory of process ``pid``: ``cpu_percent`` (since the previous call for
    that pid in this process; 0.0 the first time), ``cpu_s`` (user + system seconds so
    far), ``rss_bytes``, ``threads``; ``alive`` False when there is no such process."""
    row: dict[str, Any] = {"pid": pid, "alive": False, "cpu_percent": None, "cpu_s": None,
                           "rss_bytes": None, "threads": None}
    if not pid:
        return row
    import psutil

    try:
        with _procs_lock:
            proc = _procs.get(pid)
            if proc is None or not proc.is_running():  # is_running also spots pid reuse
                proc = psutil.Process(pid)
                _procs[pid] = proc
                proc.cpu_percent(None)  # the first call only starts the measurement
                percent = 0.0
            else:
                percent = proc.cpu_percent(None)
            with proc.oneshot():
                times = proc.cpu_times()
                row.update(alive=True, cpu_percent=percent, cpu_s=times.user + times.system,
                           rss_bytes=proc.memory_info().rss, threads=proc.num_threads())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        with _procs_lock:
            _procs.pop(pid, None)
    return row


def _forget_processes(keep: set[int]) -> None:
    with _procs_lock:
        for pid in [p for p in _procs if p not in keep]:
            del _procs[pid]


def gpu_rows() -> tuple[list[dict[str, Any]], str | None]:
    """``([{"id", "name", "load_percent", "memory_used_mb", "memory_total_mb",
    "temperature_c"}], error)`` from GPUtil, cached; an empty list without GPUs."""
    now = time.monotonic()
    with _gpu_lock:
        if now - _gpu_cache["at"] < _gpu_cache["ttl"]:
            return _gpu_cache["rows"], _gpu_cache["error"]
        rows: list[dict[str, Any]] = []
        error = None
        try:
            import GPUtil

            for gpu in GPUtil.getGPUs():
                rows.append({"id": int(gpu.id), "name": str(gpu.name),
                             "load_percent": _number(gpu.load, 100.0),
                             "memory_used_mb": _number(gpu.memoryUsed),
                             "memory_total_mb": _number(gpu.memoryTotal),
                             "temperature_c": _number(gpu.temperature)})
        except Exception as exc:  # GPUtil absent, nvidia-smi missing or failing
            rows, error = [], f"{type(exc).__name__}: {exc}"
        _gpu_cache.update(at=now, rows=rows, error=error,
                          ttl=GPU_RETRY_S if error else GPU_TTL_S)
        return rows, error


def _number(value: Any, scale: float = 1.0) -> float | None:
    try:
        number = float(value) * scale
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN -> None (JSON has no NaN)


def _gpu_id(device: Any) -> int | None:
    """The GPU index of a worker's device (``"gpu:1"`` → 1; ``"cpu"`` → None)."""
    if isinstance(device, str) and device.startswith(("gpu:", "cuda:")):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            return None
    return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _worker_row(w: WorkerRow, gpus: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row of the workers table: the server's row, its process and its GPU."""
    row: dict[str, Any] = {
        "index": w["index"], "pid": w["pid"], "device": w["device"], "state": w["state"],
        "batches": w["batches"], "items": w["items"], "restarts": w["restarts"],
        "last_error": w["last_error"],
        # the sink adds these once the worker's slot answered its first batch
        "batches_done": w.get("batches_done", 0), "busy_s": w.get("busy_s", 0.0),
        # the model version and epoch the worker serves (they change during a switch)
        "model_version": dict(w).get("model_version"), "epoch": dict(w).get("epoch"),
    }
    row.update({k: v for k, v in process_row(w["pid"]).items() if k != "pid"})
    gpu_id = _gpu_id(w["device"])
    row["gpu"] = gpus.get(gpu_id) if gpu_id is not None else None
    return row


def _server_summary(status: ServerStatus, backend: Any) -> dict[str, Any]:
    config = status["config"]
    return {
        "version": status["server_version"], "protocol": status["protocol"],
        "model_name": config["model_name"],
        "worker_class": getattr(backend, "worker_class", ""),
        "num_worker": config["num_worker"], "batch_size": config["batch_size"],
        "max_queue_size": status["max_queue_size"],
        "uptime_s": status["uptime_s"], "ready": status["ready"],
        "draining": status["draining"],
        # the served model and the latest switch (None from a server that does not say)
        "model": dict(status).get("model"), "switch": dict(status).get("switch"),
        # whether the switch control must send the bridge's token (the page asks for it)
        "token_required": bool(getattr(getattr(backend, "config", None), "http_token",
                                       None)),
    }


def _counters(status: ServerStatus) -> dict[str, int]:
    """The server's counts since it (its ventilator or sink) started."""
    return {
        "requests": status["num_requests"], "items": status["num_items"],
        "results": status["num_results"], "batches": status["num_batches"],
        "rejected": status["num_rejected"], "overloaded": status["num_overloaded"],
        "expired_in_queue": status["num_expired_in_queue"],
        "undeliverable": status["num_undeliverable"],
        "retried_items": status["num_retried_items"], "poisoned": status["num_poisoned"],
        "quarantined_inputs": status["quarantined_inputs"],
        "ventilator_restarts": status["ventilator_generation"],
    }


def collect(backend: Any) -> dict[str, Any]:
    """The dashboard's snapshot: ``server_status`` essentials, processes and GPUs. The
    status is the bridge's own server's (same version): every key is there."""
    status: ServerStatus = backend.server_status()
    gpus, gpu_error = gpu_rows()
    by_id = {g["id"]: g for g in gpus}
    workers = [_worker_row(w, by_id) for w in status["workers"]]
    processes = []
    for role, pid in (("supervisor", status["supervisor_pid"]),
                      ("ventilator", status["ventilator_pid"]),
                      ("sink", status["sink_pid"]), ("http", os.getpid())):
        processes.append({"role": role, **process_row(pid)})
    _forget_processes({p["pid"] for p in processes if p["pid"]}
                      | {w["pid"] for w in workers if w["pid"]})
    return {
        "ok": True,
        "time": time.time(),
        "server": _server_summary(status, backend),
        "counters": _counters(status),
        "errors": dict(status["num_errors"]),
        "queue_items": status["queue_items"],
        "in_flight_items": status["in_flight_items"],
        "busy_workers": status["busy_workers"],
        "latency_ms": _finite(dict(status["latency_ms"])),
        "throughput_per_s": dict(status["throughput_per_s"]),
        "batch_size": dict(status["batch_size"]),
        "workers": workers,
        "processes": processes,
        "gpus": gpus,
        "gpu_error": gpu_error,
    }


def register(app: Flask, backend: Any) -> None:
    """Add the dashboard's routes to the bridge's application."""

    @app.get("/dashboard")
    def dashboard() -> Response:
        response = send_from_directory(STATIC_DIR, "dashboard.html", max_age=0)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/dashboard/")
    def dashboard_slash() -> Any:
        # the page's links are relative to /dashboard: send /dashboard/ there
        return redirect("../dashboard", 308)

    @app.get("/dashboard/static/<path:filename>")
    def dashboard_static(filename: str) -> Response:
        # send_from_directory refuses any path that leaves STATIC_DIR (404).
        return send_from_directory(STATIC_DIR, filename, max_age=STATIC_MAX_AGE_S)

    @app.get("/dashboard/data")
    def dashboard_data() -> Any:
        try:
            data = collect(backend)
        except Exception as exc:  # the server does not answer: the page says so
            return jsonify({"ok": False, "time": time.time(),
                            "error": f"{type(exc).__name__}: {exc}"}), 503
        response = jsonify(data)
        response.headers["Cache-Control"] = "no-store"
        return response
