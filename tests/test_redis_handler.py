"""RedisHandler against a real redis-server: FIFO, db honoured, close, value round trips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import wait_until
from wkr_serving.client import ClientUsageError
from wkr_serving.client.helper import RedisHandler


def test_fifo_and_empty(redis_server):
    with RedisHandler("q", "127.0.0.1", redis_server.port) as h:
        assert h.pop() is None
        for n in range(5):
            h.push(n)
        assert len(h) == 5
        assert [h.pop() for _ in range(5)] == [0, 1, 2, 3, 4]
        assert h.pop() is None


def test_values_round_trip(redis_server):
    values = ["text", b"\x00bytes", 3, 2.5, None, True, [1, "a", [2.0]],
              {"k": [1, 2], "n": {"deep": b"x"}},
              np.arange(12, dtype=np.float32).reshape(3, 4),
              {"arr": np.array([1, 2, 3], dtype=np.int64), "s": "x"},
              np.array(["ab", "c"]), np.zeros((0, 3), dtype=np.uint8)]
    with RedisHandler("vals", "127.0.0.1", redis_server.port) as h:
        for v in values:
            h.push(v)
        for v in values:
            got = h.pop()
            if isinstance(v, np.ndarray):
                assert got.dtype == v.dtype and got.shape == v.shape
                np.testing.assert_array_equal(got, v)
            elif isinstance(v, dict) and "arr" in v:
                np.testing.assert_array_equal(got["arr"], v["arr"])
                assert got["s"] == "x"
            else:
                assert got == v
        h.set("key", {"a": np.ones(3)})
        np.testing.assert_array_equal(h.get("key")["a"], np.ones(3))
        assert h.get("missing") is None
        with pytest.raises(ClientUsageError):
            h.push(object())
        with pytest.raises(ClientUsageError):
            h.push(np.array([object()]))


def test_db_honoured(redis_server):
    with RedisHandler("q", "127.0.0.1", redis_server.port, db=3) as h3, \
            RedisHandler("q", "127.0.0.1", redis_server.port, db=0) as h0:
        h3.push("in three")
        assert h0.pop() is None
        h3.set("k", 1)
        assert h0.get("k") is None
        assert h3.pop() == "in three"
    raw = redis_server.client(db=3)
    try:
        assert raw.get("k") is not None
    finally:
        raw.close()


def test_close_really_closes(redis_server):
    h = RedisHandler("q", "127.0.0.1", redis_server.port)
    h.push(1)
    raw = redis_server.client()
    try:
        names = [c.get("laddr") for c in raw.client_list()]
        assert len(names) == 2  # the handler's connection and this one
        h.close()
        h.close()  # twice is fine
        # redis-server sees the close on its next read of that socket, not at once.
        wait_until(lambda: len(raw.client_list()) == 1, 10,
                   "redis-server to drop the handler's connection")
    finally:
        raw.close()


def test_import_without_redis():
    """``import wkr_serving.client`` (and its Redis modules) must not import redis."""
    code = ("import sys; import wkr_serving.client, wkr_serving.client.helper, "
            "wkr_serving.client.jobqueue, wkr_serving.client.queueworker; "
            "assert 'redis' not in sys.modules, 'redis imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
