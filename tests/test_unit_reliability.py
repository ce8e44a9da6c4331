"""Unit tests of the pure parts behind issue 3's failure handling: deadline expiry in the
batch queue, the log throttle, the new configuration checks, exit descriptions, the
client's frame-size check and the opt-in pickle item."""

from __future__ import annotations

import fractions
import logging
import signal

import numpy as np
import pytest
from wkr_serving.client import ClientUsageError, ProtocolError
from wkr_serving.client import protocol as P
from wkr_serving.client.base import check_frame_sizes, request_frames
from wkr_serving.server import ServerConfig
from wkr_serving.server.batching import BatchQueue, Request
from wkr_serving.server.config import ConfigError, load_config
from wkr_serving.server.logs import LogThrottle
from wkr_serving.server.supervisor import describe_exit


def request(req_id: int, n: int, deadline: float) -> Request:
    return Request(b"c", req_id, 0.0, deadline, [0] * n, [b"x"] * n)


# -- BatchQueue.expire --------------------------------------------------------------------


def test_expire_removes_only_overdue_requests_at_the_front():
    q = BatchQueue()
    q.push(request(1, 2, deadline=5.0))
    q.push(request(2, 3, deadline=6.0))
    q.push(request(3, 1, deadline=0.0))  # no deadline
    q.push(request(4, 1, deadline=5.5))  # overdue, but behind a live request
    expired = q.expire(now=6.0)
    assert [(r.req_id, off, n) for r, off, n in expired] == [(1, 0, 2), (2, 0, 3)]
    assert len(q) == 2
    assert [r.req_id for r, _, _ in q.take(10)] == [3, 4]


def test_expire_returns_the_untaken_rest_of_a_split_request():
    q = BatchQueue()
    q.push(request(1, 5, deadline=1.0))
    assert [(off, n) for _, off, n in q.take(2)] == [(0, 2)]
    expired = q.expire(now=2.0)
    assert [(r.req_id, off, n) for r, off, n in expired] == [(1, 2, 3)]
    assert len(q) == 0 and q.take(5) == []


def test_expire_keeps_requests_whose_deadline_is_ahead():
    q = BatchQueue()
    q.push(request(1, 1, deadline=10.0))
    assert q.expire(now=9.999) == []
    assert len(q) == 1


# -- LogThrottle ----------------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger("wkr_serving.test.throttle")
    logger.propagate = False
    handler = ListHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_log_throttle_logs_a_burst_then_summarises(captured):
    logger, handler = captured
    throttle = LogThrottle(logger, burst=3, period=10.0)
    logged = [throttle.log("bad message %d", i, now=100.0 + i * 0.1) for i in range(8)]
    assert logged == [True] * 3 + [False] * 5
    assert handler.lines == ["bad message 0", "bad message 1", "bad message 2"]
    assert throttle.log("bad message %d", 8, now=111.0)  # a new period
    assert handler.lines[3:] == ["... and 5 more like it in the last 10s", "bad message 8"]


def test_log_throttle_each_event_once_below_the_burst(captured):
    logger, handler = captured
    throttle = LogThrottle(logger, burst=10, period=60.0)
    for i in range(4):
        throttle.log("event %s", i, now=float(i))
    assert handler.lines == [f"event {i}" for i in range(4)]


# -- configuration --------------------------------------------------------------------------


def test_new_defaults():
    config = ServerConfig()
    assert config.max_queue_size == 10_000
    assert config.max_msg_size == 256 * 1024 * 1024
    assert config.worker_timeout == 0.0
    assert config.auth_token is None and config.allow_pickle is False
    assert config.curve_secret_key is None and config.curve_client_keys is None


@pytest.mark.parametrize("changes, message", [
    ({"max_queue_size": 0}, "max_queue_size"),
    ({"max_msg_size": 0}, "max_msg_size"),
    ({"max_msg_size": -2}, "max_msg_size"),
    ({"worker_timeout": -1.0}, "worker_timeout"),
    ({"auth_token": ""}, "auth_token"),
    ({"curve_client_keys": "/keys"}, "curve_secret_key"),
])
def test_new_settings_are_validated(changes, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**changes)


def test_auth_token_from_environment_and_redacted():
    config, _ = load_config(["w.W", "-max_msg_size", "-1", "-worker_timeout", "2.5"],
                            environ={"WKR_AUTH_TOKEN": "s3cret"})
    assert config.auth_token == "s3cret"
    assert config.max_msg_size == -1 and config.worker_timeout == 2.5
    shown = config.as_dict(redact=True)
    assert shown["auth_token"] == "<redacted>"
    assert "s3cret" not in repr(shown)
    assert config.as_dict()["auth_token"] == "s3cret"
    assert ServerConfig().as_dict(redact=True)["auth_token"] is None


# -- exits, frame sizes, pickle -------------------------------------------------------------


def test_describe_exit():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert describe_exit(-200) == "was killed by signal 200"


def test_frame_size_check_refuses_items_over_the_servers_limit():
    frames = request_frames(1, 1000, [np.zeros(100, np.uint8)], "numpy")
    check_frame_sizes(frames, {"max_msg_size": 100})
    check_frame_sizes(frames, {"max_msg_size": -1})
    check_frame_sizes(frames, {})
    with pytest.raises(ClientUsageError, match="max_msg_size of 99 bytes"):
        check_frame_sizes(frames, {"max_msg_size": 99})


def test_pickle_only_when_both_sides_opt_in():
    value = fractions.Fraction(1, 3)
    with pytest.raises(ProtocolError, match="cannot encode"):
        P.encode_item(value, "obj")
    meta, buf = P.encode_item(value, "obj", allow_pickle=True)
    assert meta == P.PICKLE_ITEM
    with pytest.raises(ProtocolError, match="pickled item refused"):
        P.decode_item(meta, buf)
    assert P.decode_item(meta, buf, allow_pickle=True) == value
    # msgpack-able values never become pickles, even when allowed
    assert P.encode_item({"a": 1}, "obj", allow_pickle=True)[0] == P.MSGPACK_ITEM


def test_garbage_pickle_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not a valid pickle"):
        P.decode_item(P.PICKLE_ITEM, b"\x80\x05garbage", allow_pickle=True)
    with pytest.raises(ProtocolError):
        P.decode_item(True, b"\x00")  # a bool is not the pickle meta


def test_check_metas_bounds_what_a_client_can_nest():
    P.check_metas([0, 1, ["<f4", [2, 3]], ["|u1", []]])
    P.check_metas([["<f4", [1] * P.MAX_NDIM]])
    for bad in (["<f4", [1] * (P.MAX_NDIM + 1)], ["<f4", [[1]]], [b"<f4", [1]], 2, True,
                ["<f4", (1,)], {"dtype": "<f4"}, ["<f4", [1], "extra"]):
        with pytest.raises(ProtocolError, match="item meta"):
            P.check_metas([0, bad])
