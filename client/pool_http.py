"""The pool's HTTP face on ``-http_port``: ``/status``, ``/health``, ``/metrics``.

Read-only, served from the central's latest snapshot by a small threaded server of the
standard library (the pool must run where only the client is installed). Each
connection has a read timeout, so idle or slow clients cannot hold a thread for long.

- ``GET /status``: the snapshot as JSON (units, remote servers, totals, config).
- ``GET /health``, ``/health/live``: 200 while the central runs.
- ``GET /health/ready``: 200 when the pool runs and at least one unit is running,
  else 503.
- ``GET /metrics``: Prometheus text (needs ``prometheus-client``, the ``pool`` extra).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["render_metrics", "start_http"]

#: Seconds a connection may stay silent before it is closed.
READ_TIMEOUT_S = 5.0
#: Connections served at once (a thread each); more are closed at once, unanswered.
MAX_CONNECTIONS = 64


def start_http(central: Any, host: str, port: int) -> ThreadingHTTPServer:
    """Bind and serve in a daemon thread; return the server (``shutdown()`` stops it)."""

    class Handler(_Handler):
        pass

    Handler.central = central
    server = (_Server6 if ":" in host else _Server)((host.strip("[]"), port), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                     name="pool-http", daemon=True).start()
    return server


class _Server(ThreadingHTTPServer):
    """At most :data:`MAX_CONNECTIONS` connections at once, each in a daemon thread."""

    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: refuse rather than queue a thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    central: Any = None
    timeout = READ_TIMEOUT_S
    server_version = "wkr-decentral"

    def do_GET(self) -> None:
        snapshot = self.central.snapshot
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/status":
            self._send(200, snapshot)
        elif path in ("/health", "/health/live"):
            self._send(200, {"status": "alive", "state": snapshot.get("state")})
        elif path == "/health/ready":
            ready = snapshot.get("state") == "running" and snapshot.get("units_running", 0) > 0
            self._send(200 if ready else 503, {"ready": ready, "state": snapshot.get("state"),
                                               "units_running": snapshot.get("units_running")})
        elif path == "/metrics":
            try:
                body, content_type = render_metrics(snapshot)
            except ImportError:
                self._send(501, {"error": "/metrics needs prometheus-client "
                                          "(pip install wkr-serving-client[pool])"})
                return
            self._send_bytes(200, body, content_type)
        else:
            self._send(404, {"error": f"no route {path}; try /status, /health, /metrics"})

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, status: int, value: Any) -> None:
        self._send_bytes(status, json.dumps(value, default=str).encode(), "application/json")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # status polling every second would flood the log


def render_metrics(snapshot: dict[str, Any]) -> tuple[bytes, str]:
    """Prometheus exposition of a pool snapshot."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self) -> Any:
            units = snapshot.get("units", [])
            labels = ["unit", "server"]
            families = {
                "iterations": CounterMetricFamily(
                    "wkr_pool_unit_iterations", "do_work calls of a unit", labels=labels),
                "errors": CounterMetricFamily(
                    "wkr_pool_unit_errors", "do_work calls that raised", labels=labels),
                "restarts": CounterMetricFamily(
                    "wkr_pool_unit_restarts", "unplanned unit restarts", labels=labels),
            }
            running = GaugeMetricFamily("wkr_pool_unit_running", "1 if the unit runs",
                                        labels=labels)
            counters = CounterMetricFamily("wkr_pool_unit_events",
                                           "counters a unit keeps (jobs done, failed...)",
                                           labels=[*labels, "name"])
            for row in units:
                key = [str(row["unit"]), row["server"]]
                for name, family in families.items():
                    family.add_metric(key, row.get(name) or 0)
                running.add_metric(key, 1.0 if row.get("state") == "running" else 0.0)
                for name, value in sorted((row.get("counters") or {}).items()):
                    counters.add_metric([*key, name], value)
            reachable = GaugeMetricFamily("wkr_pool_server_reachable",
                                          "1 if the remote server's ports accept connections",
                                          labels=["server"])
            for row in snapshot.get("servers", []):
                reachable.add_metric([row["server"]], 1.0 if row.get("reachable") else 0.0)
            yield from (*families.values(), running, counters, reachable)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
