"""The Open Inference Protocol (KServe v2) codec: typed tensors in and out of JSON and
the binary tensor extension, apart from the routes (:mod:`.v2`) that use it.

Everything here is pure: it takes bytes and parsed JSON and returns arrays (or raises
:class:`V2Error` with the HTTP status that reports the problem).
"""

from __future__ import annotations

import json
import math
import struct
import threading
from typing import Any

import numpy as np

__all__ = ["DATATYPES", "HEADER_LENGTH", "MODEL_VERSION", "V2Error", "parse_input",
           "rows_of"]

SERVER_NAME = "wkr-serving"
PLATFORM = "wkr-serving"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Largest body a gzip or deflate request may inflate to (a compression bomb stops here).
MAX_INFLATED_BYTES = 256 << 20

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


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON inference header and the binary tensor data after it."""
    if header_length is None:
        raw, tail = body, memoryview(b"")
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise V2Error(400, f"{HEADER_LENGTH} must be an integer, not "
                               f"{header_length[:40]!r}") from None
        if not 0 <= size <= len(body):
            raise V2Error(400, f"{HEADER_LENGTH} {size} is outside the body's "
                               f"{len(body)} bytes")
        view = memoryview(body)
        raw, tail = bytes(view[:size]), view[size:]
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise V2Error(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise V2Error(400, "the inference request must be a JSON object")
    return header, tail


def _shape_of(name: str, shape: Any) -> list[int]:
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise V2Error(400, f"input {name!r}: shape must be a non-empty list of "
                           f"non-negative ints (the first is the batch), not {shape!r}")
    return shape


def parameters_of(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise V2Error(400, f"{where}: parameters must be a JSON object")
    if any(str(k).startswith("shared_memory") for k in value):
        raise V2Error(400, f"{where}: shared memory is not supported")
    return value


def _strings(name: str, data: Any, count: int) -> list[Any]:
    """The elements of (possibly nested) JSON ``data`` for a BYTES tensor, row-major."""
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
                raise V2Error(400, f"input {name!r}: more than the {count} values its "
                                   "shape holds")
        else:
            stack.pop()
    return out


def _split_bytes(name: str, chunk: memoryview, count: int) -> list[Any]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length and
    that many bytes."""
    out: list[Any] = []
    pos, end = 0, len(chunk)
    while pos < end:  # every step consumes at least 4 bytes
        if pos + 4 > end:
            raise V2Error(400, f"input {name!r}: BYTES data ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(chunk, pos)
        pos += 4
        if pos + length > end:
            raise V2Error(400, f"input {name!r}: BYTES element of {length} bytes runs past "
                               "its binary data")
        out.append(bytes(chunk[pos:pos + length]))
        pos += length
        if len(out) > count:
            raise V2Error(400, f"input {name!r}: more than the {count} values its shape "
                               "holds")
    return out


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def parse_input(spec: Any, tail: memoryview, offset: int) -> tuple[str, str, np.ndarray, int]:
    """``(name, datatype, tensor, new_offset)`` of one request input."""
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
    shape = _shape_of(name, spec.get("shape"))
    count = math.prod(shape)
    params = parameters_of(f"input {name!r}", spec.get("parameters"))
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise V2Error(400, f"input {name!r}: both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise V2Error(400, f"input {name!r}: binary_data_size must be a non-negative int")
        if offset + size > len(tail):
            raise V2Error(400, f"input {name!r}: binary_data_size {size} runs past the "
                               f"{len(tail) - offset} bytes of binary data left")
        chunk = tail[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            values = _split_bytes(name, chunk, count)
            if len(values) != count:
                raise V2Error(400, f"input {name!r}: {len(values)} BYTES elements, its shape "
                                   f"{shape} holds {count}")
            tensor = _object_array(values)
        else:
            if size != count * dtype.itemsize:
                raise V2Error(400, f"input {name!r}: {size} bytes of binary data, shape "
                                   f"{shape} of {datatype} needs {count * dtype.itemsize}")
            tensor = np.frombuffer(chunk, dtype=dtype)
    elif "data" in spec:
        data = spec["data"]
        if datatype == "BYTES":
            values = _strings(name, data, count)
            if len(values) != count:
                raise V2Error(400, f"input {name!r}: {len(values)} values, its shape "
                                   f"{shape} holds {count}")
            tensor = _object_array(values)
        else:
            try:
                tensor = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise V2Error(400, f"input {name!r}: data is not an array of {datatype}: "
                                   f"{exc}") from None
            if tensor.size != count:
                raise V2Error(400, f"input {name!r}: {tensor.size} values, its shape "
                                   f"{shape} holds {count}")
    else:
        raise V2Error(400, f"input {name!r} has neither data nor binary_data_size")
    return name, datatype, tensor.reshape(shape), offset


def rows_of(tensor: np.ndarray, protocol: str) -> list[Any]:
    """The rows (first dimension) of an input tensor as items for the server."""
    n = tensor.shape[0]
    if tensor.dtype.kind == "O":
        if protocol == "numpy":  # bytes or str arrays: the numpy wire carries no objects
            text = all(isinstance(v, str) for v in tensor.reshape(-1))
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
    entry["data"] = tensor.reshape(-1).tolist()
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
