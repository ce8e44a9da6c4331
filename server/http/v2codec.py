"""The Open Inference Protocol (KServe v2) codec: typed tensors in and out of JSON and
the binary tensor extension, apart from the routes (:mod:`.v2`) that use it.

Everything here is pure: it takes bytes, parsed JSON and the server's limits
(:class:`Limits`) and returns arrays (or raises :class:`V2Error` with the HTTP status that
reports the problem).

A request is checked before anything big is built from it: a compressed body inflates to
at most ``-http_max_body``; its JSON is parsed strictly (:mod:`.jsonio`); then every
input is planned (:func:`plan_inputs`) from its header alone: its batch (``shape[0]``)
against ``-max_request_items``, what it decodes to against ``-max_msg_size`` (each input
and the request together), and the length of its data (JSON, flat or nested, or binary)
against its shape; only then are arrays built (:func:`decode_input`) and rows made for
the server (:func:`rows_of`).
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from typing import Any, NamedTuple

import numpy as np

from . import jsonio

__all__ = ["DATATYPES", "HEADER_LENGTH", "MODEL_VERSION", "InputPlan", "Limits", "V2Error",
           "decode_input", "inflate", "plan_inputs", "rows_of",
           "split_body"]

SERVER_NAME = "wkr-serving"
PLATFORM = "wkr-serving"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"

#: v2 datatypes and the numpy dtype of their elements (little-endian on the wire).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_INT_NAMES = {1: "8", 2: "16", 4: "32", 8: "64"}
_LENGTH = struct.Struct("<I")


class V2Error(Exception):
    """A request that fails with HTTP ``status`` and the v2 body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def datatype_of(dtype: np.dtype) -> str | None:
    """The v2 datatype of a numpy dtype (None: it has none, e.g. complex)."""
    kind = dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "iu" and dtype.itemsize in _INT_NAMES:
        return ("INT" if kind == "i" else "UINT") + _INT_NAMES[dtype.itemsize]
    if kind == "f" and dtype.itemsize in (2, 4, 8):
        return "FP" + str(8 * dtype.itemsize)
    if kind in "SUO":
        return "BYTES"
    return None


# -- requests ----------------------------------------------------------------------------


class Limits(NamedTuple):
    """What one inference request may ask of the bridge (the server's options)."""

    #: ``-max_request_items``: most rows (the batch, ``shape[0]``) in one request.
    max_items: int
    #: ``-max_msg_size``: most bytes one input tensor, and the whole request, decode to
    #: (0 or less: no limit).
    max_bytes: int
    #: ``-http_max_body``: most bytes a gzip or deflate body inflates to.
    max_body: int


#: What one element of a BYTES tensor costs once decoded, beyond its bytes: its Python
#: object and its slot in the object array (and in the row's lists).
VALUE_BYTES = 64
#: What one row of one input costs once decoded: the array view (or list, or dict entry)
#: it becomes for the server.
ROW_BYTES = 128
#: Largest product of dims (times the item size) an array can have (numpy's own bound).
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max


def _max_dims() -> int:
    """The most dimensions a numpy array can have (64 since numpy 2, 32 before)."""
    try:
        np.empty((1,) * 64)
    except ValueError:
        return 32
    return 64


MAX_DIMS = _max_dims()


def inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """``body`` as sent with ``Content-Encoding: encoding`` ("" or identity: as it is),
    inflated to at most ``max_bytes`` (413 beyond: a compression bomb stops there)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported "
                           "(gzip, deflate or none)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise V2Error(400, f"the {encoding} body does not inflate: {exc}") from None
    if len(data) > max_bytes:
        raise V2Error(413, f"the {encoding} body inflates to more than {max_bytes} bytes "
                           "(-http_max_body)")
    if not inflater.eof:
        raise V2Error(400, f"the {encoding} body is truncated")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON inference header and the binary tensor data after it."""
    view = memoryview(body)
    if header_length is None:
        raw, tail = view, memoryview(b"")
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise V2Error(400, f"{HEADER_LENGTH} must be an integer, not "
                               f"{header_length[:40]!r}") from None
        if not 0 <= size <= len(body):
            raise V2Error(400, f"{HEADER_LENGTH} {size} is outside the body's "
                               f"{len(body)} bytes")
        raw, tail = view[:size], view[size:]
    try:
        header = jsonio.loads(raw)
    except jsonio.BadJSON as exc:
        raise V2Error(400, f"the inference request: {exc}") from None
    if not isinstance(header, dict):
        raise V2Error(400, "the inference request must be a JSON object")
    return header, tail


def _shape_of(name: str, shape: Any, itemsize: int) -> list[int]:
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise V2Error(400, f"input {name!r}: shape must be a non-empty list of "
                           f"non-negative ints (the first is the batch), not "
                           f"{_brief(shape)}")
    if len(shape) > MAX_DIMS:
        raise V2Error(400, f"input {name!r}: a shape of {len(shape)} dims, more than the "
                           f"{MAX_DIMS} an array can have")
    extent = itemsize  # what numpy checks: the nonzero dims times the item size
    for dim in shape:
        extent *= max(dim, 1)
        if extent > _MAX_ARRAY_BYTES:
            raise V2Error(400, f"input {name!r}: shape {_brief(shape)} is larger than any "
                               "array can be")
    return shape


def _brief(shape: Any) -> str:
    text = repr(shape)
    return text if len(text) <= 200 else text[:200] + "..."


def parameters_of(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise V2Error(400, f"{where}: parameters must be a JSON object")
    if any(str(k).startswith("shared_memory") for k in value):
        raise V2Error(400, f"{where}: shared memory is not supported")
    return value


def _count_values(data: Any, limit: int) -> int:
    """The values in the JSON ``data`` of a numeric tensor, flat or nested, without
    visiting them: a list whose first element is a list holds the values of its lists,
    any other list holds as many values as it is long (one of a list inside it then makes
    numpy refuse the data). Stops as soon as the count is over ``limit``."""
    total = 0
    stack = [iter((data,))]
    while stack:  # every step consumes one element of a list of lists (finite JSON)
        for value in stack[-1]:
            if isinstance(value, list) and value and isinstance(value[0], list):
                stack.append(iter(value))
                break
            total += len(value) if isinstance(value, list) else 1
            if total > limit:
                return total
        else:
            stack.pop()
    return total


def _strings(name: str, data: Any, count: int) -> list[Any]:
    """The elements of (possibly nested) JSON ``data`` for a BYTES tensor, row-major;
    one more than ``count`` at most."""
    out: list[Any] = []
    stack = [iter((data,))]
    while stack:  # every step consumes one element of the parsed (finite) JSON
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise V2Error(400, f"input {name!r}: BYTES data must hold strings, not "
                                   f"{type(value).__name__}")
            out.append(value)
            if len(out) > count:
                return out
        else:
            stack.pop()
    return out


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _count_bytes(name: str, chunk: memoryview, count: int) -> int:
    """The elements of a binary BYTES tensor (each a 4-byte little-endian length and that
    many bytes), counted without copying them; one more than ``count`` at most."""
    found, pos, end = 0, 0, len(chunk)
    while pos < end and found <= count:  # every step consumes at least 4 bytes
        if pos + 4 > end:
            raise V2Error(400, f"input {name!r}: BYTES data ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(chunk, pos)
        pos += 4 + length
        if pos > end:
            raise V2Error(400, f"input {name!r}: BYTES element of {length} bytes runs past "
                               "its binary data")
        found += 1
    return found


def _split_bytes(chunk: memoryview, count: int) -> list[Any]:
    """The ``count`` elements of a binary BYTES tensor checked by :func:`_count_bytes`."""
    out: list[Any] = []
    pos = 0
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(chunk, pos)
        out.append(bytes(chunk[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _mismatch(name: str, found: int, shape: list[int], count: int) -> V2Error:
    values = f"more than {count}" if found > count else str(found)
    return V2Error(400, f"input {name!r}: {values} values, its shape {_brief(shape)} "
                        f"holds {count}")


class InputPlan(NamedTuple):
    """One request input, checked against its shape and the limits, not decoded yet."""

    name: str
    datatype: str
    shape: list[int]
    #: Bytes it decodes to (see :func:`plan_inputs`).
    nbytes: int
    #: The JSON data (numeric), the strings (BYTES in JSON), or the binary chunk.
    data: Any


def plan_input(spec: Any, tail: memoryview, offset: int, limits: Limits
               ) -> tuple[InputPlan, int]:
    """``(plan, new_offset)`` of one request input: everything about it is checked from
    its header, and its data counted against its shape, before any array is built.

    Its batch (``shape[0]``) must be at most ``-max_request_items``; what it decodes to
    (elements times item size; for BYTES, the bytes of the elements and each element's
    Python object), plus what its rows cost as the server's items, at most
    ``-max_msg_size``."""
    if not isinstance(spec, dict):
        raise V2Error(400, "every input must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise V2Error(400, "every input needs a non-empty string name")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise V2Error(400, f"input {name!r}: datatype {datatype!r} is not supported (one of "
                           f"{', '.join(DATATYPES)})")
    dtype = DATATYPES[datatype]
    shape = _shape_of(name, spec.get("shape"), dtype.itemsize)
    if shape[0] > limits.max_items:
        raise V2Error(400, f"input {name!r}: a batch of {shape[0]} rows (shape[0]) is over "
                           f"the server's -max_request_items {limits.max_items}: send "
                           "smaller requests")
    count = math.prod(shape)
    max_bytes = limits.max_bytes if limits.max_bytes > 0 else None
    rows = shape[0] * ROW_BYTES

    def check_size(nbytes: int) -> int:
        if max_bytes is not None and nbytes + rows > max_bytes:
            raise V2Error(400, f"input {name!r} of shape {_brief(shape)} decodes to "
                               f"{nbytes + rows} bytes, more than the server's "
                               f"-max_msg_size {max_bytes}: send smaller requests")
        return nbytes

    params = parameters_of(f"input {name!r}", spec.get("parameters"))
    size = params.get("binary_data_size")
    data: Any
    if size is not None:
        if "data" in spec:
            raise V2Error(400, f"input {name!r}: both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise V2Error(400, f"input {name!r}: binary_data_size must be a non-negative int")
        if offset + size > len(tail):
            raise V2Error(400, f"input {name!r}: binary_data_size {size} runs past the "
                               f"{len(tail) - offset} bytes of binary data left")
        data = tail[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            nbytes = check_size(size + count * VALUE_BYTES)
            found = _count_bytes(name, data, count)
            if found != count:
                raise _mismatch(name, found, shape, count)
        else:
            nbytes = check_size(count * dtype.itemsize)
            if size != nbytes:
                raise V2Error(400, f"input {name!r}: {size} bytes of binary data, shape "
                                   f"{_brief(shape)} of {datatype} needs {nbytes}")
    elif "data" in spec:
        if datatype == "BYTES":
            data = _strings(name, spec["data"], count)
            if len(data) != count:
                raise _mismatch(name, len(data), shape, count)
            nbytes = check_size(sum(map(_utf8_size, data)) + count * VALUE_BYTES)
        else:
            nbytes = check_size(count * dtype.itemsize)
            data = spec["data"]
            found = _count_values(data, count)
            if found != count:
                raise _mismatch(name, found, shape, count)
    else:
        raise V2Error(400, f"input {name!r} has neither data nor binary_data_size")
    return InputPlan(name, datatype, shape, nbytes + rows, data), offset


def plan_inputs(specs: Any, tail: memoryview, limits: Limits) -> list[InputPlan]:
    """The plans of a request's inputs (:func:`plan_input`), all checked before any is
    decoded: distinct names, one batch, all binary data claimed, and together at most
    ``-max_msg_size``."""
    if not isinstance(specs, list) or not specs:
        raise V2Error(400, "the inference request needs a non-empty list of inputs")
    plans: list[InputPlan] = []
    names: set[str] = set()
    offset = total = 0
    for spec in specs:
        plan, offset = plan_input(spec, tail, offset, limits)
        if plan.name in names:
            raise V2Error(400, f"input {plan.name!r} is given twice")
        names.add(plan.name)
        total += plan.nbytes
        if 0 < limits.max_bytes < total:
            raise V2Error(400, f"the request's inputs decode to more than the server's "
                               f"-max_msg_size {limits.max_bytes} bytes together (at "
                               f"{total} with input {plan.name!r}): send smaller requests")
        plans.append(plan)
    if offset != len(tail):
        raise V2Error(400, f"{len(tail) - offset} bytes of binary data belong to no input")
    batch = plans[0].shape[0]
    if any(p.shape[0] != batch for p in plans):
        raise V2Error(400, "every input needs the same first (batch) dimension, not "
                           f"shapes {', '.join(_brief(p.shape) for p in plans)}")
    if batch == 0:
        raise V2Error(400, "the batch (first dimension) is empty")
    return plans


def decode_input(plan: InputPlan) -> np.ndarray:
    """The tensor of a planned input, of its shape and datatype."""
    name, datatype, shape, _, data = plan
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        values = _split_bytes(data, math.prod(shape)) if isinstance(data, memoryview) \
            else data
        return _object_array(values).reshape(shape)
    if isinstance(data, memoryview):
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            tensor = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise V2Error(400, f"input {name!r}: data is not an array of {datatype}: "
                           f"{exc}") from None
    if tensor.size != math.prod(shape):  # only nested data numpy reads otherwise
        raise _mismatch(name, tensor.size, shape, math.prod(shape))
    if dtype.kind == "f" and not np.isfinite(tensor).all():
        raise V2Error(400, f"input {name!r}: JSON data of {datatype} must be finite numbers "
                           "in its range (null, NaN and Infinity are not)")
    return tensor.reshape(shape)


def rows_of(tensor: np.ndarray, protocol: str, max_bytes: int = -1) -> list[Any]:
    """The rows (first dimension) of an input tensor as items for the server.

    With ``-protocol numpy`` a BYTES tensor becomes a fixed-width bytes or str array
    (every element as wide as the longest, four bytes a character for str): that array
    must fit ``max_bytes`` (``-max_msg_size``; 0 or less: no limit), checked before it
    is built."""
    n = tensor.shape[0]
    if tensor.dtype.kind == "O":
        if protocol == "numpy":  # bytes or str arrays: the numpy wire carries no objects
            flat = tensor.reshape(-1)
            text = all(isinstance(v, str) for v in flat)
            width = max((len(v) for v in flat), default=0) * (4 if text else 1)
            if 0 < max_bytes < width * flat.size:
                raise V2Error(400, f"this server (-protocol numpy) sends BYTES as "
                                   f"fixed-width arrays: {flat.size} elements as wide as the "
                                   f"longest are {width * flat.size} bytes, more than its "
                                   f"-max_msg_size {max_bytes}: send elements of more even "
                                   "lengths, or smaller requests")
            tensor = np.array(tensor.tolist(), dtype=str if text else bytes).reshape(
                tensor.shape)
        elif tensor.ndim == 1:
            return tensor.tolist()
        else:
            return [tensor[i].tolist() for i in range(n)]
    return [tensor[i, ...] for i in range(n)]


# -- responses ---------------------------------------------------------------------------


def as_array(output: str, value: Any) -> np.ndarray:
    """One row of an output as an array (object dtype for strings and bytes)."""
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (str, bytes)):
        array = np.empty((), dtype=object)
        array[()] = value
    elif isinstance(value, (bool, int, float, np.generic)):
        array = np.asarray(value)
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
            if array.dtype.kind in "SU":  # 'S' would drop trailing NUL bytes
                array = np.array(value, dtype=object)
        except (TypeError, ValueError, OverflowError) as exc:
            raise V2Error(500, f"output {output!r}: the model's value is not a regular "
                               f"array: {exc}") from None
    else:
        raise V2Error(500, f"output {output!r}: a {type(value).__name__} returned by the "
                           "model cannot be a v2 tensor")
    if datatype_of(array.dtype) is None:
        raise V2Error(500, f"output {output!r}: dtype {array.dtype} has no v2 datatype")
    return array


def stack_rows(output: str, values: list[Any]) -> np.ndarray:
    """The model's per-row values of one output, stacked into a tensor."""
    arrays = [as_array(output, v) for v in values]
    shape = arrays[0].shape
    for array in arrays:
        if array.shape != shape:
            raise V2Error(500, f"output {output!r}: rows of different shapes ({shape} and "
                               f"{array.shape}) do not make a tensor")
    if any(a.dtype.kind in "SUO" for a in arrays):
        out = np.empty((len(arrays), *shape), dtype=object)
        for i, array in enumerate(arrays):
            out[i, ...] = array
        return out
    return np.stack(arrays)


def encode_output(name: str, tensor: np.ndarray, binary: bool
                  ) -> tuple[dict[str, Any], bytes | None]:
    """The response entry of one output and, when binary, its raw bytes."""
    datatype = datatype_of(tensor.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
    if datatype == "BYTES":
        values = tensor.reshape(-1).tolist()
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise V2Error(500, f"output {name!r}: BYTES elements must be str or bytes")
        if binary:
            encoded = [v.encode() if isinstance(v, str) else v for v in values]
            raw = b"".join(_LENGTH.pack(len(v)) + v for v in encoded)
            entry["parameters"] = {"binary_data_size": len(raw)}
            return entry, raw
        try:
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in values]
        except UnicodeDecodeError:
            raise V2Error(400, f"output {name!r} holds bytes that are not UTF-8: ask for it "
                               "with binary_data") from None
        return entry, None
    if binary:
        raw = np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = tensor.reshape(-1)  # written by jsonio.dumps (non-finite: null)
    return entry, None


def output_columns(results: list[Any], requested: list[str]) -> dict[str, list[Any]]:
    """The model's results as ``{output_name: [value per row]}``."""
    dicts = [isinstance(r, dict) for r in results]
    if all(dicts):
        keys = list(results[0])
        for result in results:
            if list(result) != keys:
                raise V2Error(500, "the model returned dicts with different keys for the "
                                   f"rows of one request ({keys} and {list(result)})")
        return {str(k): [r[k] for r in results] for k in keys}
    if any(dicts):
        raise V2Error(500, "the model returned a dict for some rows and not for others")
    if len(requested) > 1:
        raise V2Error(400, f"the model has one output; the request asks for {requested}")
    return {requested[0] if requested else "OUTPUT0": results}


# -- metadata ----------------------------------------------------------------------------


class Signature:
    """The tensors of the latest requests (per bridge process), for model metadata."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inputs: list[tuple[str, str, tuple[int, ...]]] | None = None
        self.outputs: list[tuple[str, str, tuple[int, ...]]] | None = None

    def update(self, inputs: list[tuple[str, str, tuple[int, ...]]],
               outputs: list[tuple[str, str, tuple[int, ...]]]) -> None:
        if inputs == self.inputs and outputs == self.outputs:
            return
        with self._lock:
            self.inputs = _merge(self.inputs, inputs)
            self.outputs = _merge(self.outputs, outputs)

    def describe(self, backend: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        inputs, outputs = self.inputs, self.outputs
        if inputs is None or outputs is None:
            placeholder = "FP32" if backend.protocol == "numpy" else "BYTES"
            inputs = [_seen("INPUT0", backend.seen_values().get("input"), placeholder)]
            outputs = [_seen("OUTPUT0", backend.seen_values().get("output"), placeholder)]
        return ([{"name": n, "datatype": d, "shape": [-1, *s]} for n, d, s in inputs],
                [{"name": n, "datatype": d, "shape": [-1, *s]} for n, d, s in outputs])


def _merge(old: list[tuple[str, str, tuple[int, ...]]] | None,
           new: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``new``, with the dims that differ from ``old`` as -1 when both have the same
    tensor names, datatypes and ranks."""
    if old is None or [(n, d, len(s)) for n, d, s in old] != [(n, d, len(s)) for n, d, s in new]:
        return new
    return [(n, d, tuple(a if a == b else -1 for a, b in zip(s, t, strict=True)))
            for (n, d, s), (_, _, t) in zip(old, new, strict=True)]


def _seen(name: str, seen: Any, placeholder: str) -> tuple[str, str, tuple[int, ...]]:
    """A tensor from what ``/encode`` saw (an ndarray item), else the placeholder."""
    if isinstance(seen, dict) and "dtype" in seen:
        datatype = datatype_of(np.dtype(seen["dtype"]))
        if datatype is not None:
            return name, datatype, tuple(seen["shape"])
    return name, placeholder, ()


def timeout_ms_of(value: Any) -> int | None:
    """``parameters.timeout`` (microseconds) as the call timeout in milliseconds."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise V2Error(400, "parameters.timeout must be a positive int (microseconds)")
    return max(1, math.ceil(value / 1000))


def requested_outputs(value: Any, default_binary: bool) -> tuple[list[tuple[str, bool]], bool]:
    """``[(name, binary)]`` of the outputs a request asks for, and the default binary."""
    if value is None:
        return [], default_binary
    if not isinstance(value, list):
        raise V2Error(400, "outputs must be a list")
    requested: list[tuple[str, bool]] = []
    for spec in value:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise V2Error(400, "every requested output needs a string name")
        params = parameters_of(f"output {spec['name']!r}", spec.get("parameters"))
        if params.get("classification"):
            raise V2Error(400, f"output {spec['name']!r}: classification is not supported")
        requested.append((spec["name"], bool(params.get("binary_data", default_binary))))
    return requested, default_binary
