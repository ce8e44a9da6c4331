"""The asyncio client, for callers inside async web apps and pipelines.

    async with AsyncWKRClient(port=5555, port_out=5556) as client:
        result = await client.encode(x)

One background task reads every reply and resolves the matching request's future, so
any number of coroutines may await results concurrently on one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from .base import (
    ClientOptions,
    Reply,
    check_hello,
    command_frame,
    connect_timeout_error,
    hello_frame,
    parse_replies,
    request_frames,
)
from .errors import ClientUsageError, ProtocolError, WKRTimeoutError

__all__ = ["AsyncWKRClient"]

logger = logging.getLogger("wkr_serving.client")


class AsyncWKRClient:
    """Asyncio counterpart of :class:`~wkr_serving.client.WKRClient` (same options)."""

    def __init__(self, ip: str = "localhost", port: int = 5555, port_out: int = 5556,
                 protocol: str = "obj", identity: bytes | str | None = None,
                 timeout: int | None = 60_000, check_version: bool = True,
                 connect_timeout: int | None = None) -> None:
        self.options = ClientOptions(ip, port, port_out, protocol, identity, timeout,
                                     connect_timeout)
        self.check_version = check_version
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._sender: Any = None
        self._receiver: Any = None
        self._closed = False
        self.server_info: dict[str, Any] = {}

    async def connect(self) -> AsyncWKRClient:
        """Open the sockets and handshake with the server (bounded by connect_timeout)."""
        if self._reader is not None:
            return self
        if self._closed:
            raise ClientUsageError("this AsyncWKRClient is closed")
        context = zmq.asyncio.Context.instance()
        self._sender = self.options.configure(context.socket(zmq.DEALER))
        self._receiver = self.options.configure(context.socket(zmq.DEALER))
        self._sender.connect(self.options.address_in)
        self._receiver.connect(self.options.address_out)
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        limit = self.options.connect_timeout / 1000.0
        try:
            req_id = next(self._ids)
            info = await self._exchange(req_id, self._receiver, [hello_frame(req_id)], limit,
                                        "handshake with port_out")
            self.server_info = check_hello(info.value, self.options, self.check_version)
            req_id = next(self._ids)
            await self._exchange(req_id, self._sender,
                                 [command_frame(req_id, self.options.connect_timeout, "ping")],
                                 limit, "ping through port")
        except BaseException:
            await self.close()
            raise
        return self

    async def encode(self, data: Any, timeout: int | None = None) -> Any:
        """Compute one input; return its result or raise the server's typed error."""
        reply = await self._request([data], timeout)
        return reply.value[0]

    async def encode_batch(self, items: Sequence[Any], timeout: int | None = None) -> list[Any]:
        """Compute several inputs as one request; return their results in order."""
        if not items:
            raise ClientUsageError("encode_batch takes a non-empty sequence of inputs")
        return (await self._request(list(items), timeout)).value

    async def server_status(self) -> dict[str, Any]:
        await self.connect()
        req_id = next(self._ids)
        budget = self.options.timeout
        reply = await self._exchange(
            req_id, self._sender, [command_frame(req_id, budget, "status")],
            None if budget is None else budget / 1000.0, "command 'status'")
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        for socket in (self._sender, self._receiver):
            if socket is not None:
                socket.close(0)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(ClientUsageError("client closed"))
        self._futures.clear()

    async def __aenter__(self) -> AsyncWKRClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------

    async def _request(self, items: list[Any], timeout: int | None) -> Reply:
        await self.connect()
        budget = self.options.timeout if timeout is None else timeout
        req_id = next(self._ids)
        frames = request_frames(req_id, budget, items, self.options.protocol)
        reply = await self._exchange(req_id, self._sender, frames,
                                     None if budget is None else budget / 1000.0, "result")
        if reply.error is not None:
            raise reply.error
        return reply

    async def _exchange(self, req_id: int, socket: Any, frames: list[Any],
                        limit: float | None, what: str) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._futures[req_id] = future
        try:
            await asyncio.wait_for(self._send_then_wait(socket, frames, future), limit)
        except asyncio.TimeoutError:
            if what.startswith(("handshake", "ping")):
                raise connect_timeout_error(self.options, what) from None
            limit_ms = "no limit" if limit is None else f"{limit * 1000:.0f} ms"
            raise WKRTimeoutError(f"no {what} for request {req_id} within {limit_ms}") from None
        finally:
            self._futures.pop(req_id, None)
        return future.result()

    @staticmethod
    async def _send_then_wait(socket: Any, frames: list[Any],
                              future: asyncio.Future[Reply]) -> None:
        await socket.send_multipart(frames, copy=False)
        await asyncio.shield(future)

    async def _read_replies(self) -> None:
        assert self._receiver is not None
        while True:
            frames = await self._receiver.recv_multipart(copy=False)
            try:
                replies = parse_replies(frames)
            except ProtocolError as exc:
                logger.warning("dropped a malformed reply: %s", exc)
                continue
            for reply in replies:
                future = self._futures.get(reply.req_id)
                if future is not None and not future.done():
                    future.set_result(reply)
