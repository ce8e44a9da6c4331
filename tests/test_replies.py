"""REPLIES: the sink answers several requests of one client with one message."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from helpers import RawClient, connect, wait_until
from wkr_serving.client import ModelError, ProtocolError
from wkr_serving.client import protocol as P
from wkr_serving.client.base import parse_replies
from workers import touch

V = P.PROTOCOL_VERSION


def _frames(entries, payloads):
    return [P.pack([V, P.REPLIES, entries]), *payloads]


def test_parse_replies_splits_results_errors_and_values_in_order():
    a = np.arange(3, dtype=np.int16)
    meta, buf = P.encode_item(a, "numpy")
    frames = _frames([[7, P.RESULT, [meta, P.MSGPACK_ITEM]],
                      [8, P.ERROR, ["model_error", "bad", "tb"]],
                      [9, P.REPLY, {"x": 1}],
                      [10, P.RESULT, [P.MSGPACK_ITEM]]],
                     [bytes(buf), msgpack.packb("s"), msgpack.packb([1, 2])])
    replies = parse_replies(frames)
    assert [r.req_id for r in replies] == [7, 8, 9, 10]
    np.testing.assert_array_equal(replies[0].value[0], a)
    assert replies[0].value[1] == "s"
    assert isinstance(replies[1].error, ModelError) and replies[1].error.message == "bad"
    assert replies[2].value == {"x": 1}
    assert replies[3].value == [[1, 2]]


@pytest.mark.parametrize("entries, payloads", [
    ([[1, P.RESULT, [P.MSGPACK_ITEM]]], []),                       # frame missing
    ([[1, P.RESULT, [P.MSGPACK_ITEM]]], [b"\xc0", b"\xc0"]),       # one frame too many
    ([[1, P.RESULT]], []),                                         # entry too short
    ("not a list", []),
    ([[1, 99, None]], []),                                         # unknown kind
])
def test_malformed_replies_raise_protocol_error(entries, payloads):
    with pytest.raises(ProtocolError):
        parse_replies(_frames(entries, payloads))


def test_one_batch_of_a_clients_requests_comes_back_as_one_message(obj_server, tmp_path):
    """Both workers blocked, three requests queue up, then one batch takes them all."""
    release = str(tmp_path / "release")
    raw = RawClient(obj_server, b"coalesce-me")
    with connect(obj_server) as blocker, connect(obj_server) as watcher:
        try:
            for name in ("a", "b"):
                started = str(tmp_path / name)
                blocker.encode({"cmd": "block", "started": started, "release": release,
                                "value": name}, blocking=False)
                wait_until(lambda p=started: os.path.exists(p), 20, "a worker to block")
            base = watcher.server_status["queue_items"]
            for req_id in (1, 2, 3):
                meta, buf = P.encode_item(f"item-{req_id}", "obj")
                raw.send([P.pack([V, P.REQUEST, req_id, 20_000, [meta]]), buf])
            wait_until(lambda: watcher.server_status["queue_items"] == base + 3, 20,
                       "three queued requests")
        finally:
            touch(release)
        frames = raw.recv_frames()
        header = P.unpack_header(frames[0])
        assert header[1] == P.REPLIES
        replies = parse_replies(frames)
        assert [(r.req_id, r.value) for r in replies] == [
            (1, ["item-1"]), (2, ["item-2"]), (3, ["item-3"])]
        assert [r.embedding["value"] for r in blocker.fetch()] == ["a", "b"]
    raw.close()
