"""Failures reach the caller as typed errors, and the server keeps serving."""

from __future__ import annotations

import re
import time

import msgpack
import pytest
from helpers import RawClient, connect, reserved_ports, wait_idle, wait_until
from wkr_serving.client import (
    BadInput,
    ConnectTimeout,
    ModelError,
    ProtocolMismatch,
    UnknownCommand,
    WKRClient,
    WKRTimeoutError,
)
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import error_from_wire
from workers import touch, wait_for_file


@pytest.fixture
def raw(obj_server):
    client = RawClient(obj_server, b"raw-test-client")
    yield client
    client.close()


def test_unreachable_server_gives_connect_timeout_quickly():
    with reserved_ports(2) as (port, port_out), pytest.raises(ConnectTimeout) as info:
        started = time.monotonic()
        WKRClient("127.0.0.1", port, port_out, connect_timeout=500, timeout=5000)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"ConnectTimeout after {elapsed:.2f}s for a 500 ms budget"
    assert isinstance(info.value, WKRTimeoutError) and isinstance(info.value, TimeoutError)
    assert str(port) in str(info.value)


def test_unreachable_server_with_deferred_checks_times_out_on_first_call():
    with reserved_ports(2) as (port, port_out):
        client = WKRClient("127.0.0.1", port, port_out, connect_timeout=300,
                           timeout=2000, ignore_all_checks=True)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                client.encode("x")
            assert time.monotonic() - started < 1.0
        finally:
            client.close()


def test_request_timeout_on_a_slow_model(obj_server, tmp_path):
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with connect(obj_server) as client:
        try:
            t0 = time.monotonic()
            with pytest.raises(WKRTimeoutError) as info:
                client.encode({"cmd": "block", "started": started, "release": release},
                              timeout=300)
            assert not isinstance(info.value, ConnectTimeout)
            assert time.monotonic() - t0 < 5.0
            assert wait_for_file(started, 10), "the request should have reached the model"
        finally:
            touch(release)
        # The late reply is dropped, and the client keeps working.
        assert client.encode("after") == "after"
        wait_idle(client)
        assert client.status["num_pending_request"] == 0


def test_model_error_carries_message_and_traceback(obj_client):
    with pytest.raises(ModelError) as info:
        obj_client.encode({"cmd": "raise", "message": "poison-pill-42"})
    error = info.value
    assert "poison-pill-42" in error.message
    assert "RuntimeError" in error.message
    assert error.traceback.strip(), "the server traceback text must be carried"
    assert "Traceback" in error.traceback and "poison-pill-42" in error.traceback
    assert "workers.py" in error.traceback  # points at the user's predict
    assert error.request_id is not None
    # The server keeps serving, on every worker.
    assert obj_client.encode_batch(list(range(12))) == list(range(12))
    assert obj_client.encode("still alive") == "still alive"


def send_alone(client, value):
    """Send ``value`` non-blocking and wait until the server finished it, so it shares
    no batch with other requests (fetching happens later)."""
    req_id = client.encode(value, blocking=False)
    wait_idle(client)
    return req_id


def test_fetch_reports_a_failed_request_in_place(obj_client):
    values = [0, 1, {"cmd": "raise", "message": "bad-2"}, 3]
    ids = [send_alone(obj_client, v) for v in values]
    responses = list(obj_client.fetch())
    assert [r.id for r in responses] == ids
    for i, r in enumerate(responses):
        if i == 2:
            assert r.error_code != 0 and "bad-2" in r.error_message and r.embedding is None
        else:
            assert r.error_code == 0 and r.error_message == "" and r.embedding == i


@pytest.mark.parametrize("mode", ["raise", "return", "warn"])
def test_fetch_all_error_modes(obj_client, mode):
    for i in range(3):
        send_alone(obj_client, {"cmd": "raise", "message": "m1"} if i == 1 else i)
    if mode == "raise":
        with pytest.raises(ModelError, match="m1"):
            obj_client.fetch_all(on_error="raise")
    elif mode == "return":
        got = obj_client.fetch_all(on_error="return")
        assert got[0] == 0 and got[2] == 2 and isinstance(got[1], ModelError)
    else:
        with pytest.warns(UserWarning, match="m1"):
            got = obj_client.fetch_all(on_error="warn")
        assert got == [0, None, 2]
    assert obj_client.fetch_all() == []


def test_predict_returning_wrong_number_of_results(obj_client):
    with pytest.raises(ModelError) as info:
        obj_client.encode({"cmd": "wrong_count"})
    match = re.search(r"(\d+) results for (\d+) inputs", info.value.message)
    assert match, info.value.message
    returned, given = int(match.group(1)), int(match.group(2))
    assert returned == given + 1
    assert obj_client.encode(5) == 5


def test_protocol_mismatch_at_construction(obj_server):
    with pytest.raises(ProtocolMismatch, match="obj"):
        connect(obj_server, protocol="numpy")


def test_protocol_mismatch_numpy_server(numpy_server):
    with pytest.raises(ProtocolMismatch, match="numpy"):
        connect(numpy_server, protocol="obj")


def test_unknown_command_via_raw_protocol(raw, obj_client):
    raw.send([P.pack([P.PROTOCOL_VERSION, P.COMMAND, 17, 0, "frobnicate", None])])
    header = raw.recv()
    assert header[1] == P.ERROR and header[2] == 17
    error = error_from_wire(header[3], header[2])
    assert isinstance(error, UnknownCommand)
    assert "frobnicate" in error.message
    # status is a known command, and the server still answers everybody
    raw.send([P.pack([P.PROTOCOL_VERSION, P.COMMAND, 18, 0, "status", None])])
    header = raw.recv()
    assert header[1] == P.REPLY and header[2] == 18 and header[3]["ready"] is True
    assert obj_client.encode("ok") == "ok"


def test_garbage_frames_are_rejected_not_fatal(raw, obj_client):
    raw.send([b"\xc1 not msgpack"])
    header = raw.recv()
    assert header[1] == P.ERROR and isinstance(error_from_wire(header[3]), BadInput)
    # a request whose metas do not match its payload frames
    raw.send([P.pack([P.PROTOCOL_VERSION, P.REQUEST, 5, 0, [0, 0]]), msgpack.packb(1)])
    header = raw.recv()
    assert header[1] == P.ERROR and header[2] == 5
    assert isinstance(error_from_wire(header[3]), BadInput)
    assert obj_client.encode("ok") == "ok"


def test_raw_request_roundtrip(raw):
    meta, buf = P.encode_item({"k": [1, 2]}, "obj")
    raw.send([P.pack([P.PROTOCOL_VERSION, P.REQUEST, 9, 5000, [meta]]), bytes(buf)])
    frames = raw.recv_frames()
    header = P.unpack_header(frames[0], expect=P.RESULT)
    assert header[2] == 9 and len(header[3]) == 1
    assert P.decode_item(header[3][0], frames[1]) == {"k": [1, 2]}


def test_failing_item_does_not_fail_other_clients_in_the_same_batch(obj_server, tmp_path):
    """Design brief: when a batch raises, the server isolates the failing item(s), so
    other clients' items in the same batch still succeed."""
    with connect(obj_server) as a, connect(obj_server) as b, connect(obj_server) as c:
        wait_idle(c)
        releases = [str(tmp_path / f"release-{i}") for i in range(2)]
        try:
            # Occupy both workers, so the next two requests queue up together.
            for i, release in enumerate(releases):
                started = str(tmp_path / f"started-{i}")
                c.encode({"cmd": "block", "started": started, "release": release},
                         blocking=False)
                assert wait_for_file(started, 20), "a worker should be blocked"
            a.encode({"cmd": "raise", "message": "only-a-fails"}, blocking=False)
            b.encode("b-is-fine", blocking=False)
            wait_until(lambda: c.server_status["queue_items"] == 2, 20,
                       "both requests to be queued")
        finally:
            for release in releases:
                touch(release)
        assert len(c.fetch_all()) == 2
        with pytest.raises(ModelError, match="only-a-fails"):
            a.fetch_all()
        assert b.fetch_all() == ["b-is-fine"]
