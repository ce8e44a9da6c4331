"""The Open Inference Protocol (KServe v2) route cannot be used to blow up memory.

End to end over HTTP against real servers (``-http_port 0``), requests sent with the
stdlib ``http.client`` (the official client refuses to build most of them):

- a declared batch (``shape[0]``) over ``-max_request_items`` is refused from the shape,
  before any array or row exists: fast, and the bridge's memory does not grow (a
  ``[3000000]`` input used to become 3M items: +1.5 GB and a 400 only after ~28 s);
- a batch of exactly ``-max_request_items`` rows still works;
- the decoded size of each input tensor, and of the request, is bounded by
  ``-max_msg_size`` (so is a BYTES tensor made a fixed-width array for ``-protocol
  numpy``); the data must hold as many values as the shape says, checked before the
  array is built; shapes whose product overflows are a 400, not a crash;
- a gzip or deflate body inflates to at most ``-http_max_body`` (413 beyond);
- JSON is strict (no ``NaN``/``Infinity``, at most 64 levels deep) and answers are valid
  JSON (a non-finite output value is ``null``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
from helpers import serve
from wkr_serving.server import WKRServer
from workers import EchoWorker

HEADER_LENGTH = "Inference-Header-Content-Length"
INFER = "/v2/models/EchoWorker/infer"
#: Seconds one request of these tests may take (the box is slow and shared); the checks
#: that must be fast assert their own, much smaller, bound.
HTTP_LIMIT_S = 60.0
#: How fast a request refused from its header must be answered, and how much the
#: bridge's memory may grow while it is (generous: the box is slow and shared).
FAST_S = 2.0
GROWTH_LIMIT = 100 << 20
#: The tight server's limits.
TIGHT_ITEMS = 64
TIGHT_BYTES = 1 << 20


# -- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol numpy, the default limits (-max_request_items 10000,
    -max_msg_size 256 MiB, -http_max_body 64 MiB)."""
    yield from serve(tmp_path_factory, "v2_limits_wide", EchoWorker, "-protocol", "numpy",
                     "-num_worker", "1", "-batch_size", "8", "-cpu", "-http_port", "0")


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol obj (several inputs), -max_request_items 64 and
    -max_msg_size 1 MiB."""
    yield from serve(tmp_path_factory, "v2_limits_tight", EchoWorker, "-protocol", "obj",
                     "-num_worker", "1", "-batch_size", "8", "-cpu", "-http_port", "0",
                     "-max_request_items", str(TIGHT_ITEMS),
                     "-max_msg_size", str(TIGHT_BYTES))


# -- requests ----------------------------------------------------------------------------


def post(server: WKRServer, body: bytes, headers: dict[str, str] | None = None,
         path: str = INFER) -> tuple[int, Any, bytes, float]:
    """One POST on a new connection: ``(status, headers, raw body, seconds)``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=HTTP_LIMIT_S)
    try:
        started = time.perf_counter()
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        return response.status, response.headers, raw, time.perf_counter() - started
    finally:
        conn.close()


def infer(server: WKRServer, *inputs: dict[str, Any], **fields: Any) -> tuple[int, Any]:
    """A JSON inference request: ``(status, reply parsed strictly)``."""
    status, _, raw, _ = post(server, json.dumps({"inputs": list(inputs), **fields}).encode())
    return status, orjson.loads(raw)


def error_of(status: int, reply: Any, expected: int = 400) -> str:
    """The v2 error message of a reply that must have failed with ``expected``."""
    assert status == expected, reply
    assert isinstance(reply, dict) and isinstance(reply.get("error"), str), reply
    return str(reply["error"])


def binary_request(*tensors: tuple[str, str, list[int], bytes]) -> tuple[bytes, dict[str, str]]:
    """A body with the binary tensor extension: ``(name, datatype, shape, raw)`` each."""
    header = json.dumps({"inputs": [
        {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(r)}}
        for n, d, s, r in tensors]}).encode()
    return (b"".join([header, *(r for *_, r in tensors)]),
            {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"})


def fp32(name: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "data": data}


def still_serves(server: WKRServer) -> None:
    """An ordinary request still gets its answer."""
    status, reply = infer(server, {"name": "x", "datatype": "INT32", "shape": [2, 2],
                                   "data": [1, 2, 3, 4]})
    assert status == 200, reply
    assert reply["outputs"][0]["data"] == [1, 2, 3, 4]


# -- the bridge's memory -----------------------------------------------------------------


def bridge_processes(server: WKRServer) -> list[psutil.Process]:
    """The processes of this test's server that listen on its HTTP port."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port
                   == server.http_port for c in proc.net_connections(kind="tcp")):
                found.append(proc)
    assert found, f"no process listens on HTTP port {server.http_port}"
    return found


def _high_water_mark(pid: int) -> int | None:
    """The peak RSS (bytes) of ``pid`` since it was last reset, or None (not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class MemoryGrowth:
    """How much the RSS of ``procs`` grew over a block, at its peak where the kernel
    lets the peak be reset (``/proc/PID/clear_refs``), else at the end of the block."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs
        self.before: dict[int, int] = {}
        self.peak_reset: dict[int, bool] = {}

    def __enter__(self) -> MemoryGrowth:
        for proc in self.procs:
            try:
                with open(f"/proc/{proc.pid}/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")  # the high-water mark restarts from the current RSS
                self.peak_reset[proc.pid] = True
            except OSError:
                self.peak_reset[proc.pid] = False
            self.before[proc.pid] = proc.memory_info().rss
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def grown(self) -> int:
        """Bytes grown, summed over the processes."""
        total = 0
        for proc in self.procs:
            after = proc.memory_info().rss
            if self.peak_reset[proc.pid]:
                after = max(after, _high_water_mark(proc.pid) or 0)
            total += after - self.before[proc.pid]
        return total


# -- the batch dimension -----------------------------------------------------------------

HUGE = 3_000_000


def _huge_request(kind: str) -> tuple[bytes, dict[str, str]]:
    if kind == "short_json":  # the shape says 3M, the data holds 3
        spec = {"name": "x", "datatype": "INT32", "shape": [HUGE], "data": [1, 2, 3]}
        return json.dumps({"inputs": [spec]}).encode(), {}
    if kind == "full_json":  # all of it, as JSON (6 MB)
        data = b"1," * (HUGE - 1) + b"1"
        return (b'{"inputs":[{"name":"x","datatype":"INT32","shape":[%d],"data":[%s]}]}'
                % (HUGE, data), {})
    assert kind == "full_binary"  # all of it, as binary FP32 (12 MB)
    return binary_request(("x", "FP32", [HUGE], np.ones(HUGE, "<f4").tobytes()))


#: Per kind of request: the bound on its answer's time (s) and on the bridge's growth
#: (bytes). Parsing 3M JSON numbers is the JSON parser's cost, before the route sees
#: the shape (orjson's own document, then a Python list of 3M values: about 12 bytes per
#: body byte at the peak, and up to a second on a loaded box), so that kind gets more.
HUGE_BOUNDS = {"short_json": (FAST_S, GROWTH_LIMIT), "full_binary": (FAST_S, GROWTH_LIMIT),
               "full_json": (2.5 * FAST_S, 2 * GROWTH_LIMIT)}


@pytest.mark.parametrize("kind", list(HUGE_BOUNDS))
def test_batch_over_max_request_items_is_refused_from_the_shape(wide, kind):
    """An input of shape [3000000] is a 400 naming -max_request_items, answered fast,
    with no growth of the bridge's memory beyond the body itself (no array, no rows),
    and the server serves on. (It used to become 3M items first: 60 s, +1.5 GB.)"""
    body, headers = _huge_request(kind)
    limit_s, limit_bytes = HUGE_BOUNDS[kind]
    procs = bridge_processes(wide)
    with MemoryGrowth(procs) as memory:
        status, _, raw, seconds = post(wide, body, headers)
    grown = memory.grown()
    message = error_of(status, orjson.loads(raw))
    assert "-max_request_items" in message and "10000" in message, message
    assert seconds < limit_s, f"refused after {seconds:.1f} s"
    assert grown < limit_bytes, f"the bridge grew by {grown / 2**20:.0f} MiB"
    still_serves(wide)


def test_batch_of_exactly_max_request_items_works(tight):
    """64 rows (-max_request_items 64) are served, in JSON and binary; 65 are refused
    from the shape, and so is an input of another name whose batch is over it."""
    x = np.arange(TIGHT_ITEMS * 3, dtype=np.float32).reshape(TIGHT_ITEMS, 3)
    status, reply = infer(tight, fp32("x", list(x.shape), x.reshape(-1).tolist()))
    assert status == 200, reply
    assert reply["outputs"][0]["shape"] == [TIGHT_ITEMS, 3]
    assert reply["outputs"][0]["data"] == x.reshape(-1).tolist()
    body, headers = binary_request(("x", "FP32", list(x.shape), x.astype("<f4").tobytes()))
    status, _, raw, _ = post(tight, body, headers)
    assert status == 200, raw[:300]
    over = np.zeros((TIGHT_ITEMS + 1, 3), dtype=np.float32)
    status, reply = infer(tight, fp32("x", list(over.shape), over.reshape(-1).tolist()))
    message = error_of(status, reply)
    assert "-max_request_items" in message and str(TIGHT_ITEMS) in message, message
    # the second input is the one over the limit (the batches also differ: refused first
    # for the limit, since nothing is built before the limits are checked)
    status, reply = infer(tight, fp32("a", [1], [1.0]), fp32("b", [TIGHT_ITEMS + 1], [0.0]))
    message = error_of(status, reply)
    assert "-max_request_items" in message and "'b'" in message, message


# -- the data against the shape ----------------------------------------------------------


def test_data_of_the_wrong_length_is_400(wide):
    """Within the limits, data that does not hold what the shape says is a 400 naming
    both counts, found by counting (nested lists included) before any array is built."""
    cases = [
        (fp32("x", [8, 4], [1.0] * 5), "5 values", "holds 32"),
        (fp32("x", [2], [1.0] * 1000), "more than 2 values", "holds 2"),
        (fp32("x", [2, 2], [[1.0, 2.0], [3.0]]), "3 values", "holds 4"),  # ragged
        (fp32("x", [2, 3], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]),
         "more than 6 values", "holds 6"),
        (fp32("x", [3, 2], []), "0 values", "holds 6"),
        ({"name": "s", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]},
         "2 values", "holds 3"),
        ({"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["b"], ["c"]]},
         "more than 2 values", "holds 2"),
    ]
    for spec, counted, declared in cases:
        message = error_of(*infer(wide, spec))
        assert counted in message and declared in message, (spec, message)
    # binary: a chunk of the wrong size for the shape, BYTES elements not as many
    body, headers = binary_request(("x", "FP32", [2, 3], b"\0" * 20))
    status, _, raw, _ = post(wide, body, headers)
    message = error_of(status, orjson.loads(raw))
    assert "20 bytes" in message and "needs 24" in message, message
    elements = b"".join(struct.pack("<I", 1) + b"z" for _ in range(5))
    body, headers = binary_request(("s", "BYTES", [4], elements))
    status, _, raw, _ = post(wide, body, headers)
    message = error_of(status, orjson.loads(raw))
    assert "more than 4" in message and "holds 4" in message, message
    still_serves(wide)


def test_absurd_shapes_are_400(wide):
    """Shapes whose product overflows, or with more dims than an array can have, are a
    400 (they used to reach numpy's reshape and come back as 500)."""
    for shape in ([1, 2**62, 2**62, 0], [1, 0, 2**63 - 1, 2**63 - 1], [2**63 - 1] * 3,
                  [1, 0, 2**62], [1, 2**64 - 1]):
        message = error_of(*infer(wide, fp32("x", shape, [])))
        assert "shape" in message, (shape, message)
    message = error_of(*infer(wide, fp32("x", [1] * 65, [1.0])))  # numpy's most: 64
    assert "dims" in message, message
    still_serves(wide)


# -- the decoded size --------------------------------------------------------------------


def test_decoded_size_over_max_msg_size_is_400(tight):
    """-max_msg_size 1 MiB: a tensor that decodes to more is a 400 naming it, refused from
    its header when its data is short; so are BYTES data of more bytes, and a request
    whose inputs together decode to more (each row of each input counting as the value
    the server gets)."""
    # 300,000 FP32 elements are 1.2 MB: refused before the 2 values are even counted
    message = error_of(*infer(tight, fp32("x", [1, 300_000], [1.0, 2.0])))
    assert "-max_msg_size" in message and str(TIGHT_BYTES) in message, message
    # and the same as binary data, all of it there
    raw = np.zeros(300_000, "<f4").tobytes()
    body, headers = binary_request(("x", "FP32", [1, 300_000], raw))
    status, _, answer, _ = post(tight, body, headers)
    message = error_of(status, orjson.loads(answer))
    assert "-max_msg_size" in message, message
    # two inputs of 640 KB each: each is under the limit, the request is not
    half = np.zeros((4, 40_000), "<f4").tobytes()
    body, headers = binary_request(("a", "FP32", [4, 40_000], half),
                                   ("b", "FP32", [4, 40_000], half))
    status, _, answer, _ = post(tight, body, headers)
    message = error_of(status, orjson.loads(answer))
    assert "-max_msg_size" in message and "request" in message, message
    # BYTES: the bytes of the data count, in JSON and binary alike
    long = "x" * (TIGHT_BYTES + 1)
    message = error_of(*infer(tight, {"name": "s", "datatype": "BYTES", "shape": [1],
                                      "data": [long]}))
    assert "-max_msg_size" in message, message
    body, headers = binary_request(
        ("s", "BYTES", [1], struct.pack("<I", len(long)) + long.encode()))
    status, _, answer, _ = post(tight, body, headers)
    message = error_of(status, orjson.loads(answer))
    assert "-max_msg_size" in message, message
    # no data at all, but 1,000 inputs of 64 rows are 64,000 values the bridge would make
    # for the server (a dict entry and an array each): they count too
    status, reply = infer(tight, *(fp32(f"x{i}", [TIGHT_ITEMS, 0], []) for i in range(1000)))
    message = error_of(status, reply)
    assert "-max_msg_size" in message and "together" in message, message
    # within the limits still works
    status, reply = infer(tight, fp32("x", [2, 1000], [0.5] * 2000))
    assert status == 200, reply
    status, reply = infer(tight, *(fp32(f"x{i}", [TIGHT_ITEMS, 0], []) for i in range(8)))
    assert status == 200 and len(reply["outputs"]) == 8, reply


def test_bytes_as_fixed_width_arrays_are_bounded(wide):
    """-protocol numpy sends BYTES as a fixed-width array, every element as wide as the
    longest (four bytes a character for text): 10,000 elements, one of them 7,000
    characters, would be a 280 MB array from a 37 KB body. A 400 naming -max_msg_size,
    before the array is built; elements of even lengths still work."""
    data = ["x" * 7000] + [""] * 9999
    procs = bridge_processes(wide)
    with MemoryGrowth(procs) as memory:
        status, _, raw, seconds = post(wide, json.dumps({"inputs": [
            {"name": "s", "datatype": "BYTES", "shape": [len(data)], "data": data}]}).encode())
    grown = memory.grown()
    message = error_of(status, orjson.loads(raw))
    assert "-max_msg_size" in message and "fixed-width" in message, message
    assert seconds < FAST_S, f"refused after {seconds:.1f} s"
    assert grown < GROWTH_LIMIT, f"the bridge grew by {grown / 2**20:.0f} MiB"
    status, reply = infer(wide, {"name": "s", "datatype": "BYTES", "shape": [3, 1],
                                 "data": ["ab", "cd", "ef"]})
    assert status == 200 and reply["outputs"][0]["data"] == ["ab", "cd", "ef"], reply


# -- compressed bodies -------------------------------------------------------------------


def compression_bomb(encoding: str, size: int) -> bytes:
    """A valid gzip or deflate body of ``size`` zero bytes (about 1 KB per MiB), made
    without compressing them all: after a full flush, the compressor's output for the
    next MiB of zeros is the same chunk again."""
    mib = b"\0" * (1 << 20)
    assert size % len(mib) == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = chunk * (size // len(mib)) + compressor.flush()
    if encoding == "gzip":
        crc = 0
        for _ in range(size // len(mib)):
            crc = zlib.crc32(mib, crc)
        return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + stream
                + struct.pack("<II", crc, size & 0xFFFFFFFF))
    adler = 1
    for _ in range(size // len(mib)):
        adler = zlib.adler32(mib, adler)
    return b"\x78\xda" + stream + struct.pack(">I", adler)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body_inflating_past_http_max_body_is_413(wide, encoding):
    """-http_max_body 64 MiB: a 72 KB body that inflates to 72 MiB is a 413 naming the
    limit (the route used to inflate up to 256 MiB); one inflating to less is served."""
    bomb = compression_bomb(encoding, 72 << 20)
    assert len(bomb) < 100_000
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        assert len(inflater.decompress(bomb, 1 << 20)) == 1 << 20  # a valid stream
    status, _, raw, _ = post(wide, bomb, {"Content-Encoding": encoding})
    message = error_of(status, orjson.loads(raw), 413)
    assert "-http_max_body" in message, message
    body = json.dumps({"inputs": [fp32("x", [2], [1.5, 2.5])]}).encode()
    packed = zlib.compress(body) if encoding == "deflate" else zlib.compress(body, wbits=31)
    status, _, raw, _ = post(wide, packed, {"Content-Encoding": encoding})
    assert status == 200 and orjson.loads(raw)["outputs"][0]["data"] == [1.5, 2.5]


# -- strict JSON -------------------------------------------------------------------------


def test_non_finite_json_numbers_are_400(wide):
    """NaN and Infinity are not JSON: a 400 in any request, and values that decode to
    non-finite floats in a JSON FP32 input (null, 1e39) are refused too."""
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1.0,%s]}]}' \
            % literal
        status, _, raw, _ = post(wide, body)
        message = error_of(status, orjson.loads(raw))
        assert "JSON" in message, message
    for value in (None, 1e39):
        message = error_of(*infer(wide, fp32("x", [2], [1.0, value])))
        assert "finite" in message, message
    still_serves(wide)


def test_json_nested_deeper_than_64_levels_is_400(wide):
    """Nesting deeper than 64 levels is a 400 wherever it is in the request (here in the
    request's parameters, which the route otherwise ignores); 60 levels are fine."""
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    status, reply = infer(wide, fp32("x", [2], [1.0, 2.0]),
                          parameters={"note": nested(100)})
    message = error_of(status, reply)
    assert "64" in message and "nested" in message, message
    status, _, raw, _ = post(wide, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "error" in orjson.loads(raw)
    status, reply = infer(wide, fp32("x", [2], [1.0, 2.0]), parameters={"note": nested(60)})
    assert status == 200, reply


def test_non_finite_outputs_are_null_in_json(wide):
    """Binary data may carry NaN; an answer in JSON is still valid JSON (null)."""
    x = np.array([[1.5, np.nan, np.inf, -np.inf]], dtype="<f4")
    body, headers = binary_request(("x", "FP32", [1, 4], x.tobytes()))
    status, _, raw, _ = post(wide, body, headers)
    assert status == 200, raw[:300]
    reply = orjson.loads(raw)  # strict: NaN or Infinity in it would fail here
    assert reply["outputs"][0]["data"] == [1.5, None, None, None]
