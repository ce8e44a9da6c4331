"""The blocking Python client.

One client holds two DEALER sockets with the same identity: requests go to the
ventilator (``port``), replies come from the sink (``port_out``). Requests are pipelined:
any number may be outstanding and replies are matched by integer request id.

A client may be shared between threads. Sends are combined: a thread queues its
request and sends what is queued unless another thread is sending, which then sends it
too, so requests of many threads leave in one burst (one wake-up of libzmq's I/O
thread, one write to the connection). Replies are read by one waiting thread at a time
for everybody (leader/followers): it wakes exactly the threads whose replies it read,
each through a lock of its own (no thundering herd), and hands the reading over to one
waiting thread when its own reply is in. A thread that waits alone reads its own reply:
no handoff between threads.

A dropped connection (the server stopped or crashed) fails the calls outstanding at that
moment, and only those; ZeroMQ reconnects by itself, and after ``port_out`` dropped the
next call first says HELLO to the sink again, so the same client goes on serving once
the server is back on the same ports.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import zmq

from . import protocol as P
from .base import (
    DEFAULT_PORT,
    DEFAULT_PORT_OUT,
    DEFAULT_TIMEOUT_MS,
    SWITCH_TIMEOUT_MS,
    ClientOptions,
    DropWatcher,
    Reply,
    Response,
    check_frame_sizes,
    check_hello,
    check_item_count,
    command_frame,
    connect_timeout_error,
    handshake_dropped_error,
    handshake_ping_frame,
    hello_frame,
    parse_entries,
    payload_sizes,
    reply_entries,
    request_frames,
    request_options,
    take_limits,
)
from .errors import (
    ClientUsageError,
    ConnectionLost,
    ProtocolError,
    ServerError,
    WKRTimeoutError,
)
from .version import __version__

__all__ = ["ConcurrentWKRClient", "WKRClient"]

#: Most replies one reading thread takes off the socket before handing over.
READ_BATCH = 1024
#: Longest single poll (ms) of the reading thread, so close() never waits long for it,
#: and the longest a call waiting on a dropped connection takes to fail.
READ_SLICE_MS = 200

#: Reply frames up to this size are copied off the socket (cheaper than a zero-copy
#: frame object); larger ones are taken without a copy.
COPY_LIMIT = 65536

_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)

_ONE = "one"  # encode(): the reply is one item
_MANY = "many"  # encode_batch(): the reply is a list of items
_VALUE = "value"  # commands: the reply is a value
_HELLO = "hello"  # a HELLO to the sink: a value, and no concern of the request port


class WKRClient:
    """Client of a WKR server.

    :param ip: server address.
    :param port: the server's ``-port`` (requests); ``port_out``: its ``-port_out``.
    :param protocol: ``"obj"`` or ``"numpy"`` (also named ``"npy"``), as the server was
        started with.
    :param identity: this client's ZeroMQ identity (random by default); two clients must
        not share one.
    :param timeout: milliseconds a call waits for its reply (``-1``/None: no limit).
    :param connect_timeout: milliseconds for the connection handshake (default:
        ``min(timeout, 10000)``).
    :param check_version: refuse a server of another version.
    :param ignore_all_checks: skip the handshake at construction (use when the server
        may not be up yet); it then happens before the first request. Such a client
        does not learn the server's ``-max_request_items`` and sends a request over it,
        which the server then refuses (``BadInput``) from its header.
    :param server_public_key: the server's CurveZMQ public key (its ``.key`` file or Z85
        text), for a server started with ``-curve_secret_key``.
    :param client_key: this client's ``.key_secret`` file, for a server that only admits
        listed clients (``-curve_client_keys``); by default a throw-away key pair is used.
    :param allow_pickle: send values msgpack cannot encode as pickles, and accept
        pickled results. Unsafe unless you trust the server; the server must also run
        with ``-allow_pickle``.
    :param busy_poll_us: before blocking for a reply, spin up to this many microseconds
        checking for it (0, the default, never spins). On virtual machines and
        power-saving hosts a blocked process pays a CPU wake-up per reply; spinning
        trades this thread's CPU for lower latency. Use it only for latency-critical
        callers with a core to spare, never for many clients on a small machine.
    """

    def __init__(self, ip: str = "localhost", port: int = DEFAULT_PORT,
                 port_out: int = DEFAULT_PORT_OUT, protocol: str = "obj",
                 identity: bytes | str | None = None,
                 timeout: int | None = DEFAULT_TIMEOUT_MS, check_version: bool = True,
                 ignore_all_checks: bool = False, show_server_config: bool = False,
                 connect_timeout: int | None = None, busy_poll_us: int = 0,
                 server_public_key: Any = None, client_key: Any = None,
                 allow_pickle: bool = False, **_seed_options: Any) -> None:
        self.options = ClientOptions(ip, port, port_out, protocol, identity, timeout,
                                     connect_timeout, server_public_key, client_key,
                                     allow_pickle)
        self.check_version = check_version
        self._learn_limits = not ignore_all_checks
        if busy_poll_us < 0:
            raise ClientUsageError("busy_poll_us must be >= 0")
        self.busy_poll_us = busy_poll_us
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # close() waits on it for the reader
        # Threads waiting for a reply while another reads: request id -> the waiting
        # thread's own lock (held; released to wake it). See _park.
        self._parked: dict[int, threading.Lock] = {}
        self._local = threading.local()  # each thread's waiter lock
        # Requests waiting to be sent (req_id, frames), and the lock of the sending thread.
        self._outbox: deque[tuple[int, list[Any]]] = deque()
        self._send_lock = threading.Lock()
        self._send_failed: dict[int, Exception] = {}  # sent by another thread, and failed
        self._expected: dict[int, str] = {}  # sent, no reply yet: id -> reply shape
        self._replies: dict[int, Reply] = {}  # arrived, not yet taken
        self._unfetched: deque[int] = deque()  # non-blocking requests, in send order
        self._errors: dict[int, ServerError | ProtocolError] = {}  # failed, fetched: for fetch_all
        # Outstanding when a connection dropped (id -> its name): the reading thread fails
        # them, after taking the replies that came before the drop.
        self._doomed: dict[int, str] = {}
        self._out_drops = 0  # port_out drops so far
        self._out_known = 0  # port_out drops before the last HELLO the sink answered
        self._hellos: list[bytes] = []  # HELLOs for the reading thread to send
        self._reading = False
        self._rcvtimeo = -1
        self._closed = False
        self._connected = False
        self._server_info: dict[str, Any] = {}
        self.num_requests = 0
        context: zmq.Context = zmq.Context.instance()
        self.sender = self.options.configure(context.socket(zmq.DEALER))
        self.receiver = self.options.configure(context.socket(zmq.DEALER))
        # A dropped connection fails what waits on it at once (ConnectionLost) instead of
        # at its timeout: the watcher reports a drop when it happens.
        self._watch = DropWatcher((self.sender, self.receiver), self._on_drop)
        self.sender.connect(self.options.address_in)
        self.receiver.connect(self.options.address_out)
        if not ignore_all_checks:
            try:
                self._connect()
            except BaseException:
                self.close()
                raise
            if show_server_config:
                for key, value in self.server_status.items():
                    print(f"{key:>30} = {value}")

    # -- properties (seed API) ----------------------------------------------------------

    @property
    def identity(self) -> bytes:
        return self.options.identity

    @property
    def protocol(self) -> str:
        return self.options.protocol

    @property
    def timeout(self) -> int | None:
        return self.options.timeout

    @property
    def status(self) -> dict[str, Any]:
        """This client's own state."""
        with self._lock:
            pending = len(self._expected)
        return {"identity": self.identity, "num_request": self.num_requests,
                "num_pending_request": pending, "server_ip": self.options.ip,
                "port": self.options.port, "port_out": self.options.port_out,
                "protocol": self.protocol, "client_version": __version__,
                "timeout": self.timeout, "server_version": self._server_info.get(
                    "server_version")}

    @property
    def server_status(self) -> dict[str, Any]:
        """The server's configuration, versions, workers, queue and statistics."""
        return self._command("status")

    def terminate(self, token: str | None = None) -> dict[str, Any]:
        """Ask the server to stop: it drains in-flight work, then exits. Needs the server's
        ``-auth_token`` if it has one, else must come from the server's own host (else
        :class:`~wkr_serving.client.errors.Unauthorized`). Returns once the server has
        accepted, with its supervisor's pid; it keeps running until drained."""
        return self._command("terminate", {"token": token})

    def metadata(self) -> dict[str, Any]:
        """The served model: ``model_name``, ``model_version``, ``model_dir``, ``epoch``
        (one more after each switch), the worker's own :meth:`get_metadata` as
        ``metadata`` (labels, samples, dtypes and shapes...), and ``switch``, the state of
        the last model switch (None: none yet)."""
        return self._command("metadata")

    def switch_model(self, model_dir: str | None = None, model_name: str | None = None,
                     version: str | None = None, token: str | None = None,
                     timeout: int | None = SWITCH_TIMEOUT_MS) -> dict[str, Any]:
        """Serve another model, with no request lost: one new worker at a time loads it
        while the others serve, then an old one finishes its batch and retires. Returns
        once every worker serves the new model (a dict saying what was switched, and how
        long it took); raises :class:`~wkr_serving.client.errors.SwitchFailed` with the
        loading error if the new model fails to load (the old one keeps serving), and
        :class:`~wkr_serving.client.errors.Unauthorized` like :meth:`terminate`.
        Arguments left None keep their current value; ``timeout`` is in ms (the switch
        goes on on the server if the call times out)."""
        return self._command("switch_model", {
            "model_dir": model_dir, "model_name": model_name, "version": version,
            "token": token}, timeout=timeout)

    def evaluate(self, inputs: Sequence[Any], labels: Sequence[Any], details: bool = False,
                 chunk_size: int | None = None, progress: Callable[[int], Any] | None = None,
                 timeout: int | None = None) -> dict[str, Any]:
        """Evaluate the served model on ``inputs`` against ``labels``: the inputs are
        computed through the normal batching path in chunks (live traffic keeps
        flowing), then a worker scores the predictions with the model's ``evaluate``
        (by default accuracy, macro precision/recall/F1 and a confusion matrix for class
        labels; MAE, RMSE and R² for numbers). ``details`` adds one entry per item.
        ``progress`` is called with the number of items computed after each chunk."""
        from .evaluation import run_evaluation

        return run_evaluation(self, inputs, labels, details=details, chunk_size=chunk_size,
                              progress=progress, timeout=timeout)

    # -- requests -----------------------------------------------------------------------

    def encode(self, data: Any, blocking: bool = True, target_request_id: int | None = None,
               timeout: int | None = None, suppress_log_input: bool = False,
               request_id: str | None = None) -> Any:
        """Send one input; return its result (or, with ``blocking=False``, its request id
        for :meth:`fetch`). Raises the server's error as a typed exception.

        For a server that logs predictions (``-log_predictions``): ``suppress_log_input``
        keeps this input out of the log (its result is still logged), ``request_id``
        (a string of at most 128 characters) is written as the request's id in the log.
        """
        options = (request_options(suppress_log_input, request_id)
                   if suppress_log_input or request_id is not None else None)
        return self._call([data], _ONE, blocking, timeout, target_request_id, options)

    def encode_batch(self, items: Sequence[Any], blocking: bool = True,
                     timeout: int | None = None, suppress_log_input: bool = False,
                     request_id: str | None = None) -> Any:
        """Send several inputs as one request; return their results as a list. The server
        may spread them over several batches and reassembles them in order.
        ``suppress_log_input`` and ``request_id`` as in :meth:`encode`."""
        if isinstance(items, np.ndarray):
            # Refused before the array is split into items (and before anything is sent).
            check_item_count(len(items) if items.ndim else 0, self._server_info)
            items = list(items)
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
            raise ClientUsageError("encode_batch takes a non-empty sequence of inputs")
        return self._call(items, _MANY, blocking, timeout, None,
                          request_options(suppress_log_input, request_id))

    def fetch(self, delay: float = 0.0) -> Iterator[Response]:
        """Yield the replies of non-blocking requests, in the order they were sent."""
        if delay:
            threading.Event().wait(delay)
        while self._unfetched:
            req_id = self._unfetched.popleft()
            yield self._response(req_id)

    def fetch_all(self, sort: bool = True, concat: bool = False,
                  parse_id_func: Callable[[Response], Any] | None = None,
                  return_id: bool = False, on_error: str = "raise") -> Any:
        """All replies of non-blocking requests, in send order.

        ``on_error``: ``"raise"`` raises the first failed request's error once every reply
        is in; ``"return"`` puts the exception in its place; ``"warn"`` (the seed's way)
        warns and puts None.
        """
        if on_error not in ("raise", "return", "warn"):
            raise ClientUsageError("on_error must be 'raise', 'return' or 'warn'")
        responses = list(self.fetch())
        if sort and parse_id_func is not None:
            responses.sort(key=parse_id_func)
        out: list[Any] = []
        first_error: ServerError | ProtocolError | None = None
        for r in responses:
            value = r.embedding
            if r.error_code:
                error = self._errors.pop(r.id)
                first_error = first_error or error
                if on_error == "warn":
                    warnings.warn(f"request {r.id} failed: {r.error_message}", stacklevel=2)
                value = error if on_error == "return" else None
            out.append((r.id, value) if return_id else value)
        if first_error is not None and on_error == "raise":
            self._errors.clear()
            raise first_error
        self._errors.clear()
        if concat and not return_id:
            return (np.concatenate([np.atleast_1d(v) for v in out]) if self.protocol == "numpy"
                    else [x for v in out for x in (v if isinstance(v, list) else [v])])
        return out

    def encode_async(self, batch_generator: Iterable[Any], max_num_batch: int | None = None,
                     delay: float = 0.0, max_in_flight: int = 64,
                     **kwargs: Any) -> Iterator[Response]:
        """Send every input of ``batch_generator`` (pipelined, at most ``max_in_flight``
        outstanding) and yield their :class:`Response` in order."""
        if delay:
            threading.Event().wait(delay)
        in_flight: deque[int] = deque()
        timeout = kwargs.get("timeout")
        for n, data in enumerate(batch_generator):
            if max_num_batch is not None and n >= max_num_batch:
                break
            if self._out_drops != self._out_known:  # see _call
                self._rejoin(timeout)
            in_flight.append(self._send_items([data], _ONE, timeout, None))
            if len(in_flight) >= max_in_flight:
                yield self._response(in_flight.popleft(), keep_error=False)
        while in_flight:
            yield self._response(in_flight.popleft(), keep_error=False)

    def close(self) -> None:
        """Close both sockets. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for waiter in self._parked.values():  # they see the client closed
                waiter.release()
            self._parked.clear()
            while self._reading:  # the reading thread returns within READ_SLICE_MS
                self._cond.wait(READ_SLICE_MS / 1000.0)
        self._watch.stop((self.sender, self.receiver))
        with self._send_lock:  # no thread is sending (sends check _closed first)
            self.sender.close(0)
        self.receiver.close(0)

    def __enter__(self) -> WKRClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- internals ----------------------------------------------------------------------

    def _connect(self) -> None:
        """Handshake: HELLO to the sink, then a ping through the ventilator."""
        deadline = time.monotonic() + self.options.connect_timeout / 1000.0
        with self._lock:
            self._check_open()
            drops = self._out_drops
            req_id = self._say_hello()
        info = self._wait(req_id, self.options.connect_timeout, "handshake with port_out")
        _raise_handshake_error(info, self.options, "handshake with port_out")
        self._server_info = check_hello(info.value, self.options, self.check_version)
        self._out_known = max(self._out_known, drops)
        req_id = next(self._ids)
        with self._lock:
            self._expected[req_id] = _VALUE
        self._submit(req_id, [handshake_ping_frame(req_id, self.options.connect_timeout,
                                                   self._learn_limits)])
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))  # one budget for both
        pong = self._wait(req_id, left_ms, "ping through port")
        _raise_handshake_error(pong, self.options, "ping through port")
        take_limits(self._server_info, pong.value)
        self._connected = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClientUsageError("this WKRClient is closed")

    def _say_hello(self) -> int:
        """Send a HELLO to the sink (lock held); returns its request id. The reply socket
        belongs to the reading thread while there is one: it then sends the HELLO."""
        req_id = next(self._ids)
        self._expected[req_id] = _HELLO
        if self._reading:
            self._hellos.append(hello_frame(req_id))
        else:
            self._send_hello(hello_frame(req_id))
        return req_id

    def _send_hello(self, frame: bytes) -> None:
        # The reply socket queues it until connected; a full queue (over a thousand
        # HELLOs unanswered) leaves the HELLO to time out.
        with contextlib.suppress(zmq.Again):
            self.receiver.send(frame, zmq.NOBLOCK)

    def _rejoin(self, timeout: int | None) -> int | None:
        """Say HELLO to the sink again, after port_out dropped, before the next request:
        the sink routes replies by this client's identity and drops those it cannot
        deliver, as long as this client has not reconnected. Bounded by the call's
        ``timeout``, which it uses part of; returns what is left of it."""
        budget = self._budget(timeout)
        started = time.monotonic()
        with self._lock:
            self._check_open()
            drops = self._out_drops
            req_id = self._say_hello()
        reply = self._wait(req_id, budget, "answer to the HELLO on port_out")
        if reply.error is not None:
            raise reply.error
        info = check_hello(reply.value, self.options, self.check_version)
        with self._lock:
            self._server_info.update(info)  # the limits learnt at connect time stay
            self._out_known = max(self._out_known, drops)
        if budget is None:
            return timeout
        return max(1, budget - int((time.monotonic() - started) * 1000))

    def _call(self, items: Sequence[Any], shape: str, blocking: bool, timeout: int | None,
              req_id: int | None, options: dict[str, Any] | None) -> Any:
        """Send a request (after a HELLO if port_out dropped since the last one); return
        its result, or with ``blocking=False`` its request id."""
        if self._out_drops != self._out_known:
            timeout = self._rejoin(timeout)
        req_id = self._send_items(items, shape, timeout, req_id, options)
        if not blocking:
            self._unfetched.append(req_id)
            return req_id
        budget = self.timeout if timeout is None else timeout
        reply = self._wait(req_id, None if budget is None or budget < 0 else budget, "result")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _send_items(self, items: Sequence[Any], shape: str, timeout: int | None,
                    req_id: int | None, options: dict[str, Any] | None = None) -> int:
        if not self._connected:
            self._connect()
        req_id = next(self._ids) if req_id is None else req_id
        budget = self.timeout if timeout is None else timeout
        frames = request_frames(req_id, budget, items, self.protocol, self.options.allow_pickle,
                                options, self._server_info)
        check_frame_sizes(frames, self._server_info)
        with self._lock:
            self._check_open()
            if req_id in self._expected:
                raise ClientUsageError(f"request id {req_id} is already in flight")
            if self._doomed:  # a caller's own id may be that of an old, dropped request
                self._doomed.pop(req_id, None)
            self._expected[req_id] = shape
            self.num_requests += 1
        self._submit(req_id, frames)
        return req_id

    def _submit(self, req_id: int, frames: list[Any]) -> None:
        """Queue a request (registered in ``_expected``) and send what is queued, unless
        another thread is sending: that thread then sends it too. Raises the error of
        this request's own send when this thread sent it; another thread's failure to
        send it reaches this request as its reply."""
        self._outbox.append((req_id, frames))
        self._flush()
        if self._send_failed:
            with self._lock:
                error = self._send_failed.pop(req_id, None)
                if error is not None:
                    self._replies.pop(req_id, None)
                    raise error

    def _flush(self) -> None:
        """Send every queued request, unless another thread is sending. After letting go
        of the send lock the sender looks again: a request queued while it held the lock
        by a thread that could not take it is sent by one of the two."""
        outbox = self._outbox
        while outbox and self._send_lock.acquire(False):
            try:
                while outbox:
                    req_id, frames = outbox.popleft()
                    try:
                        self._send_message(frames)
                    except (zmq.ZMQError, WKRTimeoutError, ClientUsageError) as exc:
                        self._send_error(req_id, exc)
            finally:
                self._send_lock.release()

    def _send_message(self, frames: list[Any]) -> None:
        """Send one request (send lock held); a full send queue waits at most the client
        timeout."""
        if self._closed:
            raise ClientUsageError("this WKRClient is closed")
        sender = self.sender
        last = len(frames) - 1
        try:  # the header: once it is taken, the other frames are too
            sender.send(frames[0], _NOBLOCK | _SNDMORE if last else _NOBLOCK)
        except zmq.Again:
            budget = self.options.timeout
            if not sender.poll(budget if budget is not None else -1, zmq.POLLOUT):
                raise WKRTimeoutError(f"could not send within {budget} ms: the server is "
                                      "not reading requests") from None
            sender.send(frames[0], _SNDMORE if last else 0)
        for n in range(1, last + 1):  # payloads: large ones without a copy
            sender.send(frames[n], _SNDMORE if n < last else 0, copy=False)

    def _send_error(self, req_id: int, exc: Exception) -> None:
        """A request could not be sent: its caller gets the error (as its reply, and
        from :meth:`_submit` when it is still there)."""
        if isinstance(exc, zmq.ZMQError):
            exc = (ClientUsageError("this WKRClient is closed") if self._closed else
                   ConnectionLost(f"could not send request {req_id}: {exc}", "", req_id))
        with self._lock:
            if self._expected.pop(req_id, None) is None:
                return
            self._replies[req_id] = Reply(req_id, None, exc)  # type: ignore[arg-type]
            self._send_failed[req_id] = exc
            self._wake(req_id)

    def _command(self, name: str, args: Any = None, timeout: int | None = None) -> Any:
        if not self._connected:
            self._connect()
        timeout = self.timeout if timeout is None else timeout
        if self._out_drops != self._out_known:  # see _call
            timeout = self._rejoin(timeout)
        req_id = next(self._ids)
        with self._lock:
            self._check_open()
            self._expected[req_id] = _VALUE
        self._submit(req_id, [command_frame(req_id, timeout, name, args)])
        reply = self._wait(req_id, self._budget(timeout), f"command {name!r}")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _budget(self, timeout: int | None) -> int | None:
        """The call's budget in ms: its own ``timeout``, else the client's (None: none)."""
        budget = self.timeout if timeout is None else timeout
        return None if budget is None or budget < 0 else budget

    def _response(self, req_id: int, keep_error: bool = True) -> Response:
        """The reply as a seed-style Response; ``keep_error`` keeps the typed exception
        for :meth:`fetch_all`."""
        reply = self._wait(req_id, self._budget(None), "result")
        if reply.error is not None:
            if keep_error:
                self._errors[req_id] = reply.error
            return Response(req_id, None, 1, str(reply.error))
        return Response(req_id, reply.value, 0, "")

    def _wait(self, req_id: int, budget_ms: int | None, what: str) -> Reply:
        """Wait up to ``budget_ms`` (None: no limit) for one reply, reading the socket for
        every thread when no other thread is (else parked until woken)."""
        deadline = None if budget_ms is None else time.monotonic() + budget_ms / 1000.0
        lock = self._lock
        with lock:
            try:
                while True:
                    reply = self._replies.pop(req_id, None)
                    if reply is not None:
                        if self._send_failed:
                            self._send_failed.pop(req_id, None)
                        return reply
                    self._check_open()
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self._expected.pop(req_id, None)  # a late reply will be dropped
                        raise self._timeout_error(req_id, what, budget_ms)
                    if self._reading:
                        self._park(req_id, remaining)
                        continue
                    self._reading = True
                    lock.release()
                    arrived: list[Reply] = []
                    try:
                        if not self._doomed:  # else fail them now, without waiting
                            slice_ms = READ_SLICE_MS if remaining is None else max(
                                1, min(READ_SLICE_MS, int(remaining * 1000)))
                            arrived = self._read(slice_ms)
                    finally:
                        lock.acquire()
                        self._end_reading(arrived)
            finally:
                # Leaving with threads parked and nobody reading: one of them reads next.
                if self._parked and not self._reading:
                    self._wake(next(iter(self._parked)))

    def _park(self, req_id: int, remaining: float | None) -> None:
        """Wait (lock held, released meanwhile) until the reading thread wakes this one:
        its reply is in, or it is to read next, or the client closed; or until
        ``remaining`` seconds passed. Each thread waits on a lock of its own, held while
        it is not waiting: waking it is releasing that lock."""
        waiter = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = threading.Lock()
            waiter.acquire()
        self._parked[req_id] = waiter
        self._lock.release()
        woken = False
        try:
            woken = waiter.acquire(True, -1 if remaining is None else remaining)
        finally:
            self._lock.acquire()
            if self._parked.get(req_id) is waiter:  # not woken: no longer waiting
                del self._parked[req_id]
            elif not woken:  # woken just as it gave up: take the lock back
                waiter.acquire(False)

    def _wake(self, req_id: int) -> None:
        """Wake the thread parked for ``req_id``, if any (lock held)."""
        waiter = self._parked.pop(req_id, None)
        if waiter is not None:
            waiter.release()

    def _end_reading(self, arrived: list[Reply]) -> None:
        """The reading thread's turn ends (lock held): keep what arrived and wake whoever
        waits for it; fail the requests a dropped connection left unanswered, once what
        the server sent before the drop is taken; send the HELLOs that waited for the
        reply socket."""
        try:
            if self._doomed:
                arrived.extend(self._read(0, drain=True))
        finally:
            self._reading = False  # no other thread reads before the lock is released
            self._store(arrived)
            if self._doomed:
                self._fail_doomed()
            if self._hellos:
                hellos, self._hellos = self._hellos, []
                for frame in hellos:
                    self._send_hello(frame)
            if self._closed:
                self._cond.notify_all()  # close() waits for the reader to finish

    def _read(self, timeout_ms: int, drain: bool = False) -> list[Reply]:
        """Block up to ``timeout_ms`` for a reply message (a timed recv: cheaper than
        poll+recv); while other threads are parked, or with ``drain``, take whatever more
        is there too (at most :data:`READ_BATCH` messages)."""
        if self._closed:
            return []
        receiver = self.receiver
        flags = 0
        if self.busy_poll_us and self._spin(min(self.busy_poll_us, timeout_ms * 1000)):
            flags = _NOBLOCK
        elif not timeout_ms:
            if not receiver.get(_EVENTS) & _POLLIN:  # type: ignore[operator]
                return []
            flags = _NOBLOCK
        elif timeout_ms != self._rcvtimeo:
            receiver.setsockopt(zmq.RCVTIMEO, timeout_ms)
            self._rcvtimeo = timeout_ms
        try:
            replies = self._recv_message(flags)
        except zmq.Again:
            return []
        for _ in range(READ_BATCH - 1):
            if not (drain or self._parked) or not receiver.get(_EVENTS) & _POLLIN:  # type: ignore[operator]
                break
            replies.extend(self._recv_message(_NOBLOCK))
        return replies

    def _recv_message(self, flags: int) -> list[Reply]:
        """Receive one message from the sink and parse its replies: its header first, then
        each payload frame, copied when small (by the size its header declares), taken
        without a copy when large. A malformed message is dropped with a warning."""
        receiver = self.receiver
        head = receiver.recv(flags)  # the other parts of a message are there with it
        try:
            entries = reply_entries(P.unpack_header(head))
            sizes = payload_sizes(entries)
        except ProtocolError as exc:
            self._drop_rest(exc)
            return []
        frames: list[Any] = [head]
        for size in sizes:
            if not receiver.get(_RCVMORE):
                self._drop_rest(ProtocolError("REPLIES entries do not match its payload "
                                              "frames"))
                return []
            frames.append(receiver.recv(copy=0 <= size <= COPY_LIMIT))
        if receiver.get(_RCVMORE):
            self._drop_rest(ProtocolError("REPLIES entries do not match its payload frames"))
            return []
        try:
            return parse_entries(entries, frames, self.options.allow_pickle)
        except ProtocolError as exc:
            self._drop_rest(exc)
            return []

    def _drop_rest(self, exc: ProtocolError) -> None:
        """Drop the rest of a malformed message from the server, with a warning."""
        while self.receiver.get(_RCVMORE):
            self.receiver.recv(copy=False)
        warnings.warn(f"dropped a malformed reply from the server: {exc}", stacklevel=3)

    def _spin(self, limit_us: int) -> bool:
        """Check for a reply without blocking until one is there (True) or ``limit_us``
        passed (False)."""
        receiver = self.receiver
        deadline = time.perf_counter() + limit_us / 1e6
        while True:
            if receiver.get(_EVENTS) & _POLLIN:  # type: ignore[operator]
                return True
            if time.perf_counter() >= deadline:
                return False

    def _on_drop(self, which: str) -> None:
        """(The watcher thread.) Connection ``which`` dropped: the requests outstanding now
        will not be answered (a HELLO waits on port_out only); requests sent from now on
        are not concerned. After a port_out drop, the next call says HELLO again."""
        with self._cond:
            for req_id, shape in self._expected.items():
                if which == "port_out" or shape != _HELLO:
                    self._doomed.setdefault(req_id, which)
            if which == "port_out":  # counted last: a HELLO sent on seeing it is not doomed
                self._out_drops += 1

    def _fail_doomed(self) -> None:
        """Fail the requests still unanswered that were outstanding when a connection
        dropped (lock held): the server will never answer them."""
        for req_id, which in self._doomed.items():
            if self._expected.pop(req_id, None) is None:  # answered, or its caller gave up
                continue
            address = self.options.address_in if which == "port" else self.options.address_out
            self._replies[req_id] = Reply(req_id, None, ConnectionLost(
                f"the connection to {address} dropped while request {req_id} was pending "
                "(the server stopped or crashed, or refused a frame over its "
                "-max_msg_size); its result is lost", "", req_id))
            self._wake(req_id)
        self._doomed.clear()

    def _store(self, replies: list[Reply]) -> None:
        """Keep replies someone is waiting for (lock held); drop late or unknown ones."""
        for reply in replies:
            shape = self._expected.pop(reply.req_id, None)
            if shape is None:  # its caller gave up (timeout) or it was never ours
                continue
            if shape is _ONE and reply.error is None:
                reply = Reply(reply.req_id, reply.value[0], None)
            self._replies[reply.req_id] = reply
            if self._parked:
                self._wake(reply.req_id)

    def _timeout_error(self, req_id: int, what: str, budget_ms: int | None) -> WKRTimeoutError:
        if not self._connected:
            return connect_timeout_error(self.options, what)
        return WKRTimeoutError(
            f"no {what} for request {req_id} within {budget_ms} ms from "
            f"{self.options.address_in} / {self.options.address_out}: is the server up, "
            "and is the timeout long enough for this input?")


def _raise_handshake_error(reply: Reply, options: Any, step: str) -> None:
    """A handshake step answered by a dropped connection: the server refused it (a CURVE
    key mismatch) or went away."""
    if isinstance(reply.error, ConnectionLost):
        raise handshake_dropped_error(options, step)
    if reply.error is not None:
        raise reply.error


class ConcurrentWKRClient:
    """A pool of :class:`WKRClient`, for many threads issuing calls in parallel.

    Each call borrows one client for its duration; when all are busy it waits at most
    the call timeout for one to come back.
    """

    def __init__(self, max_concurrency: int = 10, **kwargs: Any) -> None:
        if max_concurrency < 1:
            raise ClientUsageError("max_concurrency must be >= 1")
        self._pool: queue.LifoQueue[WKRClient] = queue.LifoQueue()
        self._clients = [WKRClient(**kwargs) for _ in range(max_concurrency)]
        for client in self._clients:
            self._pool.put(client)
        self.max_concurrency = max_concurrency
        timeout = self._clients[0].timeout
        self._borrow_timeout = None if timeout is None else timeout / 1000.0

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            client = self._pool.get(timeout=self._borrow_timeout)
        except queue.Empty:
            raise WKRTimeoutError(f"all {self.max_concurrency} clients stayed busy") from None
        try:
            return getattr(client, method)(*args, **kwargs)
        finally:
            self._pool.put(client)

    def encode(self, data: Any, **kwargs: Any) -> Any:
        if kwargs.get("blocking") is False:
            raise ClientUsageError("ConcurrentWKRClient only supports blocking calls")
        return self._call("encode", data, **kwargs)

    def encode_batch(self, items: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("blocking") is False:
            raise ClientUsageError("ConcurrentWKRClient only supports blocking calls")
        return self._call("encode_batch", items, **kwargs)

    @property
    def server_status(self) -> dict[str, Any]:
        return self._call("_command", "status")

    @property
    def status(self) -> list[dict[str, Any]]:
        return [c.status for c in self._clients]

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> ConcurrentWKRClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
