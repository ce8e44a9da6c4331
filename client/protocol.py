"""The wire protocol: every frame layout used between clients and server roles.

Every message is a ZeroMQ multipart message: one small msgpack *header* frame, then zero
or more raw *payload* frames that are sent and received without copies. A header is a
msgpack array whose first two fields are always ``[PROTOCOL_VERSION, kind]``. Request
ids are integers chosen by the client, unique per client identity; results are routed
by the client's exact ZeroMQ identity (ROUTER sockets), never by string prefixes.

Public messages (``port_in`` is the ventilator's ROUTER, ``port_out`` the sink's ROUTER;
a client connects one DEALER to each, both with the same identity)::

    kind      direction                  header fields after [V, kind]     payload
    REQUEST   client  -> ventilator      req_id, timeout_ms, metas         one frame per item
                                         [, options]
    COMMAND   client  -> ventilator      req_id, timeout_ms, name, args    -
    HELLO     client  -> sink            req_id                            -
    RESULT    sink    -> client          req_id, metas                     one frame per item
    ERROR     sink    -> client          req_id, [code, message, tb]       -
    REPLY     sink    -> client          req_id, value                     -
    REPLIES   sink    -> client          entries                           result frames

Internal messages (loopback IPC between the roles of one server)::

    BATCH     ventilator -> worker       batch_id, segments                item frames
    READY     worker  -> ventilator      worker_index, pid, device_id      -
    DONE      worker  -> sink            batch_id, worker_index, pid,      result frames
                                         parts, user_stats, busy_seconds
    FORWARD   ventilator -> sink         client, req_id, action, value     -
    RETIRE    worker  -> ventilator      worker_index, pid                 -
    RETIRED   ventilator -> worker       (none)                            -
    FEEDBACK  sink    -> ventilator      name, value                       -
    EVENT     role    -> supervisor      name, value                       -
    CONTROL   supervisor -> role         name, value                       -

REPLIES carries several replies for one client at once (the sink sends it when one
batch completes more than one of that client's requests): each entry is ``[req_id,
kind, body]`` with ``kind`` RESULT (``body``: metas; its frames follow, in entry order),
ERROR (``body``: ``[code, message, tb]``) or REPLY (``body``: a value).

``timeout_ms`` is the client's budget for the request (0 means none); the ventilator turns
it into an absolute deadline on arrival, so client and server clocks never meet.

The clients' handshake ends with COMMAND ``ping``, whose args ``{"limits": true}`` ask
for the server's request limits: the REPLY value is then ``{"pong": true,
"max_request_items": ..., "max_msg_size": ...}`` instead of ``"pong"``. A client refuses
a request of more than ``max_request_items`` items before encoding any of them; the
ventilator refuses one from its header (and reads a client's header with bounds, see
:func:`unpack_header`), and refuses raw arrays whose metas declare more than
``-max_msg_size`` bytes, each or together (:func:`check_metas`).

REQUEST may carry a 4th field, ``options``: a map of per-request options (string keys;
values ``nil``, booleans or strings of at most :data:`MAX_OPTION_CHARS` characters;
at most :data:`MAX_OPTIONS` entries). Known keys: ``suppress_log_input`` (bool: keep
this request's inputs out of the prediction log) and ``request_id`` (str: the caller's
id for the request, written in the prediction log). Unknown keys are ignored. Clients
send the field only when an option is set.

The fields of the internal messages (a BATCH *segment*, a DONE *part*, the events,
commands and FORWARD actions) are defined once, as named types, in
``wkr_serving.server.messages``.

Items are encoded one frame each by :func:`encode_item`. An item's *meta* is ``0`` for a
msgpack-encoded value, or ``[dtype, shape]`` for an ndarray carried as its raw buffer.
Inside msgpack values, ndarrays travel as extension type :data:`EXT_NDARRAY`.

Meta ``1`` (:data:`PICKLE_ITEM`) marks a pickled item. It exists only for deployments
whose clients are all trusted: a side sends one only when its ``allow_pickle`` option is
on and msgpack cannot encode the value, and a side refuses to unpickle one unless its
own ``allow_pickle`` is on (the server's ``-allow_pickle``). Unpickling runs code chosen
by whoever made the bytes.
"""

from __future__ import annotations

import math
import pickle
import reprlib
import threading
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError
from .version import PROTOCOL_VERSION

__all__ = [
    "BATCH",
    "COMMAND",
    "CONTROL",
    "DONE",
    "ERROR",
    "EVENT",
    "EXT_NDARRAY",
    "FEEDBACK",
    "FORWARD",
    "HELLO",
    "MSGPACK_ITEM",
    "PICKLE_ITEM",
    "PROTOCOLS",
    "PROTOCOL_ALIASES",
    "PROTOCOL_NAMES",
    "PROTOCOL_VERSION",
    "READY",
    "REPLIES",
    "REPLY",
    "REQUEST",
    "RESULT",
    "RETIRE",
    "RETIRED",
    "HeaderLimitError",
    "brief",
    "check_metas",
    "check_raw",
    "declared_nbytes",
    "declared_request",
    "decode_item",
    "encode_item",
    "normalize_protocol",
    "pack",
    "parse_dtype",
    "unpack_header",
]

REQUEST = 1
COMMAND = 2
HELLO = 3
RESULT = 4
ERROR = 5
REPLY = 6
REPLIES = 7
BATCH = 10
READY = 11
DONE = 12
FORWARD = 13
RETIRE = 14
RETIRED = 15
FEEDBACK = 16
EVENT = 20
CONTROL = 21

#: Most entries in a REQUEST's options map, and longest string value in it.
MAX_OPTIONS = 16
MAX_OPTION_CHARS = 128

#: How many fields (after ``[version, kind]``) each kind's header carries (REQUEST may
#: carry one more: its options).
HEADER_FIELDS = {
    REQUEST: 3,
    COMMAND: 4,
    HELLO: 1,
    RESULT: 2,
    ERROR: 2,
    REPLY: 2,
    REPLIES: 1,
    BATCH: 2,
    READY: 4,
    DONE: 6,
    FORWARD: 4,
    RETIRE: 2,
    RETIRED: 0,
    FEEDBACK: 2,
    EVENT: 2,
    CONTROL: 2,
}

#: The protocols (``-protocol``), by their canonical names.
PROTOCOLS = ("obj", "numpy")
#: Other accepted names of a protocol: ``npy`` is the seed documentation's name of numpy.
PROTOCOL_ALIASES = {"npy": "numpy"}
#: Every name :func:`normalize_protocol` accepts (for argparse ``choices``).
PROTOCOL_NAMES = (*PROTOCOLS, *PROTOCOL_ALIASES)
EXT_NDARRAY = 1

# dtype kinds that hold plain data: bool, ints, floats, complex, bytes, str, datetimes.
_SAFE_DTYPE_KINDS = frozenset("biufcSUMm")
MSGPACK_ITEM = 0
PICKLE_ITEM = 1


def normalize_protocol(name: Any) -> str:
    """The canonical name of protocol ``name`` (``"npy"`` → ``"numpy"``); raises
    :class:`ValueError` for a name that is no protocol. Server config and client options
    both go through here, so only canonical names appear past it."""
    canonical = PROTOCOL_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOL_NAMES)} (npy is "
                         f"another name of numpy), got {name!r}")
    return str(canonical)


def pack(header: Sequence[Any]) -> bytes:
    """Serialise a header (or any protocol value) with msgpack (each thread reuses one
    packer: making one per call costs as much as packing a header)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, default=_ext_default)
    try:
        return packer.pack(header)
    except BaseException:
        packer.reset()  # a failed pack leaves its partial output in the packer
        raise


class HeaderLimitError(ProtocolError):
    """A header over the reader's bounds (:func:`unpack_header`'s ``max_items``, or the
    reader's cap on a header's size): refused before it was unpacked in full."""


def unpack_header(buf: Any, expect: int | None = None, max_items: int | None = None,
                  ) -> list[Any]:
    """Parse and check one header frame; raise :class:`ProtocolError` if it is not valid.

    ``buf`` is bytes or a buffer; ``expect`` restricts the message kind. ``max_items``
    (for a header from an untrusted peer) bounds the unpacking itself: an array longer
    than ``max_items`` (and :data:`MAX_NDIM`) or a map of more than :data:`MAX_OPTIONS`
    entries is refused from its length, before anything is allocated for it
    (:class:`HeaderLimitError`). Strings, bytes and extension values cost the reader
    about their own size, at most the header's, which the reader caps: one byte of
    msgpack can only grow into a large Python object as an (empty) container, so the
    header's size bounds what unpacking it allocates.
    """
    try:
        if max_items is None:
            header = msgpack.unpackb(buf, raw=False, strict_map_key=False, ext_hook=_ext_hook)
        else:
            header = msgpack.unpackb(
                buf, raw=False, strict_map_key=False, ext_hook=_ext_hook,
                max_array_len=max(max_items, MAX_NDIM), max_map_len=MAX_OPTIONS)
    except ProtocolError:
        raise
    except Exception as exc:
        if max_items is not None and isinstance(exc, ValueError) and "exceeds max_" in str(exc):
            raise HeaderLimitError(
                f"header holds an array of more than {max(max_items, MAX_NDIM)} entries or "
                f"a map of more than {MAX_OPTIONS} ({exc})") from None
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, list) or len(header) < 2:
        raise ProtocolError("header must be a msgpack array [version, kind, ...]")
    version, kind = header[0], header[1]
    # Type checks first: a peer's value may be anything msgpack can carry (an ndarray
    # extension compares elementwise, a deeply nested list cannot be repr()-ed).
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {brief(version)} is not supported (this side speaks "
            f"{PROTOCOL_VERSION})")
    fields = HEADER_FIELDS.get(kind) if _is_int(kind) else None
    if fields is None:
        raise ProtocolError(f"unknown message kind {brief(kind)}")
    if expect is not None and kind != expect:
        raise ProtocolError(f"unexpected message kind {kind} (expected {expect})")
    if len(header) != fields + 2 and not (kind == REQUEST and len(header) == fields + 3):
        raise ProtocolError(
            f"message kind {kind} needs {fields} header fields"
            f"{' (or one more: options)' if kind == REQUEST else ''}, got {len(header) - 2}")
    return header


#: Bytes of a REQUEST header read by :func:`declared_request`: enough for ``[version,
#: kind, req_id, timeout_ms`` and the metas array's own header, whatever their encoding.
_DECLARED_PREFIX = 64


def declared_request(buf: Any) -> tuple[int, int] | None:
    """``(req_id, number of items)`` as a REQUEST header declares them (the number is the
    length of its metas array), read from the header's first bytes without decoding any
    item or meta; None when they are not the start of a REQUEST header. For refusing a
    request whose header was refused as a whole (too long, or an array over
    :func:`unpack_header`'s ``max_items``) with the right id and reason."""
    try:
        prefix = bytes(memoryview(buf).cast("B")[:_DECLARED_PREFIX])
        unpacker = msgpack.Unpacker(max_buffer_size=_DECLARED_PREFIX, max_str_len=16,
                                    max_bin_len=16, max_array_len=16, max_map_len=16,
                                    max_ext_len=16)
        unpacker.feed(prefix)
        if unpacker.read_array_header() < HEADER_FIELDS[REQUEST] + 2:
            return None
        version, kind = unpacker.unpack(), unpacker.unpack()
        if not (_is_int(version) and version == PROTOCOL_VERSION and _is_int(kind)
                and kind == REQUEST):
            return None
        req_id = unpacker.unpack()
        if not _is_int(req_id):
            return None
        unpacker.skip()  # timeout_ms
        return req_id, int(unpacker.read_array_header())
    except Exception:  # not msgpack, not that shape, or cut short: nothing declared
        return None


# -- items -------------------------------------------------------------------------------


def encode_item(value: Any, protocol: str, allow_pickle: bool = False) -> tuple[Any, Any]:
    """Encode one item as ``(meta, buffer)``; ``buffer`` may be sent with ``copy=False``.

    With ``protocol="numpy"`` every item becomes an ndarray; with ``"obj"`` ndarrays still
    travel raw and anything else is msgpack, or pickle with ``allow_pickle`` when msgpack
    cannot encode it.
    """
    if protocol == "numpy" and not isinstance(value, np.ndarray):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        dtype = value.dtype
        if dtype not in _PLAIN_DTYPES:
            _check_dtype(dtype)
            if dtype.kind not in "biufc":
                # A flat uint8 view exports a plain byte buffer for every dtype
                # (datetimes, bytes and str included).
                if not value.flags.c_contiguous:
                    value = np.ascontiguousarray(value)
                return [dtype.str, list(value.shape)], value.reshape(-1).view(np.uint8)
            _remember_plain(dtype)
        if not value.flags.c_contiguous:
            value = np.ascontiguousarray(value)
        # numbers and booleans export their buffer as they are (no view to make)
        return [dtype.str, list(value.shape)], value
    try:
        return MSGPACK_ITEM, msgpack.packb(value, use_bin_type=True, default=_ext_default)
    except (TypeError, ValueError, OverflowError) as exc:
        if allow_pickle:
            return PICKLE_ITEM, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        raise ProtocolError(
            f"cannot encode a value of type {type(value).__name__} with protocol 'obj' "
            f"(msgpack-able values and ndarrays only): {exc}"
        ) from None


def decode_item(meta: Any, buf: Any, allow_pickle: bool = False) -> Any:
    """Decode one item from its meta and buffer; raise :class:`ProtocolError` on bad data.

    Raw ndarrays are zero-copy views over ``buf`` (read-only when ``buf`` is). A pickled
    item is refused unless ``allow_pickle``.
    """
    if meta.__class__ is list:  # a raw array: the common case first
        dtype, shape = check_raw(meta, buf)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    if _is_int(meta) and meta == PICKLE_ITEM:
        if not allow_pickle:
            raise ProtocolError(
                "pickled item refused: pickle is off on this side (the server needs "
                "-allow_pickle, the client allow_pickle=True; both are unsafe with "
                "untrusted peers)")
        try:
            return pickle.loads(buf)
        except Exception as exc:
            raise ProtocolError(f"item is not a valid pickle ({type(exc).__name__}: {exc})"
                                ) from None
    if _is_int(meta) and meta == MSGPACK_ITEM:
        try:
            return msgpack.unpackb(buf, raw=False, strict_map_key=False, ext_hook=_ext_hook)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(
                f"item is not valid msgpack ({type(exc).__name__}: {exc})") from None
    dtype, shape = check_raw(meta, buf)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def check_raw(meta: Any, buf: Any) -> tuple[np.dtype, list[int]]:
    """Validate a raw-array item's ``[dtype, shape]`` meta against its buffer."""
    if not (meta.__class__ is list and len(meta) == 2):
        raise ProtocolError(f"item meta must be 0 or [dtype, shape], got {brief(meta)}")
    dtype = _DTYPES.get(meta[0]) if meta[0].__class__ is str else None
    if dtype is None:
        dtype = parse_dtype(meta[0])
    shape = meta[1]
    # What numpy can represent, so that viewing the buffer cannot fail later: at most
    # MAX_NDIM dimensions, and (empty arrays included) a byte size that fits an intp.
    if shape.__class__ is not list or len(shape) > MAX_NDIM:
        if shape.__class__ is list:
            raise ProtocolError(f"array has {len(shape)} dimensions (at most {MAX_NDIM})")
        raise ProtocolError(
            f"array shape must be a list of non-negative ints, got {brief(shape)}")
    count = 1
    nonzero = 1
    for d in shape:
        if d.__class__ is not int or d < 0:  # bool and other int subclasses too
            raise ProtocolError(
                f"array shape must be a list of non-negative ints, got {brief(shape)}")
        count *= d
        if d:
            nonzero *= d
    if nonzero * dtype.itemsize > _MAX_NBYTES:
        raise ProtocolError(f"array shape {brief(shape)} is too large")
    expected = count * dtype.itemsize
    nbytes = memoryview(buf).nbytes
    if nbytes != expected:
        raise ProtocolError(
            f"array declared as {dtype.str}{tuple(shape)} needs {expected} bytes, got {nbytes}"
        )
    return dtype, shape


def declared_nbytes(meta: Any) -> int:
    """The byte size a raw-array meta declares for its frame; -1 for a msgpack or pickle
    item, or a meta that is not valid (:func:`check_raw` refuses it when decoding)."""
    if meta.__class__ is not list or len(meta) != 2 or meta[1].__class__ is not list:
        return -1
    dtype = _DTYPES.get(meta[0]) if meta[0].__class__ is str else None
    try:
        size = (dtype or parse_dtype(meta[0])).itemsize
        for d in meta[1]:
            size *= int(d)
    except (ProtocolError, TypeError, ValueError, OverflowError):
        return -1
    return size if size >= 0 else -1


def check_metas(metas: list[Any], max_bytes: int | None = None) -> None:
    """Check the form of a request's item metas before the server queues them: each is
    ``0``, ``1`` or ``[dtype string, list of ints]`` (the values are checked against the
    item's buffer by :func:`check_raw` when the item is decoded). This bounds what a client
    can make the server nest into its internal messages.

    With ``max_bytes`` (the server's ``-max_msg_size``) a raw array's dtype is checked
    too, and the size it declares (itemsize times its shape's product) may be at most
    ``max_bytes``, for each item and for the request's items together: refused from
    the metas alone, before anything is allocated for them."""
    total = 0
    for n, meta in enumerate(metas):
        cls = meta.__class__
        if cls is int:
            if meta in (MSGPACK_ITEM, PICKLE_ITEM):
                continue
        elif (cls is list and len(meta) == 2 and meta[0].__class__ is str
              and meta[1].__class__ is list and len(meta[1]) <= MAX_NDIM
              and all(d.__class__ is int for d in meta[1])):
            if max_bytes is None:
                continue
            shape = meta[1]
            if min(shape, default=0) >= 0:  # else check_raw refuses it, allocating nothing
                size = math.prod(shape) * parse_dtype(meta[0]).itemsize
                if size > max_bytes:
                    raise ProtocolError(
                        f"item {n} declared as {meta[0]} {brief(shape)} would decode to "
                        f"{size} bytes, over the server's -max_msg_size of {max_bytes} bytes")
                total += size
                if total > max_bytes:
                    raise ProtocolError(
                        f"the request's arrays would decode to more than {max_bytes} bytes "
                        f"in all (the server's -max_msg_size, by item {n}): send them in "
                        "smaller requests")
            continue
        raise ProtocolError(f"item meta must be 0, 1 or [dtype, shape], got {brief(meta)}")


def brief(value: Any) -> str:
    """A short ``repr`` of a value a peer sent, safe for error messages and logs whatever
    it is (deeply nested, huge, an ndarray)."""
    return _BRIEF.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _BriefRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxstring = 60
        self.maxother = 60
        self.maxlong = 60

    def repr_bytes(self, x: bytes, level: int) -> str:
        text = repr(x[:self.maxstring])
        return text if len(x) <= self.maxstring else text + "..."

    def repr_ndarray(self, x: np.ndarray, level: int) -> str:
        return f"ndarray(dtype={x.dtype.str}, shape={x.shape})"


_BRIEF = _BriefRepr()
#: Most dimensions of an array on the wire (what this numpy supports: 32 before NumPy 2).
MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
_MAX_NBYTES = np.iinfo(np.intp).max


def parse_dtype(dtype_str: Any) -> np.dtype:
    """A wire dtype string as a numpy dtype; refuses object and structured dtypes."""
    if not isinstance(dtype_str, str) or len(dtype_str) > 16:  # before hashing, below
        raise ProtocolError(f"bad dtype {dtype_str!r}")
    dtype = _DTYPES.get(dtype_str)
    if dtype is None:
        try:
            dtype = np.dtype(dtype_str)
        except Exception:
            raise ProtocolError(f"bad dtype {dtype_str!r}") from None
        _check_dtype(dtype)
        if len(_DTYPES) < _DTYPES_MAX:
            _DTYPES[dtype_str] = dtype
    return dtype


#: Wire dtype strings already parsed and checked (at most :data:`_DTYPES_MAX`: a peer
#: may send any number of distinct strings).
_DTYPES: dict[str, np.dtype] = {}
_DTYPES_MAX = 256


_local = threading.local()  # per thread: a msgpack packer

#: Plain numeric and boolean dtypes already checked by :func:`encode_item` (a dtype is
#: checked once, not once per item); bounded, as callers may make any number of dtypes.
_PLAIN_DTYPES: set[np.dtype] = set()
_PLAIN_DTYPES_MAX = 256


def _remember_plain(dtype: np.dtype) -> None:
    if len(_PLAIN_DTYPES) < _PLAIN_DTYPES_MAX:
        _PLAIN_DTYPES.add(dtype)


def _check_dtype(dtype: np.dtype) -> None:
    if (dtype.kind not in _SAFE_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype
            or dtype.itemsize == 0):  # 'S0', 'U0': numpy cannot view a buffer as these
        raise ProtocolError(
            f"dtype {dtype} cannot travel on the wire (plain numeric, bool, bytes, str "
            "and datetime dtypes only; object arrays are refused)"
        )


def _ext_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        data = np.ascontiguousarray(obj).tobytes()
        return msgpack.ExtType(
            EXT_NDARRAY, msgpack.packb([obj.dtype.str, list(obj.shape), data], use_bin_type=True)
        )
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != EXT_NDARRAY:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    try:
        dtype_str, shape, raw = msgpack.unpackb(data, raw=False)
    except Exception:
        raise ProtocolError("malformed ndarray extension") from None
    return decode_item([dtype_str, shape], raw)
