"""Request limits on the ZeroMQ path, against real servers: ``-max_request_items`` (the
client refuses from the server's handshake, the ventilator from a request's header,
before any item is decoded) and the decoded size of raw arrays (``-max_msg_size``, per
item and per request, from the metas alone), with the memory of the server's processes
staying bounded while it refuses.

Memory is each role process's RSS, sampled (psutil) on a thread while the refused call
runs; the bounds are generous (100 MB against the ~0.7-0.8 GB such requests made the
ventilator allocate before it refused them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from helpers import CALL_TIMEOUT_MS, RawClient, connect, running_server, server_args, wait_until
from wkr_serving.client import AsyncWKRClient, BadInput
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import ServerError, error_from_wire
from wkr_serving.server import WKRServer
from workers import EchoWorker

V = P.PROTOCOL_VERSION
DEFAULT_ITEMS = 10_000  # the default -max_request_items (and -max_queue_size)
DEFAULT_MSG_SIZE = 256 * 1024 * 1024
SMALL_ITEMS = 50  # -max_request_items of the small server (its queue keeps the default)
HUGE = 3_000_000
#: Most a role process's RSS may grow while it refuses one hostile request.
RSS_BOUND = 100 * 1024 * 1024
#: Longest wait for a reply or a condition in this module.
LIMIT_S = 20.0


# -- helpers -------------------------------------------------------------------------------


class PeakRSS:
    """Sample the RSS of some processes on a thread until the block ends; ``growth(pid)``
    is the highest sample minus the one taken on entry."""

    INTERVAL_S = 0.002
    #: The sampling thread stops by itself after this long, whatever happens.
    MAX_S = 120.0

    def __init__(self, pids: list[int]) -> None:
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.base = {pid: p.memory_info().rss for pid, p in self.procs.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        deadline = time.monotonic() + self.MAX_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._sample_once()
            self._stop.wait(self.INTERVAL_S)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10.0)
        assert not self._thread.is_alive()
        self._sample_once()

    def _sample_once(self) -> None:
        for pid, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):  # a process that died: the test says so
                self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)

    def growth(self, pid: int) -> int:
        return self.peak[pid] - self.base[pid]


def role_pids(status: dict[str, Any]) -> dict[str, int]:
    pids = {"ventilator": status["ventilator_pid"], "sink": status["sink_pid"]}
    for w in status["workers"]:
        pids[f"worker-{w['index']}"] = w["pid"]
    return pids


def assert_bounded(rss: PeakRSS, pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        grew = rss.growth(pid)
        assert grew < RSS_BOUND, f"{name} RSS grew by {grew / 1e6:.0f} MB"


def hdr(*fields: Any) -> bytes:
    return P.pack([V, *fields])


def expect_error(raw: RawClient, req_id: int) -> ServerError:
    """The next reply on the raw client's result socket: an ERROR for ``req_id``."""
    assert raw.from_sink.poll(int(LIMIT_S * 1000)), "no reply from the server"
    header = P.unpack_header(raw.from_sink.recv_multipart(zmq.NOBLOCK)[0])
    assert header[1] == P.ERROR and header[2] == req_id, header
    return error_from_wire(header[3], header[2])


def expect_result(raw: RawClient, req_id: int) -> list[Any]:
    assert raw.from_sink.poll(int(LIMIT_S * 1000)), "no reply from the server"
    frames = raw.from_sink.recv_multipart(zmq.NOBLOCK)
    header = P.unpack_header(frames[0])
    assert header[1] == P.RESULT and header[2] == req_id, header
    return [P.decode_item(m, f) for m, f in zip(header[3], frames[1:], strict=True)]


def names_limit(error: BaseException, flag: str, limit: int) -> None:
    text = error.message if isinstance(error, ServerError) else str(error)
    assert isinstance(error, BadInput), f"{type(error).__name__}: {text}"
    assert f"-{flag}" in text and str(limit) in text, text


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol obj, every limit at its default."""
    args = server_args(tmp_path_factory.mktemp("limits_default"), "-protocol", "obj", "-cpu")
    with running_server(args, EchoWorker) as server:
        yield server


@pytest.fixture(scope="module")
def small_server(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol obj, -max_request_items 50 (-max_queue_size at its default)."""
    args = server_args(tmp_path_factory.mktemp("limits_small"), "-protocol", "obj", "-cpu",
                       "-max_request_items", str(SMALL_ITEMS))
    with running_server(args, EchoWorker) as server:
        yield server


@pytest.fixture
def raw_factory() -> Iterator[Any]:
    made: list[RawClient] = []

    def make(server: WKRServer, identity: bytes) -> RawClient:
        raw = RawClient(server, identity)
        made.append(raw)
        return raw

    yield make
    for raw in made:
        raw.close()


# -- (a) the client refuses at once ----------------------------------------------------------


def test_client_refuses_millions_of_items_at_once(default_server, client_factory):
    client = client_factory(default_server)
    before = client.server_status
    pids = role_pids(before)
    items = [0] * HUGE
    with PeakRSS(list(pids.values())) as rss:
        started = time.monotonic()
        with pytest.raises(BadInput) as info:
            client.encode_batch(items)
        elapsed = time.monotonic() - started
    names_limit(info.value, "max_request_items", DEFAULT_ITEMS)
    assert elapsed < 1.0, f"refused after {elapsed:.2f}s"  # a bound, not a benchmark
    assert_bounded(rss, pids)
    with pytest.raises(BadInput, match="-max_request_items"):  # an ndarray: before list()
        client.encode_batch(np.zeros(HUGE, dtype=np.uint8))
    after = client.server_status
    assert (after["num_requests"], after["num_rejected"]) == \
        (before["num_requests"], before["num_rejected"]), "the refused request was sent"
    assert client.encode_batch([1, 2]) == [1, 2]


def test_async_client_refuses_millions_of_items_at_once(default_server):
    items = [0] * HUGE

    async def main() -> tuple[BaseException, float, list[Any]]:
        async with AsyncWKRClient("127.0.0.1", default_server.port, default_server.port_out,
                                  timeout=CALL_TIMEOUT_MS) as client:
            started = time.monotonic()
            try:
                await client.encode_batch(items)
            except BadInput as exc:
                error: BaseException = exc
            else:
                raise AssertionError("a request over -max_request_items was not refused")
            elapsed = time.monotonic() - started
            return error, elapsed, await client.encode_batch([3, 4])

    error, elapsed, served = asyncio.run(asyncio.wait_for(main(), LIMIT_S * 3))
    names_limit(error, "max_request_items", DEFAULT_ITEMS)
    assert elapsed < 1.0, f"refused after {elapsed:.2f}s"
    assert served == [3, 4]


# -- (b) a hostile client: the ventilator refuses from the header ---------------------------


def test_raw_header_declaring_millions_of_items_is_refused(default_server, client_factory,
                                                           raw_factory):
    client = client_factory(default_server)
    before = client.server_status
    pids = role_pids(before)
    raw = raw_factory(default_server, b"limits-raw-huge")
    parts = 100_000  # sent after the header: dropped as they are read, never kept
    with PeakRSS(list(pids.values())) as rss:
        # metas as short as they come (3 MB of header), then as arrays (24 MB, ~0.7 GB
        # once unpacked as Python lists)
        raw.send([hdr(P.REQUEST, 7, 0, [0] * HUGE), *([b""] * parts)])
        names_limit(expect_error(raw, 7), "max_request_items", DEFAULT_ITEMS)
        raw.send([hdr(P.REQUEST, 8, 0, [["<f4", [1]]] * HUGE), b"\0\0\0\0"])
        names_limit(expect_error(raw, 8), "max_request_items", DEFAULT_ITEMS)
        # a header that declares 3M items in its first bytes but stops there
        declared = bytes([0x95, V, P.REQUEST, 9, 0, 0xDD]) + HUGE.to_bytes(4, "big")
        raw.send([declared + b"\x00" * 16])
        names_limit(expect_error(raw, 9), "max_request_items", DEFAULT_ITEMS)
    assert_bounded(rss, pids)
    # the server keeps serving, the raw client included
    assert client.encode_batch(["x", {"y": 1}]) == ["x", {"y": 1}]
    raw.send([hdr(P.REQUEST, 10, 0, [0]), msgpack.packb("ok")])
    assert expect_result(raw, 10) == ["ok"]
    status = wait_until(lambda: (s := client.server_status)["num_discarded_parts"]
                        >= before["num_discarded_parts"] + parts and s, LIMIT_S,
                        "the hostile request's parts to be dropped")
    assert status["num_rejected"] == before["num_rejected"] + 3
    assert role_pids(status) == pids


# -- (c) decoded sizes: -max_msg_size from the metas ----------------------------------------


def test_raw_array_declaring_a_huge_decoded_size_is_refused(numpy_server, client_factory,
                                                            raw_factory):
    client = client_factory(numpy_server)
    before = client.server_status
    assert before["config"]["max_msg_size"] == DEFAULT_MSG_SIZE
    pids = role_pids(before)
    raw = raw_factory(numpy_server, b"limits-raw-decoded")
    with PeakRSS(list(pids.values())) as rss:
        # one item: 4 strings of 25M characters (4 bytes each) = 400 MB
        raw.send([hdr(P.REQUEST, 21, 0, [["<U25000000", [4]]]), b"\0" * 64])
        error = expect_error(raw, 21)
        names_limit(error, "max_msg_size", DEFAULT_MSG_SIZE)
        assert "400000000" in error.message
        # four items of 80 MB each: every one under the limit, 320 MB together over it
        raw.send([hdr(P.REQUEST, 22, 0, [["<U20000000", [1]]] * 4), *([b"\0" * 64] * 4)])
        names_limit(expect_error(raw, 22), "max_msg_size", DEFAULT_MSG_SIZE)
    assert_bounded(rss, pids)
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(client.encode(x), x)
    after = client.server_status
    assert after["num_rejected"] == before["num_rejected"] + 2
    assert role_pids(after) == pids


# -- (d) at the limit ---------------------------------------------------------------------------


def test_request_at_the_limit_is_served_one_more_is_refused(small_server, client_factory,
                                                           raw_factory):
    client = client_factory(small_server)
    items = list(range(SMALL_ITEMS))
    assert client.encode_batch(items) == items
    before = client.server_status
    with pytest.raises(BadInput) as info:  # refused by the client, nothing sent
        client.encode_batch([*items, 0])
    names_limit(info.value, "max_request_items", SMALL_ITEMS)
    assert client.server_status["num_rejected"] == before["num_rejected"]
    raw = raw_factory(small_server, b"limits-raw-edge")
    one = msgpack.packb(1)
    raw.send([hdr(P.REQUEST, 31, 0, [0] * SMALL_ITEMS), *([one] * SMALL_ITEMS)])
    assert expect_result(raw, 31) == [1] * SMALL_ITEMS
    raw.send([hdr(P.REQUEST, 32, 0, [0] * (SMALL_ITEMS + 1)), *([one] * (SMALL_ITEMS + 1))])
    names_limit(expect_error(raw, 32), "max_request_items", SMALL_ITEMS)
    assert client.encode_batch(items) == items


# -- (e) a client that skips its checks still meets the server's refusal ----------------------


@pytest.mark.parametrize("which, limit", [("small", SMALL_ITEMS), ("default", DEFAULT_ITEMS)])
def test_ignore_all_checks_client_gets_the_servers_refusal(which, limit, small_server,
                                                         default_server):
    server = small_server if which == "small" else default_server
    with connect(server, ignore_all_checks=True) as lax:
        before = lax.server_status
        with pytest.raises(BadInput) as info:
            lax.encode_batch(list(range(limit + 1)))
        names_limit(info.value, "max_request_items", limit)
        after = lax.server_status
        assert after["num_rejected"] == before["num_rejected"] + 1  # the server's refusal
        assert lax.encode_batch(list(range(limit))) == list(range(limit))
