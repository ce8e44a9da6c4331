"""Hostile and malformed input on the public ports (the ventilator's ROUTER on ``port`` and
the sink's ROUTER on ``port_out``), sent from bare DEALER sockets.

Every case must get exactly one ERROR reply where a reply is possible (with the request id
when the header could be parsed, ``-1`` otherwise; type BadInput or UnknownCommand), and
must leave the server serving: same ventilator, sink, supervisor and worker processes, no
worker restart, and a normal client still gets correct results. Also covered: exact
routing for odd identities, oversized frames (``-max_msg_size``), and that a rejected
message is logged once.

One server takes all the garbage of this module; the log test has its own server (its
log throttle must not have been used up by other tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from helpers import RawClient, connect, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import BadInput, ClientUsageError, Unauthorized, UnknownCommand, WKRClient
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import ServerError, error_from_wire
from wkr_serving.server import WKRServer
from workers import ControlledWorker

V = P.PROTOCOL_VERSION
MAX_MSG_SIZE = 1024 * 1024
MAX_QUEUE_SIZE = 50_000
TOKEN = "hostile-test-token"
#: Longest wait for anything in this module (the box is slow and shared).
LIMIT_S = 10.0


def hdr(*fields: Any) -> bytes:
    """A header frame ``[V, *fields]``."""
    return P.pack([V, *fields])


def item(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def deep(depth: int) -> Any:
    """A list nested ``depth`` levels (msgpack unpacks up to about 1024)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


NDARRAY = np.array([1, 2, 3])  # travels as the EXT_NDARRAY msgpack extension
DEEP = deep(1000)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WKRServer]:
    args = server_args(tmp_path_factory.mktemp("hostile_model"), "-protocol", "obj",
                       "-num_worker", "2", "-batch_size", "4", "-cpu", "-graceful_timeout", "3",
                       "-max_msg_size", str(MAX_MSG_SIZE), "-max_queue_size",
                       str(MAX_QUEUE_SIZE), "-auth_token", TOKEN)
    with running_server(args, ControlledWorker) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[WKRClient]:
    with connect(server) as c:
        yield c


@pytest.fixture(scope="module")
def baseline(client) -> dict[str, Any]:
    """The processes before any garbage: every later check compares with these."""
    status = wait_until(lambda: (s := client.server_status)["ready"] and s, LIMIT_S,
                        "the server to be ready")
    return _processes(status)


@pytest.fixture(scope="module")
def raw(server) -> Iterator[RawClient]:
    r = RawClient(server, b"hostile-raw")
    yield r
    r.close()


def _processes(status: dict[str, Any]) -> dict[str, Any]:
    return {"ventilator": status["ventilator_pid"], "sink": status["sink_pid"],
            "supervisor": status["supervisor_pid"],
            "workers": sorted(w["pid"] for w in status["workers"]),
            "restarts": [w["restarts"] for w in status["workers"]]}


def assert_serving(client: WKRClient, baseline: dict[str, Any]) -> dict[str, Any]:
    """No process was replaced and a normal client gets correct results."""
    values = ["plain", {"k": [1, 2]}, 3, None, 4.5]
    assert client.encode_batch(values) == values
    status = client.server_status
    assert _processes(status) == baseline, "a server process died or was restarted"
    return status


def assert_no_more(sock: zmq.Socket) -> None:
    """Nothing else arrived on ``sock`` (call after a round trip of another client, so a
    second reply to the same message would already be here)."""
    assert not sock.poll(0), f"unexpected extra message: {sock.recv_multipart()[:1]}"


def expect_error(sock: zmq.Socket, req_id: int, cls: type[ServerError]) -> ServerError:
    """Receive one message on ``sock``: an ERROR for ``req_id`` of type ``cls``."""
    assert sock.poll(int(LIMIT_S * 1000)), "no reply from the server"
    frames = sock.recv_multipart(zmq.NOBLOCK)
    header = P.unpack_header(frames[0])
    assert header[1] == P.ERROR, f"expected an ERROR reply, got {header}"
    assert header[2] == req_id, f"error for request {header[2]}, expected {req_id}"
    assert len(frames) == 1
    error = error_from_wire(header[3], header[2])
    assert isinstance(error, cls), f"{type(error).__name__}: {error}"
    return error


def expect_result(sock: zmq.Socket, req_id: int) -> list[Any]:
    """Receive one RESULT for ``req_id`` of msgpack items; return the decoded values."""
    assert sock.poll(int(LIMIT_S * 1000)), "no reply from the server"
    frames = sock.recv_multipart(zmq.NOBLOCK)
    header = P.unpack_header(frames[0])
    assert header[1] == P.RESULT and header[2] == req_id, header
    return [P.decode_item(m, f) for m, f in zip(header[3], frames[1:], strict=True)]


def recv_replies(sock: zmq.Socket) -> list[tuple[int, int, Any, list[bytes]]]:
    """Receive one message and split it into ``(req_id, kind, body, frames)`` replies
    (a REPLIES message carries several)."""
    assert sock.poll(int(LIMIT_S * 1000)), "no reply from the server"
    frames = sock.recv_multipart(zmq.NOBLOCK)
    header = P.unpack_header(frames[0])
    if header[1] != P.REPLIES:
        return [(header[2], header[1], header[3], frames[1:])]
    replies, pos = [], 1
    for req_id, kind, body in header[2]:
        n = len(body) if kind == P.RESULT else 0
        replies.append((req_id, kind, body, frames[pos:pos + n]))
        pos += n
    assert pos == len(frames)
    return replies


def _clean(raw: RawClient) -> None:
    assert_no_more(raw.from_sink)


# -- the ventilator's port -----------------------------------------------------------------

B = BadInput
U = UnknownCommand
VENTILATOR_CASES = [
    # framing
    pytest.param([b""], -1, B, id="zero-length-frame"),
    pytest.param([b"", b""], -1, B, id="two-empty-frames"),
    pytest.param([hdr(P.REQUEST, 11, 0, [0, 0])], 11, B, id="request-header-only"),
    pytest.param([hdr(P.REQUEST, 12, 0, [0]), item(1), item(2)], 12, B,
                 id="request-extra-frames"),
    pytest.param([hdr(P.REQUEST, 13, 0, [0, 0, 0]), item(1)], 13, B,
                 id="request-missing-frames"),
    pytest.param([hdr(P.REQUEST, 14, 0, [])], 14, B, id="request-no-items"),
    pytest.param([hdr(P.COMMAND, 15, 0, "status", None), b"x"], 15, B,
                 id="command-extra-frame"),
    pytest.param([hdr(P.COMMAND, 15, 0, "status", None), b"", b""], 15, B,
                 id="command-two-extra-frames"),
    # not a header
    pytest.param([b"\xc1garbage\xff"], -1, B, id="garbage"),
    pytest.param([bytes(range(256))], -1, B, id="all-byte-values"),
    pytest.param([b"\xff" * 1000, b"\x00" * 10], -1, B, id="ff-bytes"),
    pytest.param([hdr(P.REQUEST, 16, 0, [0])[:-2], item(1)], -1, B, id="truncated-header"),
    pytest.param([hdr(P.REQUEST, 16, 0, [0]) + b"\x00", item(1)], -1, B,
                 id="trailing-bytes"),
    pytest.param([b"\xdd\xff\xff\xff\xff"], -1, B, id="array32-claims-4G-fields"),
    pytest.param([b"\xc6\xff\xff\xff\xff"], -1, B, id="bin32-claims-4GB"),
    pytest.param([P.pack({"version": V, "kind": P.REQUEST})], -1, B, id="header-map"),
    pytest.param([P.pack(7)], -1, B, id="header-int"),
    pytest.param([P.pack("REQUEST")], -1, B, id="header-str"),
    pytest.param([P.pack(b"bin")], -1, B, id="header-bin"),
    pytest.param([P.pack(None)], -1, B, id="header-nil"),
    pytest.param([P.pack([])], -1, B, id="header-empty-array"),
    pytest.param([P.pack([V])], -1, B, id="header-version-only"),
    pytest.param([P.pack(NDARRAY)], -1, B, id="header-ndarray"),
    pytest.param([msgpack.packb(msgpack.ExtType(42, b"x"))], -1, B, id="header-unknown-ext"),
    pytest.param([msgpack.packb([V, P.REQUEST, msgpack.ExtType(42, b"x"), 0, [0]]),
                  item(1)], -1, B, id="field-unknown-ext"),
    pytest.param([msgpack.packb([V, P.REQUEST, 16, 0, [msgpack.ExtType(1, b"junk")]]),
                  item(1)], -1, B, id="field-malformed-ndarray-ext"),
    pytest.param([P.pack(DEEP)], -1, B, id="header-deep"),
    pytest.param([b"\x91" * 5000 + b"\x00"], -1, B, id="header-too-deep-for-msgpack"),
    # protocol version
    pytest.param([P.pack([V + 1, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-next"),
    pytest.param([P.pack([0, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-0"),
    pytest.param([P.pack([-1, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-neg"),
    pytest.param([P.pack([str(V), P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-str"),
    pytest.param([P.pack([float(V), P.REQUEST, 17, 0, [0]]), item(1)], -1, B,
                 id="version-float"),
    pytest.param([P.pack([True, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-bool"),
    pytest.param([P.pack([None, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-nil"),
    pytest.param([P.pack([NDARRAY, P.REQUEST, 17, 0, [0]]), item(1)], -1, B,
                 id="version-ndarray"),
    pytest.param([P.pack([DEEP, P.REQUEST, 17, 0, [0]]), item(1)], -1, B, id="version-deep"),
    # message kind
    pytest.param([hdr(99, 18, 0, [0]), item(1)], -1, B, id="kind-99"),
    pytest.param([hdr(0, 18, 0, [0]), item(1)], -1, B, id="kind-0"),
    pytest.param([hdr(-1, 18)], -1, B, id="kind-neg"),
    pytest.param([hdr(2**64 - 1, 18)], -1, B, id="kind-uint64-max"),
    pytest.param([hdr("REQUEST", 18, 0, [0]), item(1)], -1, B, id="kind-str"),
    pytest.param([hdr(None, 18, 0, [0]), item(1)], -1, B, id="kind-nil"),
    pytest.param([hdr(True, 18, 0, [0]), item(1)], -1, B, id="kind-bool"),
    pytest.param([hdr(1.0, 18, 0, [0]), item(1)], -1, B, id="kind-float"),
    pytest.param([hdr(NDARRAY, 18, 0, [0]), item(1)], -1, B, id="kind-ndarray"),
    pytest.param([hdr(DEEP, 18, 0, [0]), item(1)], -1, B, id="kind-deep"),
    pytest.param([hdr(P.REQUEST, 18, 0), item(1)], -1, B, id="request-too-few-fields"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], None, "extra"), item(1)], -1, B,
                 id="request-too-many-fields"),
    # request options (the optional 4th REQUEST field): a small map of str -> bool/str
    pytest.param([hdr(P.REQUEST, 18, 0, [0], "extra"), item(1)], 18, B, id="options-str"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], ["request_id", "x"]), item(1)], 18, B,
                 id="options-list"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {"request_id": 5}), item(1)], 18, B,
                 id="options-id-int"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {"suppress_log_input": "yes"}), item(1)], 18, B,
                 id="options-suppress-str"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {"request_id": "x" * 129}), item(1)], 18, B,
                 id="options-id-long"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {"other": DEEP}), item(1)], 18, B,
                 id="options-unknown-deep"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {"other": NDARRAY}), item(1)], 18, B,
                 id="options-unknown-ndarray"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {f"k{i}": True for i in range(17)}), item(1)],
                 18, B, id="options-too-many"),
    pytest.param([hdr(P.REQUEST, 18, 0, [0], {7: True}), item(1)], 18, B, id="options-int-key"),
    pytest.param([hdr(P.COMMAND, 18, 0, "status")], -1, B, id="command-too-few-fields"),
    # kinds that are not for this port
    pytest.param([hdr(P.BATCH, 19, [])], 19, B, id="internal-BATCH"),
    pytest.param([hdr(P.READY, 20, 1234, -1, 0)], 20, B, id="internal-READY"),
    pytest.param([hdr(P.DONE, 21, 0, 1234, [], {}, 0.0)], 21, B, id="internal-DONE"),
    pytest.param([hdr(P.FORWARD, b"victim", 22, "reply", "spoofed")], -1, B,
                 id="internal-FORWARD"),
    pytest.param([hdr(P.FORWARD, 22, 22, "error", ["x", "y", "z"])], 22, B,
                 id="internal-FORWARD-int-client"),
    pytest.param([hdr(P.EVENT, "terminate", {"peer": None})], -1, B, id="internal-EVENT"),
    pytest.param([hdr(P.CONTROL, "stop", None)], -1, B, id="internal-CONTROL"),
    pytest.param([hdr(P.HELLO, 23)], 23, B, id="HELLO-on-port"),
    pytest.param([hdr(P.RESULT, 24, [0]), item(1)], 24, B, id="RESULT-inbound"),
    pytest.param([hdr(P.ERROR, 25, ["bad_input", "m", ""])], 25, B, id="ERROR-inbound"),
    pytest.param([hdr(P.REPLY, 26, "v")], 26, B, id="REPLY-inbound"),
    pytest.param([hdr(P.REPLIES, [[26, P.REPLY, "v"]])], -1, B, id="REPLIES-inbound"),
    # request ids
    pytest.param([hdr(P.REQUEST, "27", 0, [0]), item(1)], -1, B, id="id-str"),
    pytest.param([hdr(P.REQUEST, 27.5, 0, [0]), item(1)], -1, B, id="id-float"),
    pytest.param([hdr(P.REQUEST, float("nan"), 0, [0]), item(1)], -1, B, id="id-nan"),
    pytest.param([hdr(P.REQUEST, True, 0, [0]), item(1)], -1, B, id="id-true"),
    pytest.param([hdr(P.REQUEST, False, 0, [0]), item(1)], -1, B, id="id-false"),
    pytest.param([hdr(P.REQUEST, None, 0, [0]), item(1)], -1, B, id="id-nil"),
    pytest.param([hdr(P.REQUEST, [27], 0, [0]), item(1)], -1, B, id="id-list"),
    pytest.param([hdr(P.REQUEST, {"id": 27}, 0, [0]), item(1)], -1, B, id="id-map"),
    pytest.param([hdr(P.REQUEST, b"\x1b", 0, [0]), item(1)], -1, B, id="id-bin"),
    pytest.param([hdr(P.REQUEST, NDARRAY, 0, [0]), item(1)], -1, B, id="id-ndarray"),
    pytest.param([hdr(P.REQUEST, DEEP, 0, [0]), item(1)], -1, B, id="id-deep"),
    pytest.param([hdr(P.REQUEST, "x" * 100_000, 0, [0]), item(1)], -1, B, id="id-long-str"),
    # timeouts
    pytest.param([hdr(P.REQUEST, 28, -1, [0]), item(1)], 28, B, id="timeout-neg"),
    pytest.param([hdr(P.REQUEST, 28, -0.5, [0]), item(1)], 28, B, id="timeout-neg-float"),
    pytest.param([hdr(P.REQUEST, 28, 10**12, [0]), item(1)], 28, B, id="timeout-1e12"),
    pytest.param([hdr(P.REQUEST, 28, 2**64 - 1, [0]), item(1)], 28, B, id="timeout-uint64-max"),
    pytest.param([hdr(P.REQUEST, 28, -(2**63), [0]), item(1)], 28, B, id="timeout-int64-min"),
    pytest.param([hdr(P.REQUEST, 28, float("nan"), [0]), item(1)], 28, B, id="timeout-nan"),
    pytest.param([hdr(P.REQUEST, 28, float("inf"), [0]), item(1)], 28, B, id="timeout-inf"),
    pytest.param([hdr(P.REQUEST, 28, float("-inf"), [0]), item(1)], 28, B, id="timeout-ninf"),
    pytest.param([hdr(P.REQUEST, 28, "100", [0]), item(1)], 28, B, id="timeout-str"),
    pytest.param([hdr(P.REQUEST, 28, None, [0]), item(1)], 28, B, id="timeout-nil"),
    pytest.param([hdr(P.REQUEST, 28, True, [0]), item(1)], 28, B, id="timeout-bool"),
    pytest.param([hdr(P.REQUEST, 28, [100], [0]), item(1)], 28, B, id="timeout-list"),
    pytest.param([hdr(P.REQUEST, 28, NDARRAY, [0]), item(1)], 28, B, id="timeout-ndarray"),
    pytest.param([hdr(P.REQUEST, 28, DEEP, [0]), item(1)], 28, B, id="timeout-deep"),
    # metas
    pytest.param([hdr(P.REQUEST, 29, 0, 0), item(1)], 29, B, id="metas-int"),
    pytest.param([hdr(P.REQUEST, 29, 0, {"0": 0}), item(1)], 29, B, id="metas-map"),
    pytest.param([hdr(P.REQUEST, 29, 0, "0"), item(1)], 29, B, id="metas-str"),
    pytest.param([hdr(P.REQUEST, 29, 0, None), item(1)], 29, B, id="metas-nil"),
    pytest.param([hdr(P.REQUEST, 29, 0, b"\x00"), item(1)], 29, B, id="metas-bin"),
    pytest.param([hdr(P.REQUEST, 29, 0, NDARRAY), item(1)], 29, B, id="metas-ndarray"),
    pytest.param([hdr(P.REQUEST, 29, 0, DEEP), item(1)], 29, B, id="metas-deep"),
    pytest.param([hdr(P.REQUEST, 29, 0, [0, 0]), item(1)], 29, B, id="metas-count-more"),
    pytest.param([hdr(P.REQUEST, 29, 0, [0]), item(1), item(2)], 29, B,
                 id="metas-count-fewer"),
    pytest.param([hdr(P.REQUEST, 30, 0, [2]), item(1)], 30, B, id="meta-2"),
    pytest.param([hdr(P.REQUEST, 30, 0, [-1]), item(1)], 30, B, id="meta-neg"),
    pytest.param([hdr(P.REQUEST, 30, 0, [True]), item(1)], 30, B, id="meta-true"),
    pytest.param([hdr(P.REQUEST, 30, 0, [False]), item(1)], 30, B, id="meta-false"),
    pytest.param([hdr(P.REQUEST, 30, 0, [0.0]), item(1)], 30, B, id="meta-float"),
    pytest.param([hdr(P.REQUEST, 30, 0, [None]), item(1)], 30, B, id="meta-nil"),
    pytest.param([hdr(P.REQUEST, 30, 0, ["<f4"]), item(1)], 30, B, id="meta-str"),
    pytest.param([hdr(P.REQUEST, 30, 0, [{"dtype": "<f4", "shape": [1]}]), b"\x00" * 4], 30, B,
                 id="meta-map"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4"]]), b"\x00" * 4], 30, B, id="meta-1-field"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", [1], 0]]), b"\x00" * 4], 30, B,
                 id="meta-3-fields"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", 1]]), b"\x00" * 4], 30, B, id="shape-int"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", [1.0]]]), b"\x00" * 4], 30, B,
                 id="shape-float"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", [True]]]), b"\x00" * 4], 30, B,
                 id="shape-bool"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", [[1]]]]), b"\x00" * 4], 30, B,
                 id="shape-nested"),
    pytest.param([hdr(P.REQUEST, 30, 0, [NDARRAY]), item(1)], 30, B, id="meta-ndarray"),
    pytest.param([hdr(P.REQUEST, 30, 0, [["<f4", NDARRAY]]), b"\x00" * 24], 30, B,
                 id="shape-ndarray"),
    pytest.param([hdr(P.REQUEST, 30, 0, [deep(1015)]), item(1)], 30, B, id="meta-deep"),
    pytest.param([hdr(P.REQUEST, 30, 0, [0, deep(5), 0]), item(1), item(2), item(3)], 30, B,
                 id="meta-deep-among-good"),
    # array shape against buffer
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [3]]]), b"\x00" * 8], 31, B,
                 id="buffer-too-short"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [3]]]), b"\x00" * 16], 31, B,
                 id="buffer-too-long"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [3]]]), b""], 31, B, id="buffer-empty"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [-1]]]), b"\x00" * 4], 31, B,
                 id="shape-negative"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [2, -2]]]), b"\x00" * 16], 31, B,
                 id="shape-negative-pair"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [2**62, 2**62]]]), b"\x00" * 4], 31, B,
                 id="shape-product-overflows"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [2**64 - 1]]]), b"\x00" * 4], 31, B,
                 id="shape-uint64-max"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [0, 2**62]]]), b""], 31, B,
                 id="shape-empty-but-too-large"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [1] * 100]]), b"\x00" * 4], 31, B,
                 id="shape-100-dims"),
    # the product of 100k huge dims takes minutes to compute: refused before that
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [2**63] * 100_000]]), b"\x00" * 4], 31, B,
                 id="shape-100k-huge-dims"),
    pytest.param([hdr(P.REQUEST, 31, 0, [["<f4", [3]], ["<f4", [1]]]), b"\x00" * 12,
                  b"\x00" * 8], 31, B, id="second-array-bad"),
    # dtypes
    pytest.param([hdr(P.REQUEST, 32, 0, [["O", [1]]]), b"\x00" * 8], 32, B, id="dtype-O"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["|O", [1]]]), b"\x00" * 8], 32, B, id="dtype-|O"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["object", [1]]]), b"\x00" * 8], 32, B,
                 id="dtype-object"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["V8", [1]]]), b"\x00" * 8], 32, B, id="dtype-void"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["<i4,<f4", [1]]]), b"\x00" * 8], 32, B,
                 id="dtype-structured-str"),
    pytest.param([hdr(P.REQUEST, 32, 0, [[[["a", "<i4"]], [1]]]), b"\x00" * 4], 32, B,
                 id="dtype-structured-list"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["(2,)<i4", [1]]]), b"\x00" * 8], 32, B,
                 id="dtype-subarray"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["S0", [3]]]), b""], 32, B, id="dtype-S0"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["U0", [3]]]), b""], 32, B, id="dtype-U0"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["float128x", [1]]]), b"\x00" * 4], 32, B,
                 id="dtype-unknown"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["", [1]]]), b"\x00" * 4], 32, B, id="dtype-empty"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["<f4" * 100, [1]]]), b"\x00" * 4], 32, B,
                 id="dtype-long"),
    pytest.param([hdr(P.REQUEST, 32, 0, [["M8[zz]", [1]]]), b"\x00" * 8], 32, B,
                 id="dtype-bad-unit"),
    pytest.param([hdr(P.REQUEST, 32, 0, [[b"<f4", [1]]]), b"\x00" * 4], 32, B, id="dtype-bin"),
    pytest.param([hdr(P.REQUEST, 32, 0, [[4, [1]]]), b"\x00" * 4], 32, B, id="dtype-int"),
    # item payloads
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), b"\xc1"], 33, B, id="item-not-msgpack"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), b""], 33, B, id="item-empty"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), item(1) + b"\x00"], 33, B,
                 id="item-trailing-bytes"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), msgpack.packb(msgpack.ExtType(9, b"?"))], 33, B,
                 id="item-unknown-ext"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), msgpack.packb(msgpack.ExtType(
        P.EXT_NDARRAY, msgpack.packb(["O", [1], b"\x00" * 8])))], 33, B,
                 id="item-object-ndarray-ext"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), msgpack.packb(msgpack.ExtType(
        P.EXT_NDARRAY, msgpack.packb(["<f4", [5], b"\x00" * 4])))], 33, B,
                 id="item-short-ndarray-ext"),
    pytest.param([hdr(P.REQUEST, 33, 0, [0]), b"\x91" * 5000 + b"\x00"], 33, B,
                 id="item-too-deep"),
    pytest.param([hdr(P.REQUEST, 33, 0, [1]), b"cos\nsystem\n(S'true'\ntR."], 33, B,
                 id="item-pickle-refused"),
    # commands
    pytest.param([hdr(P.COMMAND, 34, 0, "reboot", None)], 34, U, id="cmd-unknown"),
    pytest.param([hdr(P.COMMAND, 34, 0, "", None)], 34, U, id="cmd-empty"),
    pytest.param([hdr(P.COMMAND, 34, 0, "STATUS", None)], 34, U, id="cmd-upper"),
    pytest.param([hdr(P.COMMAND, 34, 0, "status\x00", None)], 34, U, id="cmd-nul"),
    pytest.param([hdr(P.COMMAND, 34, 0, "x" * 100_000, None)], 34, U, id="cmd-long"),
    pytest.param([hdr(P.COMMAND, 34, 0, 5, None)], 34, U, id="cmd-int"),
    pytest.param([hdr(P.COMMAND, 34, 0, None, None)], 34, U, id="cmd-nil"),
    pytest.param([hdr(P.COMMAND, 34, 0, b"status", None)], 34, U, id="cmd-bin"),
    pytest.param([hdr(P.COMMAND, 34, 0, ["status"], None)], 34, U, id="cmd-list"),
    pytest.param([hdr(P.COMMAND, 34, 0, {"status": 1}, None)], 34, U, id="cmd-map"),
    pytest.param([hdr(P.COMMAND, 34, 0, np.array(["status", "ping"]), None)], 34, U,
                 id="cmd-ndarray"),
    pytest.param([hdr(P.COMMAND, 34, 0, DEEP, None)], 34, U, id="cmd-deep"),
    pytest.param([hdr(P.COMMAND, "34", 0, "status", None)], -1, B, id="cmd-id-str"),
]


@pytest.mark.parametrize(("frames", "req_id", "cls"), VENTILATOR_CASES)
def test_ventilator_rejects(server, client, baseline, raw, frames, req_id, cls):
    """One malformed message on ``port``: one ERROR reply, the server unaffected."""
    _clean(raw)
    raw.send(frames)
    expect_error(raw.from_sink, req_id, cls)
    assert_serving(client, baseline)
    assert_no_more(raw.from_sink)


SINK_CASES = [
    pytest.param([b""], id="zero-length-frame"),
    pytest.param([hdr(P.HELLO, 1), b""], id="hello-extra-frame"),
    pytest.param([hdr(P.HELLO, 1), b"x", b"y"], id="hello-two-extra-frames"),
    pytest.param([b"\xc1garbage"], id="garbage"),
    pytest.param([bytes(range(256))], id="all-byte-values"),
    pytest.param([hdr(P.HELLO, 1)[:-1]], id="truncated-header"),
    pytest.param([P.pack({"kind": P.HELLO})], id="header-map"),
    pytest.param([P.pack(3)], id="header-int"),
    pytest.param([P.pack([])], id="header-empty-array"),
    pytest.param([P.pack(DEEP)], id="header-deep"),
    pytest.param([P.pack([V + 1, P.HELLO, 1])], id="version-next"),
    pytest.param([P.pack([float(V), P.HELLO, 1])], id="version-float"),
    pytest.param([P.pack([NDARRAY, P.HELLO, 1])], id="version-ndarray"),
    pytest.param([P.pack([DEEP, P.HELLO, 1])], id="version-deep"),
    pytest.param([hdr(99, 1)], id="kind-unknown"),
    pytest.param([hdr(NDARRAY, 1)], id="kind-ndarray"),
    pytest.param([hdr(P.HELLO)], id="hello-no-id"),
    pytest.param([hdr(P.HELLO, 1, 2)], id="hello-extra-field"),
    pytest.param([hdr(P.HELLO, "1")], id="hello-id-str"),
    pytest.param([hdr(P.HELLO, True)], id="hello-id-bool"),
    pytest.param([hdr(P.HELLO, NDARRAY)], id="hello-id-ndarray"),
    pytest.param([hdr(P.HELLO, deep(1020))], id="hello-id-deep"),
    pytest.param([hdr(P.REQUEST, 5, 0, [0])], id="request-on-port-out"),
    pytest.param([hdr(P.COMMAND, 5, 0, "status", None)], id="command-on-port-out"),
    pytest.param([hdr(P.DONE, 1, 0, 1234, [], {}, 0.0)], id="internal-DONE"),
    pytest.param([hdr(P.FORWARD, b"victim", 5, "reply", "spoofed")], id="internal-FORWARD"),
]


@pytest.mark.parametrize("frames", SINK_CASES)
def test_sink_rejects(server, client, baseline, raw, frames):
    """One malformed message on ``port_out``: one ERROR reply (id -1: only a HELLO is
    accepted there), the server unaffected."""
    _clean(raw)
    raw.from_sink.send_multipart(frames)
    expect_error(raw.from_sink, -1, BadInput)
    assert_serving(client, baseline)
    assert_no_more(raw.from_sink)


def test_sink_still_answers_hello_after_garbage(server, client, baseline, raw):
    """After rejected messages on ``port_out`` the same connection can still say HELLO."""
    _clean(raw)
    raw.from_sink.send(b"garbage")
    expect_error(raw.from_sink, -1, BadInput)
    raw.from_sink.send(hdr(P.HELLO, 2**64 - 1))
    header = raw.recv()
    assert header[1] == P.REPLY and header[2] == 2**64 - 1
    assert header[3]["max_msg_size"] == MAX_MSG_SIZE
    assert_serving(client, baseline)


# -- values at the edges that are valid ----------------------------------------------------


@pytest.mark.parametrize("req_id", [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
                         ids=["zero", "minus-one", "int64-max", "int64-min", "uint64-max"])
def test_extreme_request_ids_are_served(server, client, baseline, raw, req_id):
    """Any integer msgpack can carry is a valid request id and comes back unchanged.
    (Integers beyond uint64/int64 cannot be written in msgpack at all.)"""
    with pytest.raises((OverflowError, TypeError)):
        P.pack([V, P.REQUEST, 2**64, 0, [0]])
    _clean(raw)
    raw.send([hdr(P.REQUEST, req_id, 0, [0, 0]), item("a"), item([1, 2])])
    assert expect_result(raw.from_sink, req_id) == ["a", [1, 2]]
    assert_serving(client, baseline)


def test_command_args_are_ignored_or_refused(server, client, baseline, raw):
    """Garbage command arguments: status and ping ignore them; terminate (the server has
    an -auth_token) is refused with Unauthorized, and the server keeps running."""
    _clean(raw)
    for n, args in enumerate([DEEP, NDARRAY, {"token": NDARRAY}, "x" * 10_000]):
        raw.send([hdr(P.COMMAND, 100 + n, 0, "status", args)])
        header = raw.recv()
        assert header[1] == P.REPLY and header[2] == 100 + n
        assert header[3]["ventilator_pid"] == baseline["ventilator"]
        raw.send([hdr(P.COMMAND, 200 + n, 0, "ping", args)])
        assert raw.recv()[2:] == [200 + n, "pong"]
    for n, args in enumerate([None, DEEP, NDARRAY, {"token": NDARRAY}, {"token": 5},
                              {"token": "wrong"}, {"token": TOKEN[:-1]}, {"token": DEEP},
                              ["token", TOKEN], TOKEN]):
        raw.send([hdr(P.COMMAND, 300 + n, 0, "terminate", args)])
        expect_error(raw.from_sink, 300 + n, Unauthorized)
    status = assert_serving(client, baseline)
    assert not status["draining"]
    assert_no_more(raw.from_sink)


def test_huge_request_over_queue_bound_is_bad_input(server, client, baseline, raw):
    """100k tiny items in one request: more than -max_queue_size, so BadInput at once;
    a large request under the bound is served."""
    _clean(raw)
    n = 100_000
    assert n > MAX_QUEUE_SIZE
    one = item(1)
    raw.send([hdr(P.REQUEST, 41, 0, [0] * n), *([one] * n)])
    error = expect_error(raw.from_sink, 41, BadInput)
    assert "max_queue_size" in str(error)
    n = 5_000
    raw.send([hdr(P.REQUEST, 42, 60_000, [0] * n), *([one] * n)])
    assert expect_result(raw.from_sink, 42) == [1] * n
    status = assert_serving(client, baseline)
    assert status["queue_items"] == 0


def test_bad_item_among_good_requests_fails_only_its_request(server, client, baseline, raw):
    """A bad raw array shares a batch with good requests: only its request fails."""
    _clean(raw)
    good = np.arange(3, dtype="<f4")
    meta = [good.dtype.str, [3]]
    raw.send([hdr(P.REQUEST, 51, 0, [0, 0]), item("a"), item("b")])
    raw.send([hdr(P.REQUEST, 52, 0, [meta]), good.tobytes()[:8]])  # too short
    raw.send([hdr(P.REQUEST, 53, 0, [meta]), good.tobytes()])
    replies: dict[int, tuple[int, Any, list[bytes]]] = {}
    while len(replies) < 3:
        for req_id, kind, body, frames in recv_replies(raw.from_sink):
            assert req_id not in replies
            replies[req_id] = (kind, body, frames)
    assert replies[51][0] == P.RESULT
    assert [P.decode_item(m, f) for m, f in zip(replies[51][1], replies[51][2],
                                                strict=True)] == ["a", "b"]
    assert replies[52][0] == P.ERROR
    assert isinstance(error_from_wire(replies[52][1]), BadInput)
    kind, metas, frames = replies[53]
    assert kind == P.RESULT
    np.testing.assert_array_equal(P.decode_item(metas[0], frames[0]), good)
    assert_serving(client, baseline)


def test_duplicate_split_request_ids_are_each_answered_once(server, client, baseline, raw,
                                                            tmp_path):
    """Request ids must be unique per client. One that reuses an id for two requests split
    across batches may confuse its own results, but each request must still get one
    reply and the sink must not keep reassembly state for them forever (memory held for
    every such message). Batches are ordered with blocking items so the parts of the two
    requests interleave the same way on every run."""
    _clean(raw)
    files = {name: str(tmp_path / name) for name in ("s1", "r1", "s2", "r2")}

    def block(n: int) -> bytes:
        return item({"cmd": "block", "started": files[f"s{n}"], "release": files[f"r{n}"],
                     "value": n})

    # A: 10 items in batches [0-4) (blocks on r1), [4-8) (blocks on r2), [8-10)...
    a_items = [block(1), item(1), item(2), item(3), block(2), *(item(i) for i in range(5, 10))]
    raw.send([hdr(P.REQUEST, 61, 0, [0] * 10), *a_items])
    wait_until(lambda: os.path.exists(files["s1"]) and os.path.exists(files["s2"]), LIMIT_S,
               "both workers to block")
    # B: same id, 6 items, queued behind A's last 2 items while both workers are busy.
    raw.send([hdr(P.REQUEST, 61, 0, [0] * 6), *(item(100 + i) for i in range(6))])
    wait_until(lambda: client.server_status["queue_items"] == 8, LIMIT_S, "B to be queued")
    with open(files["r2"], "w", encoding="utf-8"):
        pass  # [4-8) finishes, then [A8-10 + B0-2] and [B2-6] run on that worker
    wait_until(lambda: client.server_status["queue_items"] == 0, LIMIT_S, "B to be dispatched")
    with open(files["r1"], "w", encoding="utf-8"):
        pass  # [0-4) of A finishes last
    replies = []
    for _ in range(2):
        assert raw.from_sink.poll(int(LIMIT_S * 1000)), (
            f"request 61 got {len(replies)} of 2 replies; sink state: "
            f"{client.server_status['pending_split_requests']} pending split requests")
        header = P.unpack_header(raw.from_sink.recv_multipart()[0])
        assert header[2] == 61
        replies.append(header[1])
    assert set(replies) <= {P.RESULT, P.ERROR}
    status = wait_idle(client)
    assert status["pending_split_requests"] == 0
    assert_serving(client, baseline)


# -- identities ----------------------------------------------------------------------------

IDENTITIES = [
    pytest.param(b"a#b", id="hash"),
    pytest.param(b"#", id="hash-only"),
    pytest.param(b"@", id="at-only"),
    pytest.param(b"x@y#z", id="at-and-hash"),
    pytest.param(b"mid\x00dle", id="nul-inside"),
    pytest.param(b"trailing\x00", id="nul-last"),
    pytest.param(b"\xff", id="ff"),
    pytest.param(b"\xff" * 255, id="ff-255-bytes"),
    pytest.param(bytes(range(1, 256)), id="all-bytes-255"),
    pytest.param(b"\x00lead", id="nul-first"),
]


@pytest.mark.parametrize("identity", IDENTITIES)
def test_odd_identities_get_their_own_replies(server, client, baseline, identity):
    """Routing is by exact identity bytes: ``#``, ``@``, NUL and 0xff bytes and 255-byte
    identities get their replies (errors and results) on their own sockets.

    ZeroMQ reserves identities starting with a zero byte for its generated ones; libzmq
    4.3 still accepts and routes one a peer sets itself, so such a client is served like
    any other (a collision with a generated identity would make the ROUTER ignore the
    newcomer, as for any duplicate identity: see the test below)."""
    raw = RawClient(server, identity)  # its HELLO got its reply
    try:
        raw.send([hdr(P.COMMAND, 7, 0, "no-such-command", None)])
        expect_error(raw.from_sink, 7, UnknownCommand)
        raw.send([hdr(P.REQUEST, 8, 0, [0]), item(identity)])
        assert expect_result(raw.from_sink, 8) == [identity]
        raw.send([b"garbage"])
        expect_error(raw.from_sink, -1, BadInput)
        assert_serving(client, baseline)
        assert_no_more(raw.from_sink)
    finally:
        raw.close()


def test_prefix_identities_are_routed_exactly(server, client, baseline):
    """Identities that are prefixes of each other (or differ only after a separator)
    never receive each other's replies."""
    names = [b"pre", b"pre#1", b"pre@1", b"pre\x00", b"pr", b"pre#"]
    raws = [RawClient(server, name) for name in names]
    try:
        for raw in raws:  # all send first, then all read: replies are in flight together
            raw.send([hdr(P.REQUEST, 1, 0, [0]), item(raw.from_sink.getsockopt(zmq.IDENTITY))])
        for name, raw in zip(names, raws, strict=True):
            assert expect_result(raw.from_sink, 1) == [name]
        assert_serving(client, baseline)
        for raw in raws:
            assert_no_more(raw.from_sink)
    finally:
        for raw in raws:
            raw.close()


def test_duplicate_identity_cannot_steal_replies(server, client, baseline):
    """A second peer claiming a connected client's identity is ignored by the ROUTERs:
    it gets no replies, and the first client keeps getting its own."""
    victim = RawClient(server, b"victim-id")
    context = zmq.Context()
    try:
        victim.send([hdr(P.COMMAND, 1, 0, "ping", None)])  # both its connections are up
        assert victim.recv()[2:] == [1, "pong"]
        thief_in = context.socket(zmq.DEALER)
        thief_out = context.socket(zmq.DEALER)
        for sock, port in ((thief_in, server.port), (thief_out, server.port_out)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, b"victim-id")
            sock.connect(f"tcp://127.0.0.1:{port}")
        thief_out.send(hdr(P.HELLO, 1))
        thief_in.send_multipart([hdr(P.REQUEST, 2, 0, [0]), item("thief")])
        victim.send([hdr(P.REQUEST, 3, 0, [0]), item("victim")])
        assert expect_result(victim.from_sink, 3) == ["victim"]
        assert_serving(client, baseline)
        assert not thief_out.poll(200), "a duplicate identity received a reply"
        assert_no_more(victim.from_sink)
    finally:
        victim.close()
        context.destroy(0)


# -- -max_msg_size -------------------------------------------------------------------------


def _monitored_dealer(context: zmq.Context, port: int) -> tuple[zmq.Socket, zmq.Socket]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"oversize-" + os.urandom(4).hex().encode())
    sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # stay disconnected once dropped
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    sock.connect(f"tcp://127.0.0.1:{port}")
    _wait_event(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED)
    return sock, monitor


def _wait_event(monitor: zmq.Socket, event: int) -> None:
    from zmq.utils.monitor import recv_monitor_message

    def seen() -> bool:
        while monitor.poll(50):
            if recv_monitor_message(monitor)["event"] == event:
                return True
        return False

    wait_until(seen, LIMIT_S, f"socket monitor event {event}")


@pytest.mark.parametrize("target", ["port", "port_out"])
def test_oversized_frame_disconnects_only_that_peer(server, client, baseline, target):
    """A frame over -max_msg_size: ZeroMQ drops that peer's connection (seen by a socket
    monitor on the sender), nothing is answered, and every other client is unaffected."""
    context = zmq.Context()
    try:
        sock, monitor = _monitored_dealer(context, getattr(server, target))
        big = b"\x00" * (4 * MAX_MSG_SIZE)
        if target == "port":
            sock.send_multipart([hdr(P.REQUEST, 1, 0, [0]), big])
        else:
            sock.send_multipart([hdr(P.HELLO, 1) + big])
        _wait_event(monitor, zmq.EVENT_DISCONNECTED)
        assert_serving(client, baseline)
        assert not sock.poll(0)
    finally:
        context.destroy(0)


def test_client_refuses_oversized_item_and_serves_one_just_under(server, client, baseline):
    """The client knows -max_msg_size from the handshake: an item over it raises
    ClientUsageError before anything is sent; one just under it is served."""
    over = np.zeros(MAX_MSG_SIZE + 1, dtype=np.uint8)
    with pytest.raises(ClientUsageError, match="max_msg_size"):
        client.encode(over)
    with pytest.raises(ClientUsageError, match="max_msg_size"):
        client.encode(b"x" * MAX_MSG_SIZE)  # msgpack adds a 5-byte prefix
    under = np.arange(MAX_MSG_SIZE - 64, dtype=np.uint8)
    np.testing.assert_array_equal(client.encode(under), under)
    exact = np.ones(MAX_MSG_SIZE, dtype=np.uint8)
    np.testing.assert_array_equal(client.encode(exact), exact)
    assert_serving(client, baseline)


# -- logging -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory) -> Iterator[tuple[WKRServer, str]]:
    log_dir = tmp_path_factory.mktemp("hostile_logs")
    args = server_args(tmp_path_factory.mktemp("hostile_log_model"), "-num_worker", "1",
                       "-cpu", "-graceful_timeout", "3", "-log_dir", str(log_dir),
                       "-log_name", "x")
    with running_server(args, ControlledWorker) as srv:
        yield srv, os.path.join(log_dir, "x.log")


def _count(path: str, marker: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(marker in line for line in f)


def test_rejected_message_is_logged_once(logged_server):
    """Each rejected message is logged exactly once (by the role that rejected it), and a
    flood is throttled: at most 10 lines a minute for the ventilator's rejections."""
    server, log_path = logged_server
    raw = RawClient(server, b"log-raw")
    try:
        with connect(server) as c:
            raw.send([hdr(P.COMMAND, 1, 0, "marker-vent-0001", None)])
            expect_error(raw.from_sink, 1, UnknownCommand)
            raw.from_sink.send(P.pack([V, P.HELLO, "marker-sink-0002"]))
            expect_error(raw.from_sink, -1, BadInput)
            # The rejecting role writes its line before the reply leaves; a status round
            # trip through both roles comes after both.
            assert c.server_status["num_rejected"] == 1
            assert _count(log_path, "marker-vent-0001") == 1
            assert _count(log_path, "marker-sink-0002") == 1
            for n in range(3, 15):  # 12 more: 9 fit in the ventilator's burst of 10
                raw.send([hdr(P.COMMAND, n, 0, f"marker-flood-{n:04d}", None)])
                expect_error(raw.from_sink, n, UnknownCommand)
            status = c.server_status
            logged = [n for n in range(3, 15) if _count(log_path, f"marker-flood-{n:04d}")]
            assert logged == list(range(3, 12)), logged
            assert all(_count(log_path, f"marker-flood-{n:04d}") == 1 for n in logged)
            assert status["num_rejected"] == 13
            assert status["num_errors"].get("unknown_command") == 13
            assert status["num_errors"].get("bad_input") == 1
    finally:
        raw.close()
