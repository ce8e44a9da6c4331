"""The asyncio client against a real server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from helpers import CALL_TIMEOUT_MS, reserved_ports
from wkr_serving.client import (
    AsyncWKRClient,
    ConnectTimeout,
    ModelError,
    ProtocolMismatch,
    WKRTimeoutError,
)

LIMIT_S = 60


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, LIMIT_S))


def make(server, **kwargs):
    kwargs.setdefault("protocol", server.config.protocol)
    kwargs.setdefault("timeout", CALL_TIMEOUT_MS)
    return AsyncWKRClient("127.0.0.1", server.port, server.port_out, **kwargs)


def test_encode_batch_and_status(obj_server):
    async def main():
        async with make(obj_server) as client:
            one = await client.encode({"a": [1, 2]})
            many = await client.encode_batch(list(range(11)))
            status = await client.server_status()
            return one, many, status

    one, many, status = run(main())
    assert one == {"a": [1, 2]}
    assert many == list(range(11))
    assert status["ready"] is True and status["protocol"] == "obj"


def test_numpy_protocol(numpy_server):
    x = np.arange(12, dtype=np.int16).reshape(3, 4)

    async def main():
        async with make(numpy_server) as client:
            return await client.encode(x), await client.encode_batch(list(x))

    one, many = run(main())
    assert one.dtype == x.dtype and one.shape == x.shape
    np.testing.assert_array_equal(one, x)
    for g, row in zip(many, x, strict=True):
        np.testing.assert_array_equal(g, row)
        assert g.dtype == row.dtype


def test_many_coroutines_on_one_client_get_their_own_results(obj_server):
    async def main():
        async with make(obj_server) as client:
            async def one(i):
                if i % 5 == 0:
                    return await client.encode_batch([[i, k] for k in range(i % 7 + 1)])
                return await client.encode({"co": i})

            return await asyncio.gather(*(one(i) for i in range(300)))

    results = run(main())
    for i, got in enumerate(results):
        want = [[i, k] for k in range(i % 7 + 1)] if i % 5 == 0 else {"co": i}
        assert got == want


def test_model_error_and_continued_service(obj_server):
    async def main():
        async with make(obj_server) as client:
            with pytest.raises(ModelError, match="aio-poison") as info:
                await client.encode({"cmd": "raise", "message": "aio-poison"})
            assert info.value.traceback
            return await client.encode("after")

    assert run(main()) == "after"


def test_request_timeout(obj_server, tmp_path):
    from workers import touch, wait_for_file

    started, release = str(tmp_path / "started"), str(tmp_path / "release")

    async def main():
        async with make(obj_server) as client:
            with pytest.raises(WKRTimeoutError) as info:
                await client.encode({"cmd": "block", "started": started,
                                     "release": release}, timeout=300)
            assert not isinstance(info.value, ConnectTimeout)

    try:
        run(main())
        assert wait_for_file(started, 10)
    finally:
        touch(release)


def test_unreachable_server_gives_connect_timeout():
    with reserved_ports(2) as (port, port_out):
        client = AsyncWKRClient("127.0.0.1", port, port_out, connect_timeout=500,
                                timeout=5000)

        async def main():
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                await client.connect()
            return time.monotonic() - started

        elapsed = run(main())
    assert elapsed < 1.0


def test_protocol_mismatch(numpy_server):
    async def main():
        client = make(numpy_server, protocol="obj")
        with pytest.raises(ProtocolMismatch):
            await client.connect()

    run(main())


def test_pending_calls_fail_with_connection_lost_when_the_sink_dies(tmp_path):
    """A crashed sink: an awaiting call fails with ConnectionLost at once instead of
    waiting out its timeout; the supervisor starts another sink on the same port, and
    the same client carries on."""
    import os
    import signal

    from helpers import running_server, server_args, wait_until
    from wkr_serving.client import ConnectionLost
    from workers import ControlledWorker

    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-graceful_timeout", "1")
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with running_server(args, ControlledWorker) as server:

        async def main():
            async with make(server, timeout=30_000) as client:
                sink_pid = (await client.server_status())["sink_pid"]
                call = asyncio.ensure_future(client.encode(
                    {"cmd": "block", "started": started, "release": release}))
                await asyncio.get_running_loop().run_in_executor(
                    None, wait_until, lambda: os.path.exists(started), 20, "predict to start")
                t0 = time.monotonic()
                os.kill(sink_pid, signal.SIGKILL)
                with pytest.raises(ConnectionLost, match="dropped"):
                    await call
                waited = time.monotonic() - t0
                with open(release, "w", encoding="utf-8"):
                    pass  # let the held worker finish (its answer goes to the dead sink)
                assert await client.encode("after the crash") == "after the crash"
                assert (await client.server_status())["sink_pid"] != sink_pid
                return waited

        waited = run(main())
        assert waited < 10, f"ConnectionLost took {waited:.2f}s"
        assert server.is_alive() and server.supervisor.failure is None
