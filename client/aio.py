"""The asyncio client, for callers inside async web apps and pipelines.

    async with AsyncWKRClient(port=5555, port_out=5556) as client:
        result = await client.encode(x)

The event loop reads every reply as it arrives (a readiness callback on the socket's
descriptor) and resolves the matching request's future, so any number of coroutines may
await results concurrently on one client.

A dropped connection fails the calls outstanding at that moment, and only those, with
:class:`~wkr_serving.client.errors.ConnectionLost`; after ``port_out`` dropped, the next
call first says HELLO to the sink again. So one client (the HTTP bridge's) goes on
serving once the server is back on the same ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .base import (
    DEFAULT_PORT,
    DEFAULT_PORT_OUT,
    DEFAULT_TIMEOUT_MS,
    SWITCH_TIMEOUT_MS,
    ClientOptions,
    DropWatcher,
    Reply,
    check_frame_sizes,
    check_hello,
    check_item_count,
    command_frame,
    connect_timeout_error,
    handshake_dropped_error,
    handshake_ping_frame,
    hello_frame,
    parse_replies,
    request_frames,
    request_options,
    take_limits,
)
from .errors import ClientUsageError, ConnectionLost, ProtocolError, WKRTimeoutError

__all__ = ["AsyncWKRClient"]

logger = logging.getLogger("wkr_serving.client")

#: A waiting call: its future, and how many times the request port and the reply port
#: had dropped when it started (None: it does not use that connection).
_Waiting = tuple[asyncio.Future[Reply], int | None, int]


class AsyncWKRClient:
    """Asyncio counterpart of :class:`~wkr_serving.client.WKRClient` (same options)."""

    def __init__(self, ip: str = "localhost", port: int = DEFAULT_PORT,
                 port_out: int = DEFAULT_PORT_OUT, protocol: str = "obj",
                 identity: bytes | str | None = None,
                 timeout: int | None = DEFAULT_TIMEOUT_MS, check_version: bool = True,
                 connect_timeout: int | None = None, server_public_key: Any = None,
                 client_key: Any = None, allow_pickle: bool = False) -> None:
        self.options = ClientOptions(ip, port, port_out, protocol, identity, timeout,
                                     connect_timeout, server_public_key, client_key,
                                     allow_pickle)
        self.check_version = check_version
        self._ids = itertools.count(1)
        self._futures: dict[int, _Waiting] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_waiters: list[asyncio.Future[None]] = []
        self._sender: Any = None
        self._receiver: Any = None
        self._watch: DropWatcher | None = None
        # Drops so far of the request port and of the reply port, counted by the watcher
        # thread when they happen: a drop fails only the calls started before it.
        self._port_drops = 0
        self._out_drops = 0
        self._out_known = 0  # port_out drops before the last HELLO the sink answered
        self._closed = False
        self.server_info: dict[str, Any] = {}

    async def connect(self) -> AsyncWKRClient:
        """Open the sockets and handshake with the server (bounded by connect_timeout)."""
        if self._loop is not None:
            return self
        if self._closed:
            raise ClientUsageError("this AsyncWKRClient is closed")
        # Plain sockets driven by the loop's own readiness callbacks on their file
        # descriptors: no task, poller or future per read (zmq.asyncio made each call
        # several times slower than the round trip to the server).
        context: zmq.Context[Any] = zmq.Context.instance()
        self._sender = self.options.configure(context.socket(zmq.DEALER))
        self._receiver = self.options.configure(context.socket(zmq.DEALER))
        self._loop = asyncio.get_running_loop()
        self._watch = DropWatcher((self._sender, self._receiver), self._on_drop)
        self._sender.connect(self.options.address_in)
        self._receiver.connect(self.options.address_out)
        self._loop.add_reader(self._receiver.FD, self._read_replies)
        self._loop.add_reader(self._sender.FD, self._on_sender_events)
        # A descriptor signals only changes after EVENTS was read once: read it now.
        self._read_replies()
        self._on_sender_events()
        limit = self.options.connect_timeout / 1000.0
        step = "handshake with port_out"
        try:
            req_id = next(self._ids)
            drops = self._out_drops
            info = await self._exchange(req_id, self._receiver, [hello_frame(req_id)], limit,
                                        step)
            self.server_info = check_hello(info.value, self.options, self.check_version)
            self._out_known = max(self._out_known, drops)
            req_id = next(self._ids)
            step = "ping through port"
            pong = await self._exchange(
                req_id, self._sender,
                [handshake_ping_frame(req_id, self.options.connect_timeout)], limit, step)
            take_limits(self.server_info, pong.value)
        except ConnectionLost:
            await self.close()
            raise handshake_dropped_error(self.options, step) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def encode(self, data: Any, timeout: int | None = None,
                     suppress_log_input: bool = False, request_id: str | None = None) -> Any:
        """Compute one input; return its result or raise the server's typed error.
        ``suppress_log_input`` and ``request_id``: see :meth:`WKRClient.encode`."""
        reply = await self._request([data], timeout,
                                    request_options(suppress_log_input, request_id))
        return reply.value[0]

    async def encode_batch(self, items: Sequence[Any], timeout: int | None = None,
                           suppress_log_input: bool = False, request_id: str | None = None,
                           ) -> list[Any]:
        """Compute several inputs as one request; return their results in order."""
        if not items:
            raise ClientUsageError("encode_batch takes a non-empty sequence of inputs")
        check_item_count(len(items), self.server_info)  # before copying the sequence
        return (await self._request(list(items), timeout,
                                    request_options(suppress_log_input, request_id))).value

    async def server_status(self) -> dict[str, Any]:
        return await self._command("status")

    async def terminate(self, token: str | None = None) -> dict[str, Any]:
        """Ask the server to stop (see :meth:`WKRClient.terminate`)."""
        return await self._command("terminate", {"token": token})

    async def metadata(self) -> dict[str, Any]:
        """The served model (see :meth:`WKRClient.metadata`)."""
        return await self._command("metadata")

    async def switch_model(self, model_dir: str | None = None, model_name: str | None = None,
                           version: str | None = None, token: str | None = None,
                           timeout: int | None = SWITCH_TIMEOUT_MS) -> dict[str, Any]:
        """Serve another model with no request lost (see :meth:`WKRClient.switch_model`)."""
        return await self._command("switch_model", {
            "model_dir": model_dir, "model_name": model_name, "version": version,
            "token": token}, timeout=timeout)

    async def evaluate(self, inputs: Sequence[Any], labels: Sequence[Any],
                       details: bool = False, chunk_size: int | None = None,
                       progress: Callable[[int], Any] | None = None,
                       timeout: int | None = None) -> dict[str, Any]:
        """Evaluate the served model (see :meth:`WKRClient.evaluate`)."""
        from .evaluation import arun_evaluation

        return await arun_evaluation(self, inputs, labels, details=details,
                                     chunk_size=chunk_size, progress=progress,
                                     timeout=timeout)

    async def _command(self, name: str, args: Any = None, timeout: int | None = None) -> Any:
        await self.connect()
        budget = self.options.timeout if timeout is None else timeout
        if self._out_drops != self._out_known:  # see _request
            budget = await self._rejoin(budget)
        req_id = next(self._ids)
        reply = await self._exchange(
            req_id, self._sender, [command_frame(req_id, budget, name, args)],
            None if budget is None else budget / 1000.0, f"command {name!r}")
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def close(self) -> None:
        self._closed = True
        loop, self._loop = self._loop, None
        sockets = [self._sender, self._receiver]
        if loop is not None:
            for socket in sockets:
                if socket is not None and not socket.closed:
                    loop.remove_reader(socket.FD)
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop(sockets)
        for socket in sockets:
            if socket is not None:
                socket.close(0)
        self._fail_waiting_senders(ClientUsageError("client closed"))
        for future, *_ in self._futures.values():
            if not future.done():
                future.set_exception(ClientUsageError("client closed"))
        self._futures.clear()

    async def __aenter__(self) -> AsyncWKRClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------

    async def _request(self, items: list[Any], timeout: int | None,
                       options: dict[str, Any] | None = None) -> Reply:
        await self.connect()
        budget = self.options.timeout if timeout is None else timeout
        if self._out_drops != self._out_known:  # port_out dropped since the last HELLO
            budget = await self._rejoin(budget)
        req_id = next(self._ids)
        frames = request_frames(req_id, budget, items, self.options.protocol,
                                self.options.allow_pickle, options, self.server_info)
        check_frame_sizes(frames, self.server_info)
        reply = await self._exchange(req_id, self._sender, frames,
                                     None if budget is None else budget / 1000.0, "result")
        if reply.error is not None:
            raise reply.error
        return reply

    async def _rejoin(self, budget: int | None) -> int | None:
        """Say HELLO to the sink again, after port_out dropped, before the next request:
        the sink routes replies by this client's identity and drops those it cannot
        deliver, as long as this client has not reconnected. Bounded by the call's
        ``budget`` (ms), which it uses part of; returns what is left of it."""
        loop = self._loop
        if loop is None:
            raise ClientUsageError("this AsyncWKRClient is closed")
        started = loop.time()
        drops = self._out_drops
        req_id = next(self._ids)
        reply = await self._exchange(req_id, self._receiver, [hello_frame(req_id)],
                                     None if budget is None else budget / 1000.0,
                                     "answer to the HELLO on port_out")
        if reply.error is not None:
            raise reply.error
        # The limits learnt at connect time stay.
        self.server_info.update(check_hello(reply.value, self.options, self.check_version))
        self._out_known = max(self._out_known, drops)
        if budget is None:
            return None
        return max(1, budget - int((loop.time() - started) * 1000))

    async def _exchange(self, req_id: int, socket: Any, frames: list[Any],
                        limit: float | None, what: str) -> Reply:
        loop = self._loop
        if loop is None:
            raise ClientUsageError("this AsyncWKRClient is closed")
        future: asyncio.Future[Reply] = loop.create_future()
        # A HELLO (on the reply socket) does not depend on the request port.
        self._futures[req_id] = (future, None if socket is self._receiver
                                 else self._port_drops, self._out_drops)
        timer = None if limit is None else loop.call_later(limit, self._expire, future)
        try:
            await self._send(socket, frames)
            if socket is self._receiver:  # a send may hide a read-readiness edge
                self._read_replies()
            return await future
        except asyncio.TimeoutError:
            if what.startswith(("handshake", "ping")):
                raise connect_timeout_error(self.options, what) from None
            limit_ms = "no limit" if limit is None else f"{limit * 1000:.0f} ms"
            raise WKRTimeoutError(f"no {what} for request {req_id} within {limit_ms}") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._futures.pop(req_id, None)

    @staticmethod
    def _expire(future: asyncio.Future[Reply]) -> None:
        if not future.done():
            future.set_exception(asyncio.TimeoutError())

    async def _send(self, socket: Any, frames: list[Any]) -> None:
        """Send a request without blocking the loop; when the socket's queue is full
        (the server is not reading), wait until it can take the message."""
        while True:
            try:
                socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                assert self._loop is not None
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._send_waiters.append(waiter)
                self._on_sender_events()  # the socket may already take it
                await waiter

    def _on_sender_events(self) -> None:
        """The sender's descriptor fired (or a send waits): wake the waiting senders if
        it can take a message."""
        socket = self._sender
        if socket is None or socket.closed:
            return
        # Reading EVENTS also resets the descriptor's signal: always read it.
        if socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT and self._send_waiters:
            waiters, self._send_waiters = self._send_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _fail_waiting_senders(self, error: BaseException) -> None:
        waiters, self._send_waiters = self._send_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def _read_replies(self) -> None:
        """Complete calls with the replies that arrived (the descriptor is
        edge-triggered: read until the socket says nothing is left)."""
        socket = self._receiver
        if socket is None or socket.closed:
            return
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._deliver(frames)

    def _on_drop(self, which: str) -> None:
        """(The watcher thread.) Connection ``which`` dropped: count it now, so that the
        calls started from now on are not failed by it, and have the loop fail those
        started before (it may be idle, between two ``run_until_complete``)."""
        if which == "port":
            self._port_drops += 1
            count = self._port_drops
        else:
            self._out_drops += 1
            count = self._out_drops
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._fail_dropped, which, count)

    def _deliver(self, frames: Any) -> None:
        try:
            replies = parse_replies(frames, self.options.allow_pickle)
        except ProtocolError as exc:
            logger.warning("dropped a malformed reply: %s", exc)
            return
        for reply in replies:
            waiting = self._futures.get(reply.req_id)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(reply)

    def _fail_dropped(self, which: str, count: int) -> None:
        """Fail with :class:`ConnectionLost` the calls waiting on connection ``which``
        that started before its drop number ``count`` (after taking the replies that
        arrived before the drop)."""
        self._read_replies()
        address = self.options.address_in if which == "port" else self.options.address_out
        for req_id, (future, port_seen, out_seen) in list(self._futures.items()):
            seen = port_seen if which == "port" else out_seen
            if seen is not None and seen < count and not future.done():
                future.set_exception(ConnectionLost(
                    f"the connection to {address} dropped while request {req_id} was "
                    "pending; its result is lost", "", req_id))
