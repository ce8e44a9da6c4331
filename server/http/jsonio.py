"""JSON in and out of the HTTP bridge, strict and bounded, on one library (orjson).

- :func:`loads` accepts only RFC 8259 JSON (``NaN`` and ``Infinity`` are not JSON and
  are refused) nested at most :data:`MAX_DEPTH` levels; anything else raises
  :class:`BadJSON` (a ``ValueError``) with a message fit for a 400 answer.
- :func:`dumps` writes compact UTF-8 JSON. numpy arrays and scalars are written
  directly; non-finite floats (a model's ``nan`` or ``inf``) become ``null``, so an
  answer is always valid JSON; bytes become base64 text.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

__all__ = ["MAX_DEPTH", "BadJSON", "check_depth", "dumps", "loads"]

#: Deepest nesting of arrays and objects accepted in a request (numpy arrays have at
#: most 64 dimensions; no API here needs more than a few levels).
MAX_DEPTH = 64

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class BadJSON(ValueError):
    """A request body that is not JSON this bridge accepts."""


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse a request body (see the module docstring)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadJSON(f"the body is not valid JSON: {exc}") from None
    if isinstance(value, (list, dict)) and (
            not isinstance(data, (bytes, bytearray))
            or data.count(b"[") + data.count(b"{") > MAX_DEPTH):  # else it cannot be deeper
        check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`BadJSON` if ``value`` nests lists and dicts deeper than ``limit``.

    Iterative, and it descends only into containers, so a long flat list costs one
    pass in C (``isinstance`` over its items) and a deep one stops at ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise BadJSON(f"the JSON is nested more than {limit} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (list, dict)))
        if len(stack) > 1_000_000:  # pragma: no cover - bounded by the body size anyway
            raise BadJSON("the JSON has too many nested containers")


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # what orjson does not write itself: strings,
        return value.tolist()          # objects, non-contiguous or big-endian arrays
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_NESTED = (np.ndarray, dict, list, tuple)


def _native(value: Any) -> Any:
    """``value`` with every array in it in native byte order: orjson writes the bytes of
    a big-endian array as if they were native (wrong numbers, silently)."""
    if isinstance(value, np.ndarray):
        return value.astype(value.dtype.newbyteorder("=")) if value.dtype.byteorder == ">" \
            else value
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, _NESTED) and _native(v) is not v:
                return {k: _native(v) for k, v in value.items()}
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, _NESTED) and _native(v) is not v:
                return [_native(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON bytes (see the module docstring)."""
    return orjson.dumps(_native(value), default=_default, option=_OPTIONS)
