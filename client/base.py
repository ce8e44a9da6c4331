"""What the sync and asyncio clients share: options, request frames, reply parsing."""

from __future__ import annotations

import contextlib
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .errors import (
    BadInput,
    ClientUsageError,
    ConnectTimeout,
    ProtocolError,
    ProtocolMismatch,
    ServerError,
    VersionMismatch,
    error_from_wire,
)
from .keys import load_key_pair, load_public_key
from .version import __version__

__all__ = ["CONNECTIONS", "CONNECT_TIMEOUT_MS", "DEFAULT_PORT", "DEFAULT_PORT_OUT",
           "DEFAULT_TIMEOUT_MS", "SWITCH_TIMEOUT_MS", "ClientOptions", "DropWatcher", "Reply",
           "Response",
           "check_hello", "check_item_count", "handshake_ping_frame", "parse_entries",
           "parse_replies", "payload_sizes", "reply_entries", "request_frames",
           "request_options", "take_limits"]

#: The server's ``-port`` (requests) a client connects to unless told otherwise.
DEFAULT_PORT = 5555
#: The server's ``-port_out`` (replies) a client connects to unless told otherwise.
DEFAULT_PORT_OUT = 5556
#: Milliseconds a call waits for its reply unless told otherwise.
DEFAULT_TIMEOUT_MS = 60_000
#: Default wait (ms) for a model switch: each worker loads the new model in turn.
SWITCH_TIMEOUT_MS = 600_000
#: Longest the connection handshake may take when the call timeout is longer.
CONNECT_TIMEOUT_MS = 10_000
#: The names of a client's two connections, in the order of its sockets (the request
#: socket, then the reply socket), as :class:`DropWatcher` reports them.
CONNECTIONS = ("port", "port_out")
#: The monitor events a client watches: a dropped connection, and the end of watching
#: (which close() causes).
WATCHED_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
#: Longest single wait (ms) of a watcher thread. It ends at once on the stop event that
#: close() causes; this only bounds its end should that event not come.
WATCH_SLICE_MS = 1000


class Response(NamedTuple):
    """One fetched result, shaped as in the seed: ``error_code`` 0 means success."""

    id: int
    embedding: Any
    error_code: int
    error_message: str

    @property
    def result(self) -> Any:
        return self.embedding


class Reply(NamedTuple):
    """A parsed reply: ``value`` (decoded items or a command's value) or ``error``."""

    req_id: int
    value: Any
    error: ServerError | ProtocolError | None


class ClientOptions:
    """Validated connection options shared by :class:`WKRClient` and the asyncio client."""

    def __init__(self, ip: str, port: int, port_out: int, protocol: str,
                 identity: bytes | str | None, timeout: int | None,
                 connect_timeout: int | None, server_public_key: Any = None,
                 client_key: Any = None, allow_pickle: bool = False) -> None:
        try:
            protocol = P.normalize_protocol(protocol)  # "npy" is another name of "numpy"
        except ValueError as exc:
            raise ClientUsageError(str(exc)) from None
        for name, value in (("port", port), ("port_out", port_out)):
            if not isinstance(value, int) or not 0 < value < 65536:
                raise ClientUsageError(f"{name} must be a TCP port number, got {value!r}")
        if identity is None:
            identity = uuid.uuid4().hex
        if isinstance(identity, str):
            identity = identity.encode()
        if not isinstance(identity, bytes) or not 1 <= len(identity) <= 255 or identity[0] == 0:
            raise ClientUsageError(
                "identity must be 1..255 bytes and must not start with a zero byte")
        if timeout is not None and timeout < 0:
            timeout = None  # the seed's -1: no deadline on results
        self.ip = ip
        self.port = port
        self.port_out = port_out
        self.protocol = protocol
        self.identity = identity
        self.timeout = timeout
        limit = CONNECT_TIMEOUT_MS if timeout is None else min(timeout, CONNECT_TIMEOUT_MS)
        self.connect_timeout = connect_timeout if connect_timeout is not None else limit
        self.allow_pickle = bool(allow_pickle)
        self.curve: tuple[bytes, bytes, bytes] | None = None
        if client_key is not None and server_public_key is None:
            raise ClientUsageError("client_key needs server_public_key")
        if server_public_key is not None:
            server_key = load_public_key(server_public_key)
            if client_key is None:  # an ephemeral pair: enough when the server allows any
                public, secret = zmq.curve_keypair()
            else:
                public, secret = load_key_pair(client_key)
            self.curve = (server_key, public, secret)

    @property
    def address_in(self) -> str:
        return f"tcp://{_host(self.ip)}:{self.port}"

    @property
    def address_out(self) -> str:
        return f"tcp://{_host(self.ip)}:{self.port_out}"

    def configure(self, socket: zmq.Socket) -> zmq.Socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IDENTITY, self.identity)
        if self.curve is not None:
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self.curve
        if ":" in self.ip:
            socket.setsockopt(zmq.IPV6, 1)
        return socket


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


class DropWatcher:
    """Tells a client, when it happens, that one of its two connections dropped.

    A thread of its own blocks on the sockets' monitors, so that a drop is known when it
    happens rather than when a call next looks: read late, a drop from before a server
    restart fails calls made to the new server; read on every call, it costs two system
    calls a call. The thread adds nothing to a call: it sleeps in poll, woken by an
    event or once every :data:`WATCH_SLICE_MS`.

    ``on_drop(name)``, a bound method, is called in the watcher thread with the name of
    the connection (:data:`CONNECTIONS`); it is held weakly, so that the thread never
    keeps its client alive. The monitors are used by the watcher thread only.
    """

    def __init__(self, sockets: Sequence[zmq.Socket], on_drop: Callable[[str], None]) -> None:
        self._on_drop = weakref.WeakMethod(on_drop)
        self._stopping = False
        self._monitors = [s.get_monitor_socket(WATCHED_EVENTS) for s in sockets]
        self._thread = threading.Thread(target=self._run, name="wkr-client-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self, sockets: Sequence[zmq.Socket]) -> None:
        """Stop watching ``sockets`` (call it from the thread that uses them, before closing
        them); waits, bounded, until the watcher thread has closed its monitors."""
        self._stopping = True
        for socket in sockets:
            with contextlib.suppress(zmq.ZMQError):
                socket.disable_monitor()
        if threading.current_thread() is not self._thread:  # close() may run in a GC pass
            self._thread.join(2 * WATCH_SLICE_MS / 1000.0)

    def _run(self) -> None:
        poller = zmq.Poller()
        names: dict[zmq.Socket, str] = {}
        for monitor, name in zip(self._monitors, CONNECTIONS, strict=True):
            poller.register(monitor, zmq.POLLIN)
            names[monitor] = name
        try:
            while names and not self._stopping:
                for monitor, _ in poller.poll(WATCH_SLICE_MS):
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
                    except zmq.Again:
                        continue
                    if event == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(monitor)
                        del names[monitor]
                    elif event == zmq.EVENT_DISCONNECTED and not self._tell(names[monitor]):
                        return
        except zmq.ZMQError:  # the context was terminated: nothing is left to watch
            pass
        finally:
            for monitor in self._monitors:
                monitor.close(0)

    def _tell(self, name: str) -> bool:
        """Report a drop; False once the client is gone."""
        on_drop = self._on_drop()
        if on_drop is None:
            return False
        on_drop(name)
        return True


def request_frames(req_id: int, timeout_ms: int | None, items: Sequence[Any],
                   protocol: str, allow_pickle: bool = False,
                   options: dict[str, Any] | None = None,
                   info: dict[str, Any] | None = None) -> list[Any]:
    """Frames of a REQUEST carrying ``items`` (and its ``options`` map, when given).
    ``info``: what the server told in the handshake; a request over its
    ``max_request_items`` is refused (:func:`check_item_count`) before any item is
    encoded."""
    if info:
        check_item_count(len(items), info)
    if options and options.get("evaluate"):
        protocol = "obj"  # an evaluate request's item is a map, whatever the protocol
    metas = []
    frames: list[Any] = [b""]
    for item in items:
        meta, buf = P.encode_item(item, protocol, allow_pickle)
        metas.append(meta)
        frames.append(buf)
    header = [P.PROTOCOL_VERSION, P.REQUEST, req_id, int(timeout_ms or 0), metas]
    if options:
        header.append(options)
    frames[0] = P.pack(header)
    return frames


def request_options(suppress_log_input: bool = False, request_id: str | None = None,
                    ) -> dict[str, Any] | None:
    """The REQUEST options for these per-call settings (None when none is set, so such a
    request is sent exactly as before). They matter when the server logs predictions
    (``-log_predictions``): ``suppress_log_input`` keeps this request's inputs out of
    the log, ``request_id`` is the caller's id for it (at most 128 characters)."""
    if not suppress_log_input and request_id is None:
        return None
    options: dict[str, Any] = {}
    if suppress_log_input:
        options["suppress_log_input"] = True
    if request_id is not None:
        if not isinstance(request_id, str) or len(request_id) > P.MAX_OPTION_CHARS:
            raise ClientUsageError(
                f"request_id must be a string of at most {P.MAX_OPTION_CHARS} characters, "
                f"got {P.brief(request_id)}")
        options["request_id"] = request_id
    return options


def command_frame(req_id: int, timeout_ms: int | None, name: str, args: Any = None) -> bytes:
    return P.pack([P.PROTOCOL_VERSION, P.COMMAND, req_id, int(timeout_ms or 0), name, args])


def hello_frame(req_id: int) -> bytes:
    return P.pack([P.PROTOCOL_VERSION, P.HELLO, req_id])


#: The ``ping`` arguments asking the ventilator for its request limits (answered with a
#: map instead of ``"pong"``; a server that predates them answers ``"pong"``).
LIMITS_ARGS = {"limits": True}


def handshake_ping_frame(req_id: int, timeout_ms: int | None, limits: bool = True) -> bytes:
    """The handshake's ``ping`` through the request port; with ``limits`` it asks the
    server for its request limits too (:func:`take_limits` reads the answer)."""
    return command_frame(req_id, timeout_ms, "ping", LIMITS_ARGS if limits else None)


def take_limits(info: dict[str, Any], answer: Any) -> None:
    """Keep the request limits of the ventilator's answer to the handshake ping in
    ``info`` (the handshake's answer): ``max_request_items`` (and ``batch_size``,
    ``num_worker``), when the answer is a map that has it (an older server answers
    ``"pong"``: then no client-side check)."""
    if isinstance(answer, dict):
        # batch_size and num_worker size an evaluation's chunks (evaluation.py)
        for key in ("max_request_items", "batch_size", "num_worker"):
            limit = answer.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                info[key] = limit


def check_item_count(count: int, info: dict[str, Any]) -> None:
    """Refuse, before encoding or sending anything, a request of more items than the
    server's ``-max_request_items`` (the server would refuse it from its header; a
    client-side refusal spares building and sending every item first)."""
    limit = info.get("max_request_items")
    if isinstance(limit, int) and count > limit:
        raise BadInput(f"request of {count} items is over the server's -max_request_items "
                       f"{limit}: send it in smaller requests")


def parse_replies(frames: list[Any], allow_pickle: bool = False) -> list[Reply]:
    """Parse one message from the sink into its replies (REPLIES carries several);
    raise :class:`ProtocolError` if it is malformed."""
    entries = reply_entries(P.unpack_header(_buffer(frames[0])))
    return parse_entries(entries, frames, allow_pickle)


def reply_entries(header: list[Any]) -> list[list[Any]]:
    """The ``[req_id, kind, body]`` entries of a sink message's (checked) header: a single
    RESULT, ERROR or REPLY is read as a REPLIES of one entry."""
    entries = header[2] if header[1] == P.REPLIES else [[header[2], header[1], header[3]]]
    if not isinstance(entries, list):
        raise ProtocolError("REPLIES needs a list of entries")
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError(f"bad REPLIES entry {P.brief(entry)}")
    return entries


def payload_sizes(entries: list[list[Any]]) -> list[int]:
    """The byte size each payload frame of a sink message is declared to have, in frame
    order (-1: not declared, a msgpack item), from its entries: a reader that copies
    small frames and takes large ones without a copy picks per frame before receiving
    it. Frames that do not match their metas are refused later, when decoded."""
    sizes: list[int] = []
    for entry in entries:
        if entry[1] == P.RESULT:
            body = entry[2]
            if not isinstance(body, list):
                raise ProtocolError("result metas do not match its payload frames")
            sizes.extend(P.declared_nbytes(meta) for meta in body)
    return sizes


def parse_entries(entries: list[list[Any]], frames: list[Any], allow_pickle: bool = False,
                  ) -> list[Reply]:
    """The replies of a sink message, from its entries (:func:`reply_entries`) and its
    frames (the header, then the payload frames)."""
    replies = []
    pos = 1
    for entry in entries:
        reply = _entry(entry[1], entry[0], entry[2], frames, pos, allow_pickle)
        if entry[1] == P.RESULT:
            pos += len(entry[2])
        replies.append(reply)
    if pos != len(frames):
        raise ProtocolError("REPLIES entries do not match its payload frames")
    return replies


def _entry(kind: Any, req_id: Any, body: Any, frames: list[Any], pos: int,
           allow_pickle: bool) -> Reply:
    if kind == P.RESULT:
        if not isinstance(body, list) or pos + len(body) > len(frames):
            raise ProtocolError("result metas do not match its payload frames")
        try:
            values = [P.decode_item(m, _buffer(f), allow_pickle)
                      for m, f in zip(body, frames[pos:pos + len(body)], strict=True)]
        except ProtocolError as exc:  # this reply only: the others in the message are fine
            exc.request_id = req_id  # type: ignore[attr-defined]
            return Reply(req_id, None, exc)
        return Reply(req_id, values, None)
    if kind == P.ERROR:
        return Reply(req_id, None, error_from_wire(body, req_id))
    if kind == P.REPLY:
        return Reply(req_id, body, None)
    raise ProtocolError(f"unexpected reply kind {kind}")


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def check_frame_sizes(frames: list[Any], info: dict[str, Any]) -> None:
    """Refuse, before sending, a request the server would drop the connection for."""
    limit = info.get("max_msg_size")
    if not isinstance(limit, int) or limit <= 0:
        return
    for frame in frames:
        size = memoryview(frame).nbytes
        if size > limit:
            raise ClientUsageError(
                f"an item of {size} bytes is over the server's -max_msg_size of {limit} "
                "bytes; the server would close the connection")


def check_hello(info: Any, options: ClientOptions, check_version: bool) -> dict[str, Any]:
    """Validate the server's handshake answer against this client's settings."""
    if not isinstance(info, dict):
        raise ProtocolError(f"unexpected handshake answer {info!r}")
    if info.get("protocol") != options.protocol:
        raise ProtocolMismatch(
            f'protocol mismatch: the server uses "{info.get("protocol")}" and this client '
            f'"{options.protocol}"; create the client with protocol="{info.get("protocol")}"')
    if check_version and info.get("server_version") != __version__:
        raise VersionMismatch(
            f"version mismatch: server {info.get('server_version')}, client {__version__}; "
            "upgrade both, or pass check_version=False")
    return info


def handshake_dropped_error(options: ClientOptions, step: str) -> ConnectTimeout:
    return ConnectTimeout(
        f"the server at {options.address_in} / {options.address_out} dropped the connection "
        f"during the {step}: it refused this client's CurveZMQ keys (check "
        "server_public_key and client_key) or it stopped")


def connect_timeout_error(options: ClientOptions, step: str) -> ConnectTimeout:
    return ConnectTimeout(
        f"no answer from the server within {options.connect_timeout} ms ({step}): is it "
        f"running and reachable at {options.address_in} / {options.address_out}?")
