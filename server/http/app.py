"""The HTTP face of the server: a Flask application over a pool of Python clients.

:func:`create_app` builds the application; the bridge process (``httpbridge.py``) serves
it with a production WSGI server. Every route talks to the server through
:class:`Backend`, which lends one :class:`~wkr_serving.client.WKRClient` of a pool to each
call, so the bridge adds no batching of its own: concurrent HTTP requests become
concurrent requests to the ventilator, which batches them with everyone else's.

Core routes (this module); other route groups live in their own blueprints:

- ``POST /encode``: ``{"data": x}`` or ``{"batch": [x, ...]}`` (optional ``"dtype"`` for
  ``-protocol numpy``, optional ``"timeout"`` in ms) → ``{"error_code": 0,
  "error_message": "", "data": ...}``; on error a real HTTP status and the same envelope.
- ``GET /status/server``, ``GET /status/client``.
- ``GET /health/live`` (the bridge answers), ``GET /health/ready`` (every worker has
  loaded its model and the pipeline answers).
- ``GET /metadata``: model, worker class, protocol, dtypes and shapes seen, versions.

Every response carries ``X-Request-ID`` (the caller's, or a new one). With a token
(``-http_token``) every route but the health checks needs ``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, NamedTuple

import numpy as np
from flask import Flask, Response, g, jsonify, request
from wkr_serving.client import ConcurrentWKRClient, WKRClient
from wkr_serving.client import errors as E
from wkr_serving.client.protocol import MAX_OPTION_CHARS
from wkr_serving.client.version import __version__

from ..config import ServerConfig
from . import state

__all__ = ["Backend", "EncodeFastPath", "create_app", "encode_call", "http_status", "to_json"]

#: Largest ``/encode`` body read (bytes); a bigger one gets 413.
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Paths served without the bearer token: probes must not need a secret, and the
#: dashboard's page and static files hold no data (its data route needs the token).
OPEN_PATHS = ("/health/", "/v2/health/", "/dashboard/static/")
OPEN_EXACT = ("/dashboard", "/dashboard/")


def http_status(error: BaseException) -> int:
    """The HTTP status that reports ``error`` (a client or server error)."""
    if isinstance(error, (E.BadInput, E.ProtocolError, E.ClientUsageError)):
        return 400
    if isinstance(error, E.Unauthorized):
        return 403
    if isinstance(error, E.Overloaded):
        return 429
    if isinstance(error, (E.ShuttingDown, E.ConnectionLost)):
        return 503
    if isinstance(error, (E.DeadlineExceeded, E.WKRTimeoutError)):
        return 504
    return 500


def error_code(error: BaseException) -> str:
    return error.code if isinstance(error, E.ServerError) else type(error).__name__


def to_json(value: Any) -> Any:
    """A result as JSON: arrays become nested lists, bytes become base64 text."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SU":
            return to_json(value.tolist())
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


class Backend:
    """The bridge's connection to the server: a pool of clients and what it has seen."""

    def __init__(self, config: ServerConfig, port: int, port_out: int, host: str = "127.0.0.1",
                 worker_class: str = "", client_options: dict[str, Any] | None = None,
                 pool_size: int | None = None) -> None:
        self.config = config
        self.worker_class = worker_class
        self.protocol = config.protocol
        # No handshake now: each client makes it before its first call, so a bridge
        # process can start (or restart) while the server is busy or stopping.
        options = {"ip": host, "port": port, "port_out": port_out, "protocol": config.protocol,
                   "timeout": 60_000, "ignore_all_checks": True, **(client_options or {})}
        self.pool = ConcurrentWKRClient(max_concurrency=pool_size or config.http_max_connect,
                                        **options)
        self.status_client = WKRClient(**options)
        self.started_at = time.time()
        self._seen_lock = threading.Lock()
        self.seen: dict[str, Any] = {"input": None, "output": None}

    def encode(self, items: list[Any], timeout: int | None, **options: Any) -> list[Any]:
        """Compute ``items`` as one request; ``options`` (``request_id``,
        ``suppress_log_input``) go to the server's prediction log."""
        results: list[Any] = self.pool.encode_batch(items, timeout=timeout, **options)
        self._see(items[0], results[0] if results else None)
        return results

    def _see(self, item: Any, result: Any) -> None:
        if self.seen["input"] is not None and self.seen["output"] is not None:
            return
        with self._seen_lock:
            self.seen["input"] = self.seen["input"] or describe_value(item)
            if result is not None:
                self.seen["output"] = self.seen["output"] or describe_value(result)
            path = self._seen_path()
            if path is not None:  # for the bridge's other processes (once per process)
                tmp = f"{path}.{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(self.seen, fh)
                os.replace(tmp, path)

    def seen_values(self) -> dict[str, Any]:
        """What the first request showed, in this process or another of the bridge."""
        if self.seen["input"] is None and self.seen["output"] is None:
            path = self._seen_path()
            if path is not None and os.path.exists(path):
                with open(path, encoding="utf-8") as fh, contextlib.suppress(ValueError):
                    return dict(json.load(fh))
        return self.seen

    @staticmethod
    def _seen_path() -> str | None:
        return os.path.join(state.state_dir(), "seen.json") if state.shared() else None

    def server_status(self) -> dict[str, Any]:
        return self.status_client.server_status

    def close(self) -> None:
        self.pool.close()
        self.status_client.close()


def describe_value(value: Any) -> dict[str, Any]:
    """``{"dtype", "shape"}`` of an array, or the Python type of another value."""
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.str, "shape": list(value.shape)}
    return {"type": type(value).__name__}


def create_app(backend: Backend, token: str | None = None, cors: str | None = None,
               blueprints: list[Callable[[Flask, Backend], None]] | None = None) -> Flask:
    """The Flask application of the bridge; ``blueprints`` register more route groups."""
    app = Flask("wkr_serving.http")
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["wkr_backend"] = backend
    if cors:
        from flask_cors import CORS

        CORS(app, origins=cors, expose_headers=["X-Request-ID"])

    @app.before_request
    def _before() -> Any:
        g.request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        g.started = time.perf_counter()
        if (token is not None and not request.path.startswith(OPEN_PATHS)
                and request.path not in OPEN_EXACT):
            given = request.headers.get("Authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(
                    given[7:].encode(), token.encode())):
                return envelope_error(401, "unauthorized",
                                      "this route needs Authorization: Bearer <-http_token>")
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    @app.post("/encode")
    def encode() -> Any:
        # Served by EncodeFastPath in the bridge; kept for the app used on its own and
        # so that CORS preflight (OPTIONS) finds the route.
        status, payload = encode_call(backend, request.get_json(silent=True), g.request_id)
        return jsonify(payload), status

    @app.get("/status/server")
    def status_server() -> Any:
        try:
            return jsonify(to_json(backend.server_status()))
        except Exception as exc:
            return envelope_error(http_status(exc), error_code(exc), str(exc))

    @app.get("/status/client")
    def status_client() -> Any:
        return jsonify(to_json({"pool_size": backend.pool.max_concurrency,
                                "clients": backend.pool.status}))

    @app.get("/health/live")
    def live() -> Any:
        return jsonify({"live": True})

    @app.get("/health/ready")
    def ready() -> Any:
        ok, why = is_ready(backend)
        return jsonify({"ready": ok, "reason": why}), 200 if ok else 503

    @app.get("/metadata")
    def metadata() -> Any:
        config = backend.config
        return jsonify({
            "model_name": config.model_name, "model_dir": config.model_dir,
            "worker_class": backend.worker_class, "protocol": config.protocol,
            "batch_size": config.batch_size, "num_worker": config.num_worker,
            **{k: v for k, v in backend.seen_values().items() if k in ("input", "output")},
            "versions": {"wkr_serving": __version__, "python": platform.python_version(),
                         "numpy": np.__version__},
        })

    for register in blueprints or []:
        register(app, backend)
    return app


class EncodeCall(NamedTuple):
    """What an ``/encode`` (or ``/jobs``) body asks for."""

    items: list[Any]
    single: bool
    timeout: int | None
    suppress_log_input: bool


def parse_encode_body(body: Any, protocol: str) -> EncodeCall:
    """The call an ``/encode`` body asks for; ValueError says what is wrong, BadInput
    (from :func:`as_input`) names an input the protocol cannot take."""
    if not isinstance(body, dict) or ("data" in body) == ("batch" in body):
        raise ValueError('the body must be a JSON object with "data" (one input) or '
                         '"batch" (a list of inputs)')
    single = "data" in body
    items = [body["data"]] if single else body["batch"]
    if not isinstance(items, list) or not items:
        raise ValueError('"batch" must be a non-empty list')
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or timeout <= 0):
        raise ValueError('"timeout" must be a positive int (ms)')
    suppress = body.get("suppress_log_input", False)
    if not isinstance(suppress, bool):
        raise ValueError('"suppress_log_input" must be a boolean')
    return EncodeCall([as_input(x, protocol, body.get("dtype")) for x in items], single,
                      timeout, suppress)


def run_encode(backend: Backend, call: EncodeCall, request_id: str) -> Any:
    """Make the call on the server; return its result(s) as JSON. Raises its error."""
    if backend.config.log_predictions:  # the log gets the request id (and suppress)
        results = backend.encode(call.items, call.timeout,
                                 suppress_log_input=call.suppress_log_input,
                                 request_id=request_id[:MAX_OPTION_CHARS])
    else:
        results = backend.encode(call.items, call.timeout)
    return to_json(results[0] if call.single else results)


def failure(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and envelope reporting ``exc`` (an error of the call)."""
    return _envelope(http_status(exc), error_code(exc), getattr(exc, "message", str(exc)))


def encode_call(backend: Backend, body: Any, request_id: str) -> tuple[int, dict[str, Any]]:
    """``POST /encode``: validate the JSON body, call the server, and return the HTTP
    status with the envelope."""
    try:
        call = parse_encode_body(body, backend.protocol)
    except ValueError as exc:  # the body is not a valid call
        return _envelope(400, "bad_input", str(exc))
    except Exception as exc:  # an input the protocol cannot take (BadInput)
        return failure(exc)
    try:
        data = run_encode(backend, call, request_id)
    except Exception as exc:  # every failure becomes an HTTP status and envelope
        return failure(exc)
    return 200, {"error_code": 0, "error_message": "", "data": data}


def _envelope(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error_code": status, "error_type": code, "error_message": message,
                    "data": None}


class EncodeFastPath:
    """WSGI middleware in front of the Flask app: ``POST /encode``, the bridge's hot
    route, is answered here without Flask's per-request machinery (which doubled the
    bridge's CPU time per request), with the same behaviour: token, ``X-Request-ID``,
    CORS, the same statuses and envelope, and the HTTP metrics. Everything else goes to
    the Flask app."""

    def __init__(self, app: Flask, backend: Backend, token: str | None, cors: str | None,
                 ) -> None:
        self.wsgi = app.wsgi_app
        self.app = app
        self.backend = backend
        self.token = token.encode() if token is not None else None
        self.cors = [o.strip() for o in cors.split(",")] if cors else []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/encode" or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi(environ, start_response)
        started = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if self.token is not None and not (auth.startswith("Bearer ") and hmac.compare_digest(
                auth[7:].encode(), self.token)):
            status, payload = _envelope(401, "unauthorized", "this route needs "
                                        "Authorization: Bearer <-http_token>")
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            body = None
            if 0 < length <= MAX_BODY_BYTES:
                try:
                    body = json.loads(environ["wsgi.input"].read(length))
                except ValueError:
                    body = None
            if length > MAX_BODY_BYTES:
                status, payload = _envelope(413, "bad_input", f"the body is over "
                                            f"{MAX_BODY_BYTES} bytes")
            else:
                status, payload = encode_call(self.backend, body, request_id)
        data = json.dumps(payload, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                   ("X-Request-ID", request_id)]
        origin = environ.get("HTTP_ORIGIN")
        if origin and self.cors:
            allowed = "*" if "*" in self.cors else origin if origin in self.cors else None
            if allowed:
                headers += [("Access-Control-Allow-Origin", allowed),
                            ("Access-Control-Expose-Headers", "X-Request-ID")]
                if allowed != "*":
                    headers.append(("Vary", "Origin"))
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        metrics = self.app.extensions.get("wkr_metrics")
        if metrics is not None:
            metrics.count("/encode", "POST", status, time.perf_counter() - started,
                          payload.get("error_type"))
        return [data]


def is_ready(backend: Backend) -> tuple[bool, str]:
    """Whether every worker has its model loaded and the pipeline answers a status call."""
    try:
        status = backend.server_status()
    except Exception as exc:
        return False, f"the server does not answer: {exc}"
    if not status.get("ready"):
        return False, "workers are still loading their model"
    if status.get("draining"):
        return False, "the server is shutting down"
    return True, ""


def as_input(value: Any, protocol: str, dtype: Any = None) -> Any:
    """A JSON input as the server's protocol wants it (numpy: an array of ``dtype``)."""
    if protocol != "numpy" and dtype is None:
        return value
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise E.BadInput(f"input is not an array of {dtype or 'numbers'}: {exc}") from None


def envelope_error(status: int, code: str, message: str) -> Any:
    status, payload = _envelope(status, code, message)
    return jsonify(payload), status


def all_blueprints() -> list[Callable[[Flask, Backend], None]]:
    """The route groups registered besides the core routes above: each is a function
    ``register(app, backend)`` in its own module; adding one here is all it takes."""
    from . import dashboard, jobs, metrics, v2

    return [dashboard.register, v2.register, metrics.register, jobs.register]
