"""The ASGI front: every HTTP request of the bridge enters here.

In this order, for every request, before any route runs:

1. a CORS preflight is answered here, without the token (see :mod:`.auth`);
2. the bearer token is checked (one function, :func:`.auth.bearer_ok`);
3. a ``Content-Length`` over ``-http_max_body`` gets 413 at once, without reading the
   body; a body sent in chunks is read up to the limit and gets 413 as soon as it goes
   over (the connection is then closed, the rest is never read);
4. ``POST /encode``, the hot route, is answered here on the event loop: strict JSON
   (:mod:`.jsonio`), the item and size limits checked before any item is built, one
   awaited call on the process's shared client;
5. everything else goes to the Flask application (:mod:`.app`) in a thread pool, with
   the body already read.

Every answer gets ``X-Request-ID`` (the caller's, or a new one) and the CORS headers of
the policy; every error is a JSON envelope. Read timeouts, keep-alive and the connection
cap are the HTTP server's (:mod:`.bridge`).
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from a2wsgi import WSGIMiddleware

from ..config import ServerConfig
from . import jsonio
from .app import Backend, EncodeCall, envelope, failure, log_options, read_call
from .auth import CORSPolicy, bearer_ok, is_open

__all__ = ["Front"]

Message = dict[str, Any]

#: Longest ``X-Request-ID`` kept from a caller (a longer one is replaced by a new id;
#: the prediction log keeps its first ``MAX_OPTION_CHARS``).
MAX_REQUEST_ID = 1024
#: Threads running the Flask routes, at most (made on demand).
MAX_ROUTE_THREADS = 128


class Front:
    """The bridge's ASGI application (see the module docstring)."""

    def __init__(self, backend: Backend, flask_app: Any, config: ServerConfig) -> None:
        self.backend = backend
        self.flask = flask_app
        threads = max(8, min(config.http_max_connect, MAX_ROUTE_THREADS))
        self.wsgi: Any = WSGIMiddleware(flask_app.wsgi_app, workers=threads)
        self.token = config.http_token.encode() if config.http_token else None
        self.cors = CORSPolicy(config.cors_allowed())
        self.max_body = config.http_max_body
        # Request ids made here: unique per process (random prefix) and cheap (a count).
        self.id_prefix = secrets.token_hex(8).encode() + b"-"
        self.ids = itertools.count(1)

    @property
    def metrics(self) -> Any:
        return self.flask.extensions.get("wkr_metrics")

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        length = auth = origin = request_id = None
        preflight = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"authorization":
                auth = value
            elif name == b"origin":
                origin = value
            elif name == b"x-request-id":
                request_id = value
            elif name == b"access-control-request-method":
                preflight = True
        if request_id is None or not 0 < len(request_id) <= MAX_REQUEST_ID \
                or not request_id.isascii():
            request_id = b"%s%x" % (self.id_prefix, next(self.ids))
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"x-request-id"]
            scope["headers"].append((b"x-request-id", request_id))
        extra = [(b"x-request-id", request_id), *self.cors.headers(origin)]
        if method == "OPTIONS" and preflight:
            headers = self.cors.preflight(origin) or [(b"x-request-id", request_id)]
            await send({"type": "http.response.start", "status": 204,
                        "headers": [*headers, (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if self.token is not None and not is_open(path) and not bearer_ok(auth, self.token):
            await self.error(send, path, method, started, extra, *envelope(
                401, "unauthorized", "this route needs Authorization: Bearer <-http_token>"))
            return
        if length is not None:
            declared = int(length) if length.isdigit() else -1
            if declared < 0:
                await self.error(send, path, method, started, extra, *envelope(
                    400, "bad_request", "Content-Length is not a number"), close=True)
                return
            if declared > self.max_body:
                await self.error(send, path, method, started, extra, *self.too_large(),
                                 close=True)
                return
        body = await self.read_body(receive)
        if body is None:  # the client left
            return
        if isinstance(body, int):
            await self.error(send, path, method, started, extra, *self.too_large(),
                             close=True)
            return
        if path == "/encode" and method == "POST":
            await self.encode(body, request_id, send, started, extra)
        else:
            await self.route(scope, body, send, extra)

    def too_large(self) -> tuple[int, dict[str, Any]]:
        return envelope(413, "body_too_large", f"the body is over -http_max_body "
                                               f"({self.max_body} bytes)")

    async def read_body(self, receive: Any) -> bytes | int | None:
        """The whole body; its size so far once it is over the limit; None if the
        client left. The server closes a connection whose body stalls (read timeout)."""
        first: Message = await receive()
        if first["type"] != "http.request":
            return None
        if not first.get("more_body"):
            return bytes(first.get("body", b""))
        chunks = [first.get("body", b"")]
        size = len(chunks[0])
        while True:
            if size > self.max_body:
                return size
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body"):
                return size if size > self.max_body else b"".join(chunks)

    async def encode(self, body: bytes, request_id: bytes, send: Any, started: float,
                     extra: list[tuple[bytes, bytes]]) -> None:
        """``POST /encode`` on the event loop."""
        backend = self.backend
        call = read_call(backend, body)
        if isinstance(call, EncodeCall):
            try:
                results = await backend.aencode(
                    call.items, call.timeout,
                    **log_options(backend, call, request_id.decode()))
                status, payload = 200, {"error_code": 0, "error_message": "",
                                        "data": results[0] if call.single else results}
            except Exception as exc:  # every failure becomes an HTTP status and envelope
                status, payload = failure(exc)
        else:
            status, payload = call
        await answer(send, status, jsonio.dumps(payload), extra)
        metrics = self.metrics
        if metrics is not None:
            metrics.count("/encode", "POST", status, time.perf_counter() - started,
                          payload.get("error_type"))

    async def route(self, scope: Message, body: bytes, send: Any,
                    extra: list[tuple[bytes, bytes]]) -> None:
        """Another route: the Flask application, in a thread, with the body read."""
        scope["headers"] = [(n, v) for n, v in scope["headers"]
                            if n not in (b"content-length", b"transfer-encoding")]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
        given = False

        async def replay() -> Message:
            nonlocal given
            if given:  # the body was given; nothing else will come
                return {"type": "http.disconnect"}
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {n for n, _ in message["headers"]}
                message["headers"] = [*message["headers"],
                                      *((n, v) for n, v in extra if n not in names)]
            await send(message)

        await self.wsgi(scope, replay, send_with_headers)

    async def error(self, send: Any, path: str, method: str, started: float,
                    extra: list[tuple[bytes, bytes]], status: int, payload: dict[str, Any],
                    close: bool = False) -> None:
        """An error answered by the front itself (v2 paths get the v2 ``error`` key)."""
        if path == "/v2" or path.startswith("/v2/"):
            payload = {"error": payload["error_message"], **payload}
        await answer(send, status, jsonio.dumps(payload), extra, close=close)
        metrics = self.metrics
        if metrics is not None:
            metrics.count(path if path == "/encode" else "<front>", method, status,
                          time.perf_counter() - started, payload.get("error_type"))


async def answer(send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]],
                 content_type: bytes = b"application/json", close: bool = False) -> None:
    """Send a whole answer."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
