"""The bridge's routes besides the hot path, as a Flask application, and its backend.

The ASGI front (:mod:`.front`) answers ``POST /encode`` itself and hands every other
request to the application :func:`create_app` builds, after it has checked the token,
bounded and read the body. Every route talks to the server through :class:`Backend`.

Core routes (this module); other route groups live in their own modules
(:func:`all_blueprints`):

- ``POST /encode``: ``{"data": x}`` or ``{"batch": [x, ...]}`` (optional ``"dtype"`` for
  ``-protocol numpy``, optional ``"timeout"`` in ms) → ``{"error_code": 0,
  "error_message": "", "data": ...}``; on error a real HTTP status and the same envelope.
- ``GET /status/server``, ``GET /status/client``.
- ``GET /health/live`` (the bridge answers), ``GET /health/ready`` (every worker has
  loaded its model and the pipeline answers).
- ``GET /metadata``: the served model (name, version, directory, epoch, switch state),
  its worker's ``get_metadata()`` keys, worker class, protocol, dtypes and shapes seen,
  versions (:func:`merged_metadata`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any, NamedTuple

import numpy as np
from flask import Flask, Request, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from wkr_serving.client import AsyncWKRClient
from wkr_serving.client import errors as E
from wkr_serving.client.base import DEFAULT_TIMEOUT_MS, SWITCH_TIMEOUT_MS
from wkr_serving.client.protocol import MAX_OPTION_CHARS
from wkr_serving.client.version import __version__

from ..config import ServerConfig
from . import jsonio, state

__all__ = ["Backend", "EncodeCall", "Limits", "ModelInfo", "all_blueprints", "create_app",
           "encode_call", "envelope", "failure", "http_status", "merged_metadata",
           "parse_encode_body", "read_call"]

#: Fewest items a merged request may hold (else ``-batch_size``), see :class:`Coalescer`.
COALESCE_MIN_ITEMS = 32
#: Seconds a thread waits for a call beyond the call's own timeout (the server answers
#: a timed-out call itself; this only bounds a wait that went wrong).
CALL_SLACK_S = 5.0
#: Seconds a bridge process trusts what the server said of the served model (its name
#: and version, checked by every ``/v2/models/{name}`` request).
MODEL_INFO_TTL_S = 1.0


def http_status(error: BaseException) -> int:
    """The HTTP status that reports ``error``: the ``http_status`` its class states
    (client/errors.py); 500 for any other exception (a failure of the bridge itself)."""
    return error.http_status if isinstance(error, E.WKRError) else 500


def error_code(error: BaseException) -> str:
    return error.code if isinstance(error, E.ServerError) else type(error).__name__


class Backend:
    """The bridge process's connection to the server: one asyncio client, shared.

    Every route calls the server through it. The ASGI front awaits :meth:`aencode`
    on the event loop; the Flask routes, which run in threads, call :meth:`encode` and
    :meth:`server_status`, which hand the call to the loop and wait for its result. So
    the bridge adds no batching of its own: concurrent HTTP requests are concurrent
    requests on one client, which the ventilator batches with everyone else's. At most
    ``-http_max_connect`` calls are in flight at once; more wait their turn.
    """

    def __init__(self, config: ServerConfig, port: int, port_out: int, host: str = "127.0.0.1",
                 worker_class: str = "", client_options: dict[str, Any] | None = None,
                 ) -> None:
        self.config = config
        self.worker_class = worker_class
        self.protocol = config.protocol
        self.limits = Limits(config.max_request_items, config.max_msg_size)
        self.options = {"ip": host, "port": port, "port_out": port_out,
                        "protocol": config.protocol, "timeout": DEFAULT_TIMEOUT_MS,
                        **(client_options or {})}
        self.started_at = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncWKRClient | None = None
        self._connecting: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._coalescer: Coalescer | None = None
        self.in_flight = 0
        self._seen_lock = threading.Lock()
        self.seen: dict[str, Any] = {"input": None, "output": None}
        self._model_lock = threading.Lock()
        self._model: tuple[float, ModelInfo] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the bridge's event loop, in this process) from now on."""
        self.loop = loop
        self._connecting = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.config.http_max_connect)
        self._coalescer = Coalescer(self, min(max(self.config.batch_size, COALESCE_MIN_ITEMS),
                                              self.config.max_request_items))

    async def client(self) -> AsyncWKRClient:
        """The connected client. No handshake before the first call, so a bridge can
        start (or restart) while the server is busy or stopping; a failed connect is
        tried again by the next call."""
        if self._client is not None:
            return self._client
        assert self._connecting is not None, "attach() the event loop first"
        async with self._connecting:
            if self._client is None:
                client = AsyncWKRClient(**self.options)
                try:
                    await client.connect()
                except BaseException:
                    await client.close()
                    raise
                self._client = client
        return self._client

    async def aencode(self, items: list[Any], timeout: int | None, **options: Any) -> list[Any]:
        """Compute ``items`` as one request; ``options`` (``request_id``,
        ``suppress_log_input``) go to the server's prediction log.

        Calls made in the same turn of the event loop with the same timeout and no log
        options travel as one request to the server (see :class:`Coalescer`)."""
        assert self._slots is not None, "attach() the event loop first"
        await self._take_slot(timeout)
        self.in_flight += 1
        try:
            if options or self._coalescer is None:
                client = await self.client()
                results: list[Any] = await client.encode_batch(items, timeout=timeout,
                                                               **options)
            else:
                results = await self._coalescer.submit(items, timeout)
        finally:
            self.in_flight -= 1
            self._slots.release()
        if self.seen["output"] is None:
            self._see(items[0], results[0] if results else None)
        return results

    async def _take_slot(self, timeout: int | None) -> None:
        """One of the ``-http_max_connect`` slots; the wait for it counts against the
        call's timeout (``WKRTimeoutError``, a 504, when it runs out first)."""
        assert self._slots is not None
        if not self._slots.locked():  # the usual case: no wait, no timer
            await self._slots.acquire()
            return
        budget = self.options["timeout"] if timeout is None else timeout
        try:
            await asyncio.wait_for(self._slots.acquire(),
                                   None if budget is None else budget / 1000.0)
        except asyncio.TimeoutError:
            raise E.WKRTimeoutError(
                f"no free slot within {budget} ms: this bridge process already has "
                f"{self.config.http_max_connect} calls in flight (-http_max_connect)"
            ) from None

    async def astatus(self) -> dict[str, Any]:
        client = await self.client()
        status: dict[str, Any] = await client.server_status()
        return status

    def client_status(self) -> dict[str, Any]:
        """This process's client: one, shared by every request of the process."""
        client = self._client
        return {"pool_size": 1, "max_in_flight": self.config.http_max_connect, "clients": [{
            "identity": client.options.identity.decode(errors="replace") if client else None,
            "connected": client is not None, "in_flight": self.in_flight, "pid": os.getpid(),
            "server_ip": self.options["ip"], "port": self.options["port"],
            "port_out": self.options["port_out"], "protocol": self.protocol}]}

    def _run(self, coro: Any, timeout: float | None) -> Any:
        """Run ``coro`` on the bridge's loop from another thread and wait for it."""
        assert self.loop is not None, "attach() the event loop first"
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise E.WKRTimeoutError(f"no answer from the server in {timeout:g} s") from None

    def encode(self, items: list[Any], timeout: int | None, **options: Any) -> list[Any]:
        """:meth:`aencode` for the Flask routes (threads)."""
        wait = (timeout or self.options["timeout"]) / 1000.0 + CALL_SLACK_S
        results: list[Any] = self._run(self.aencode(items, timeout, **options), wait)
        return results

    def server_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._run(self.astatus(), self.options["timeout"] / 1000.0)
        return status

    # -- the model's lifecycle (see :mod:`.lifecycle`) --------------------------------

    async def ametadata(self) -> dict[str, Any]:
        client = await self.client()
        meta: dict[str, Any] = await client.metadata()
        return meta

    def metadata(self) -> dict[str, Any]:
        """The server's ``metadata`` command: the served model and its worker's
        ``get_metadata()`` (from a thread)."""
        meta: dict[str, Any] = self._run(self.ametadata(), self.options["timeout"] / 1000.0)
        return meta

    def current_model(self, max_age: float = MODEL_INFO_TTL_S) -> ModelInfo:
        """The served model's name, version, directory and epoch, as the server said at
        most ``max_age`` seconds ago in this process (the v2 routes check names against
        it on every request). When the server does not answer, the configured model."""
        with self._model_lock:
            cached = self._model
            if cached is not None and time.monotonic() - cached[0] <= max_age:
                return cached[1]
        try:
            meta = self.metadata()
            info = ModelInfo(str(meta.get("model_name") or self.default_model_name()),
                             _str_or_none(meta.get("model_version")),
                             _str_or_none(meta.get("model_dir")),
                             int(meta.get("epoch") or 0))
        except Exception:  # not answering (yet): what the bridge was started with
            config = self.config
            info = ModelInfo(self.default_model_name(), config.model_version,
                             config.model_dir, 0)
        with self._model_lock:
            self._model = (time.monotonic(), info)
        return info

    def forget_model(self) -> None:
        """Ask the server again next time (after a switch)."""
        with self._model_lock:
            self._model = None

    def default_model_name(self) -> str:
        """``-model_name``, or the last part of the worker class's name."""
        return self.config.model_name or self.worker_class.rsplit(".", 1)[-1] or "model"

    def switch_model(self, model_dir: str | None, model_name: str | None,
                     version: str | None) -> dict[str, Any]:
        """The server's ``switch_model`` command, with the server's ``-auth_token`` (from
        a thread; blocks until the switch is done or failed)."""

        async def switch() -> dict[str, Any]:
            client = await self.client()
            answer: dict[str, Any] = await client.switch_model(
                model_dir=model_dir, model_name=model_name, version=version,
                token=self.config.auth_token, timeout=SWITCH_TIMEOUT_MS)
            return answer

        try:
            answer: dict[str, Any] = self._run(switch(),
                                               SWITCH_TIMEOUT_MS / 1000.0 + CALL_SLACK_S)
        finally:
            self.forget_model()
        return answer

    def evaluate(self, inputs: list[Any], labels: list[Any], details: bool,
                 chunk_size: int | None, timeout: int | None, wait: float) -> dict[str, Any]:
        """The client's ``evaluate`` on the shared client (from a thread), waiting at
        most ``wait`` seconds."""

        async def evaluate() -> dict[str, Any]:
            client = await self.client()
            result: dict[str, Any] = await client.evaluate(
                inputs, labels, details=details, chunk_size=chunk_size, timeout=timeout)
            return result

        result: dict[str, Any] = self._run(evaluate(), wait)
        return result

    def _see(self, item: Any, result: Any) -> None:
        with self._seen_lock:
            self.seen["input"] = self.seen["input"] or describe_value(item)
            if result is not None:
                self.seen["output"] = self.seen["output"] or describe_value(result)
            path = self._seen_path()
            if path is not None:  # for the bridge's other processes (once per process)
                tmp = f"{path}.{os.getpid()}"
                with contextlib.suppress(OSError):
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

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class ModelInfo(NamedTuple):
    """The served model, as the server names it (it changes with a switch)."""

    name: str
    version: str | None
    dir: str | None
    epoch: int


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


class Coalescer:
    """Calls made in one turn of the bridge's event loop, sent as few requests.

    Under load many HTTP requests are parsed in one turn of the loop; each would cost
    the bridge, the ventilator and the sink a message of its own. Here they are merged,
    in arrival order, into requests of at most ``max_items`` items (one per distinct
    timeout), sent at the end of the turn, and each caller gets its own slice of the
    results. A lone call is sent in the same turn, so it waits for nothing.

    A merged request that fails fails each of its calls with the same error (the model
    fails a whole batch anyway), except an error about the input (``BadInput``,
    ``ProtocolError``, ``ClientUsageError``): then each call is sent again on its own, so
    that one caller's bad input never fails another's call.
    """

    def __init__(self, backend: Backend, max_items: int) -> None:
        self.backend = backend
        self.max_items = max_items
        self.pending: list[tuple[list[Any], int | None, asyncio.Future[list[Any]]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def submit(self, items: list[Any], timeout: int | None) -> asyncio.Future[list[Any]]:
        loop = self.backend.loop
        assert loop is not None
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append((items, timeout, future))
        return future

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        groups: dict[int | None, list[tuple[list[Any], asyncio.Future[list[Any]]]]] = {}
        for items, timeout, future in pending:
            group = groups.setdefault(timeout, [])
            if group and sum(len(i) for i, _ in group) + len(items) > self.max_items:
                self._start(group, timeout)
                group = groups[timeout] = []
            group.append((items, future))
        for timeout, group in groups.items():
            if group:
                self._start(group, timeout)

    def _start(self, group: list[tuple[list[Any], asyncio.Future[list[Any]]]],
               timeout: int | None) -> None:
        task = asyncio.ensure_future(self.send(group, timeout))
        self.tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self.tasks.discard)

    async def send(self, group: list[tuple[list[Any], asyncio.Future[list[Any]]]],
                   timeout: int | None) -> None:
        if len(group) == 1:
            items, future = group[0]
            await self._one(items, timeout, future)
            return
        merged = [item for items, _ in group for item in items]
        try:
            client = await self.backend.client()
            results = await client.encode_batch(merged, timeout=timeout)
        except (E.BadInput, E.ProtocolError, E.ClientUsageError):  # whose? each call
            # alone: only the bad one fails
            await asyncio.gather(*(self._one(items, timeout, future)
                                   for items, future in group))
            return
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for items, future in group:
            if not future.done():
                future.set_result(results[start:start + len(items)])
            start += len(items)

    async def _one(self, items: list[Any], timeout: int | None,
                   future: asyncio.Future[list[Any]]) -> None:
        try:
            client = await self.backend.client()
            results = await client.encode_batch(items, timeout=timeout)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(results)


def describe_value(value: Any) -> dict[str, Any]:
    """``{"dtype", "shape"}`` of an array, or the Python type of another value."""
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.str, "shape": list(value.shape)}
    return {"type": type(value).__name__}


def create_app(backend: Backend,
               blueprints: list[Callable[[Flask, Backend], None]] | None = None) -> Flask:
    """The Flask application of the routes the ASGI front does not answer itself.

    The front has already checked the token, bounded and read the body, and it adds
    ``X-Request-ID`` and the CORS headers to every answer; here every error is a JSON
    envelope too (404, 405, 500: never an HTML page)."""
    app = Flask("wkr_serving.http")
    app.request_class = BridgeRequest
    app.json = JSONProvider(app)
    app.extensions["wkr_backend"] = backend

    @app.before_request
    def _before() -> None:
        g.request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        response = envelope_error(status, _snake(HTTPStatus(status).phrase),
                                  f"{exc.name}: {request.method} {request.path}"
                                  if status in (404, 405) else exc.description or exc.name)
        if status == 405 and isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response[0].headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> Any:
        app.logger.exception("%s %s failed", request.method, request.path)
        return envelope_error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.post("/encode")
    def encode() -> Any:
        # Answered by the ASGI front in the bridge; here for the app used on its own.
        status, payload = encode_call(backend, request.get_data(cache=False), g.request_id)
        return jsonify(payload), status

    @app.get("/status/server")
    def status_server() -> Any:
        try:
            return jsonify(backend.server_status())
        except Exception as exc:
            return envelope_error(http_status(exc), error_code(exc), str(exc))

    @app.get("/status/client")
    def status_client() -> Any:
        return jsonify(backend.client_status())

    @app.get("/health/live")
    def live() -> Any:
        return jsonify({"live": True})

    @app.get("/health/ready")
    def ready() -> Any:
        ok, why = is_ready(backend)
        return jsonify({"ready": ok, "reason": why}), 200 if ok else 503

    @app.get("/metadata")
    def metadata() -> Any:
        try:
            meta = backend.metadata()
        except Exception as exc:
            return envelope_error(http_status(exc), error_code(exc), str(exc))
        return jsonify(merged_metadata(backend, meta))

    for register in blueprints or []:
        register(app, backend)
    return app


def merged_metadata(backend: Backend, meta: dict[str, Any]) -> dict[str, Any]:
    """``GET /metadata``: what the server knows of the model and itself, and the keys of
    the worker's ``get_metadata()`` beside them. On a clash the server's key wins; the
    worker's value is then under ``model_metadata`` (never lost)."""
    config = backend.config
    facts: dict[str, Any] = {
        "model_name": meta.get("model_name", config.model_name),
        "model_version": meta.get("model_version", config.model_version),
        "model_dir": meta.get("model_dir", config.model_dir),
        "epoch": meta.get("epoch", 0), "switch": meta.get("switch"),
        "worker_class": backend.worker_class, "protocol": config.protocol,
        "batch_size": config.batch_size, "num_worker": config.num_worker,
        **{k: v for k, v in backend.seen_values().items() if k in ("input", "output")},
        "versions": {"wkr_serving": __version__, "python": platform.python_version(),
                     "numpy": np.__version__},
    }
    worker = meta.get("metadata")
    if not isinstance(worker, dict):
        return facts
    clashes = {str(k): v for k, v in worker.items() if str(k) in facts}
    out = {**{str(k): v for k, v in worker.items() if str(k) not in facts}, **facts}
    if clashes:
        out["model_metadata"] = clashes
    return out


def _snake(phrase: str) -> str:
    return phrase.lower().replace(" ", "_").replace("-", "_")


class BridgeRequest(Request):
    """Flask's request, keeping uploaded files in memory: the body is in memory already
    (bounded by ``-http_max_body``), and the bridge writes no files."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None,
                         ) -> IO[bytes]:
        return io.BytesIO()


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON on :mod:`.jsonio`: strict, depth-bounded reading; NaN written as null."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return jsonio.loads(s)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return jsonio.dumps(obj).decode()


class Limits(NamedTuple):
    """What one request may ask for: items, and bytes once its items are decoded."""

    max_items: int
    max_bytes: int  # -max_msg_size; -1: no limit


class EncodeCall(NamedTuple):
    """What an ``/encode`` (or ``/jobs``) body asks for."""

    items: list[Any]
    single: bool
    timeout: int | None
    suppress_log_input: bool


def parse_encode_body(body: Any, protocol: str, limits: Limits | None = None) -> EncodeCall:
    """The call an ``/encode`` body (parsed JSON) asks for; ValueError says what is
    wrong, BadInput (from :func:`as_input`) names an input the protocol cannot take.

    The item count and the decoded size are checked before any item is built."""
    if not isinstance(body, dict) or ("data" in body) == ("batch" in body):
        raise ValueError('the body must be a JSON object with "data" (one input) or '
                         '"batch" (a list of inputs)')
    single = "data" in body
    items = [body["data"]] if single else body["batch"]
    if not isinstance(items, list) or not items:
        raise ValueError('"batch" must be a non-empty list')
    if limits is not None and len(items) > limits.max_items:
        raise ValueError(f"a request of {len(items)} items is over the server's "
                         f"-max_request_items {limits.max_items}: send smaller requests")
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or timeout <= 0):
        raise ValueError('"timeout" must be a positive int (ms)')
    suppress = body.get("suppress_log_input", False)
    if not isinstance(suppress, bool):
        raise ValueError('"suppress_log_input" must be a boolean')
    dtype = body.get("dtype")
    if protocol == "numpy" or dtype is not None:
        dtype = dtype_of(dtype)
        if limits is not None and limits.max_bytes > 0:
            check_decoded_size(items, dtype, limits.max_bytes)
    return EncodeCall([as_input(x, protocol, dtype) for x in items], single, timeout, suppress)


def dtype_of(value: Any) -> np.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 32:
        raise ValueError('"dtype" must be a numpy dtype name such as "float32"')
    try:
        return np.dtype(value)
    except TypeError:
        raise ValueError(f'"dtype" {value!r} is not a numpy dtype') from None


def check_decoded_size(items: list[Any], dtype: np.dtype | None, limit: int) -> None:
    """Refuse (ValueError) items whose arrays would take more than ``limit`` bytes, each
    or together, before numpy allocates them: elements x item size, where a string
    dtype without a width takes the longest string's."""
    total = 0
    for index, item in enumerate(items):
        leaves, longest = _leaves(item)
        if dtype is None:
            size = 4 * longest if longest else 8  # numpy's U<longest>, else float64/int64
        elif dtype.itemsize == 0 and dtype.kind in "SU":
            size = (4 if dtype.kind == "U" else 1) * max(longest, 1)
        else:
            size = max(dtype.itemsize, 1)
        nbytes = leaves * size
        total += nbytes
        if nbytes > limit or total > limit:
            what = f"item {index}" if nbytes > limit else "the request"
            raise ValueError(f"{what} would decode to more than {limit} bytes (-max_msg_size;"
                             f" {leaves} element(s) of {size} bytes each so far)")


def _leaves(value: Any) -> tuple[int, int]:
    """Elements in a nested list, and the length of its longest string."""
    if not isinstance(value, list):
        return 1, len(value) if isinstance(value, str) else 0
    leaves = longest = 0
    stack = [value]
    while stack:
        node = stack.pop()
        for child in node:
            if isinstance(child, list):
                stack.append(child)
            else:
                leaves += 1
                if isinstance(child, str) and len(child) > longest:
                    longest = len(child)
    return leaves, longest


def run_encode(backend: Backend, call: EncodeCall, request_id: str) -> Any:
    """Make the call on the server (from a thread); return its result(s). Raises its
    error."""
    results = backend.encode(call.items, call.timeout, **log_options(backend, call, request_id))
    return results[0] if call.single else results


def log_options(backend: Backend, call: EncodeCall, request_id: str) -> dict[str, Any]:
    """What the server's prediction log gets with the call (the request id, suppress)."""
    if not backend.config.log_predictions:
        return {}
    return {"suppress_log_input": call.suppress_log_input,
            "request_id": request_id[:MAX_OPTION_CHARS]}


def failure(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and envelope reporting ``exc`` (an error of the call)."""
    return envelope(http_status(exc), error_code(exc), getattr(exc, "message", str(exc)))


def read_call(backend: Backend, body: bytes) -> EncodeCall | tuple[int, dict[str, Any]]:
    """The call in an ``/encode`` or ``/jobs`` body, or the status and envelope of why
    it is not one."""
    try:
        return parse_encode_body(jsonio.loads(body), backend.protocol, backend.limits)
    except ValueError as exc:  # not JSON, or not a valid call
        return envelope(400, "bad_input", str(exc))
    except Exception as exc:  # an input the protocol cannot take (BadInput)
        return failure(exc)


def encode_call(backend: Backend, body: bytes, request_id: str) -> tuple[int, dict[str, Any]]:
    """``POST /encode`` from a thread: the HTTP status and envelope."""
    call = read_call(backend, body)
    if not isinstance(call, EncodeCall):
        return call
    try:
        data = run_encode(backend, call, request_id)
    except Exception as exc:  # every failure becomes an HTTP status and envelope
        return failure(exc)
    return 200, {"error_code": 0, "error_message": "", "data": data}


def envelope(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    """The error envelope of every route but ``/v2``'s."""
    return status, {"error_code": status, "error_type": code, "error_message": message,
                    "data": None}


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
    status, payload = envelope(status, code, message)
    return jsonify(payload), status


def all_blueprints() -> list[Callable[[Flask, Backend], None]]:
    """The route groups registered besides the core routes above: each is a function
    ``register(app, backend)`` in its own module; adding one here is all it takes."""
    from . import dashboard, jobs, lifecycle, metrics, v2

    return [dashboard.register, v2.register, metrics.register, jobs.register,
            lifecycle.register]
