"""Client options that change how replies are awaited."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import wait_until
from wkr_serving.client import ClientUsageError, WKRClient, WKRTimeoutError


def test_busy_polling_client_gets_every_result_in_order(numpy_server, client_factory):
    client = client_factory(numpy_server, busy_poll_us=2000)
    for i in range(200):
        x = np.full(4, i, dtype=np.float32)
        np.testing.assert_array_equal(client.encode(x), x)
    for i in range(50):
        client.encode(np.full(4, i, dtype=np.float32), blocking=False)
    got = client.fetch_all()
    assert [int(r[0]) for r in got] == list(range(50))


def test_busy_polling_still_honours_the_call_timeout(tmp_path, obj_server, client_factory):
    client = client_factory(obj_server, busy_poll_us=5000)
    release = tmp_path / "release"
    blocker = {"cmd": "block", "started": str(tmp_path / "a"), "release": str(release),
               "value": 1}
    blocker2 = dict(blocker, started=str(tmp_path / "b"))
    try:
        # One blocker per worker (each sent once the previous one runs, so they cannot
        # share a batch): the third request cannot finish within 300 ms.
        for item in (blocker, blocker2):
            client.encode(item, blocking=False)
            wait_until(lambda p=item["started"]: os.path.exists(p), 20, "a worker to block")
        with pytest.raises(WKRTimeoutError):
            client.encode("late", timeout=300)
    finally:
        release.touch()
    assert [r["value"] for r in client.fetch_all()] == [1, 1]


def test_negative_busy_poll_is_refused():
    with pytest.raises(ClientUsageError):
        WKRClient("127.0.0.1", 1, 2, busy_poll_us=-1, ignore_all_checks=True)
