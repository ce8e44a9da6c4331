"""The bridge's Coalescer (``server/http/app.py``): calls made in one turn of the event
loop travel as one request to a real server, each caller gets its own results, and one
caller's bad input fails no other call.

Driven in-process on the bridge's own ``Backend`` (the one the ASGI front awaits), so
that "one turn of the loop" is exact: ``asyncio.gather`` of N calls submits all of them
before the loop turns.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import connect, running_server, server_args
from wkr_serving.client import errors as E
from wkr_serving.server.config import ServerConfig
from wkr_serving.server.http.app import Backend
from workers import EchoWorker


@pytest.fixture(scope="module")
def numpy_server(tmp_path_factory):
    args = server_args(tmp_path_factory.mktemp("coalesce"), "-protocol", "numpy", "-cpu",
                       "-num_worker", "1", "-batch_size", "8")
    with running_server(args, EchoWorker) as server:
        yield server


def requests_seen(server) -> int:
    with connect(server) as client:
        return int(client.server_status["num_requests"])


def run_calls(server, calls: list[np.ndarray], max_request_items: int = 10_000):
    """Make ``calls`` (one item each) in one turn of a loop; return results or errors."""
    config = ServerConfig(protocol="numpy", batch_size=8,
                          max_request_items=max_request_items)

    async def main():
        backend = Backend(config, server.port, server.port_out)
        backend.attach(asyncio.get_running_loop())
        try:
            await backend.client()  # connected first: the calls then share one turn
            return await asyncio.gather(*(backend.aencode([x], None) for x in calls),
                                        return_exceptions=True)
        finally:
            await backend.aclose()

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_calls_of_one_turn_are_one_request_and_each_gets_its_own_results(numpy_server):
    calls = [np.full(3, i, dtype=np.float32) for i in range(20)]
    before = requests_seen(numpy_server)
    results = run_calls(numpy_server, calls)
    after = requests_seen(numpy_server)
    for x, got in zip(calls, results, strict=True):
        assert not isinstance(got, BaseException), got
        assert len(got) == 1 and np.array_equal(got[0], x)
    # 20 calls, at most 32 items a request (max(-batch_size, 32)): one request, plus
    # the status call of requests_seen itself is not a request
    assert after - before == 1


def test_merged_requests_respect_max_request_items(numpy_server):
    calls = [np.full(2, i, dtype=np.int64) for i in range(10)]
    before = requests_seen(numpy_server)
    results = run_calls(numpy_server, calls, max_request_items=4)
    after = requests_seen(numpy_server)
    assert all(np.array_equal(r[0], x) for x, r in zip(calls, results, strict=True))
    assert after - before == 3  # 4 + 4 + 2 items


def test_one_bad_input_fails_only_its_own_call(numpy_server):
    good = [np.arange(4, dtype=np.float64) + i for i in range(6)]
    bad = np.array([object(), 1], dtype=object)  # cannot travel: refused by the client
    calls = [*good[:3], bad, *good[3:]]
    results = run_calls(numpy_server, calls)
    assert isinstance(results[3], (E.BadInput, E.ProtocolError)), results[3]
    for x, got in zip([*good[:3], *good[3:]], [*results[:3], *results[4:]], strict=True):
        assert not isinstance(got, BaseException), got
        assert np.array_equal(got[0], x)
