"""The HTTP bridge's core routes against a real server: /encode (both protocols, every
error status), status, health, metadata, the bearer token, X-Request-ID, CORS, and a
clean stop of the bridge's processes."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import Gate, connect, gone, http_call, running_server, serve, server_args, wait_until
from wkr_serving.client import errors as E
from wkr_serving.server import WKRServer
from workers import ControlledWorker, EchoWorker, GateLoadWorker, touch

LIMIT_S = 20


@pytest.fixture(scope="module")
def obj_http(tmp_path_factory):
    yield from serve(tmp_path_factory, "http_obj", ControlledWorker, "-http_port", "0", "-cpu",
                     "-num_worker", "1", "-batch_size", "4", "-max_queue_size", "4",
                     "-http_token", "s3cret", "-cors", "http://app.example")


@pytest.fixture(scope="module")
def numpy_http(tmp_path_factory):
    yield from serve(tmp_path_factory, "http_numpy", EchoWorker, "-http_port", "0", "-cpu",
                     "-protocol", "numpy")


AUTH = {"Authorization": "Bearer s3cret"}


def test_encode_one_input_and_a_batch(obj_http):
    status, _, body = http_call(obj_http, "/encode", {"data": {"a": [1, "x"]}}, AUTH)
    assert status == 200
    assert body == {"error_code": 0, "error_message": "", "data": {"a": [1, "x"]}}
    status, _, body = http_call(obj_http, "/encode", {"batch": ["p", 2, None, [3.5]]}, AUTH)
    assert status == 200 and body["data"] == ["p", 2, None, [3.5]]


def test_numpy_protocol_takes_arrays_with_a_dtype(numpy_http):
    status, _, body = http_call(numpy_http, "/encode", {"data": [[1, 2], [3, 4]], "dtype": "int64"})
    assert status == 200 and body["data"] == [[1, 2], [3, 4]]
    status, _, body = http_call(numpy_http, "/encode", {"batch": [[0.5, 1.5], [2.5, 3.5]],
                                                         "dtype": "float32"})
    assert status == 200 and body["data"] == [[0.5, 1.5], [2.5, 3.5]]
    status, _, meta = http_call(numpy_http, "/metadata")
    assert meta["protocol"] == "numpy" and meta["worker_class"] == "workers.EchoWorker"
    assert meta["input"]["dtype"] in ("<i8", "<f4") and meta["output"] is not None
    assert meta["versions"]["wkr_serving"]


@pytest.mark.parametrize("body, status, kind", [
    (b"not json", 400, "bad_input"),
    ({"nothing": 1}, 400, "bad_input"),
    ({"data": 1, "batch": [1]}, 400, "bad_input"),
    ({"batch": []}, 400, "bad_input"),
    ({"data": 1, "timeout": -5}, 400, "bad_input"),
    ({"data": {"cmd": "raise", "message": "boom-http"}}, 500, "model_error"),
])
def test_errors_have_real_http_statuses(obj_http, body, status, kind):
    got, _, reply = http_call(obj_http, "/encode", body, AUTH)
    assert got == status, reply
    # the status is the one the error's class states (client/errors.py)
    assert type(E.error_from_wire([kind, "", ""])).http_status == status
    assert reply["error_code"] == status and reply["error_type"] == kind
    assert reply["data"] is None and reply["error_message"]
    if kind == "model_error":
        assert "boom-http" in reply["error_message"]


def test_numpy_input_that_is_not_an_array_is_400(numpy_http):
    status, _, reply = http_call(numpy_http, "/encode", {"data": [[1, 2], [3]], "dtype": "float32"})
    assert status == 400 and reply["error_type"] == "bad_input"


def test_overload_is_429_and_a_passed_deadline_504(obj_http, tmp_path):
    gate = Gate(tmp_path, "http-hold")
    with connect(obj_http) as holder, connect(obj_http) as filler:
        try:
            holder.encode(gate.item("held"), blocking=False)
            gate.wait_started()
            for i in range(4):  # -max_queue_size 4
                filler.encode(i, blocking=False)
            wait_until(lambda: holder.server_status["queue_items"] == 4, LIMIT_S,
                       "a full queue")
            status, _, reply = http_call(obj_http, "/encode", {"data": "one more"}, AUTH)
            assert status == 429 and reply["error_type"] == "overloaded"
        finally:
            gate.open()
        filler.fetch_all()
        holder.fetch_all()
    gate = Gate(tmp_path, "http-late")
    with connect(obj_http) as holder:
        try:
            holder.encode(gate.item("held"), blocking=False)
            gate.wait_started()
            status, _, reply = http_call(obj_http, "/encode", {"data": "late", "timeout": 200},
                                         AUTH)
            assert status == 504, reply
        finally:
            gate.open()
        holder.fetch_all()


def test_token_guards_every_route_but_health(obj_http):
    for path in ("/status/server", "/status/client", "/metadata"):
        assert http_call(obj_http, path)[0] == 401
        assert http_call(obj_http, path, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http_call(obj_http, path, headers=AUTH)[0] == 200
    assert http_call(obj_http, "/encode", {"data": 1})[0] == 401
    assert http_call(obj_http, "/health/live")[0] == 200
    assert http_call(obj_http, "/health/ready")[0] == 200


def test_status_routes(obj_http):
    _, _, server = http_call(obj_http, "/status/server", headers=AUTH)
    assert server["ready"] is True and server["protocol"] == "obj"
    assert server["config"]["http_token"] == "<redacted>"
    _, _, clients = http_call(obj_http, "/status/client", headers=AUTH)
    assert clients["pool_size"] >= 1 and len(clients["clients"]) == clients["pool_size"]


def test_request_id_is_honoured_or_made_and_cors_is_sent(obj_http):
    _, headers, _ = http_call(obj_http, "/encode", {"data": 1},
                              {**AUTH, "X-Request-ID": "abc-123", "Origin": "http://app.example"})
    assert headers["X-Request-ID"] == "abc-123"
    assert headers["Access-Control-Allow-Origin"] == "http://app.example"
    _, headers, _ = http_call(obj_http, "/health/live")
    assert headers["X-Request-ID"]  # made by the bridge: unique per process and request


def test_ready_only_after_every_model_loaded(tmp_path):
    """The bridge starts while the model loads: live at once, ready only afterwards."""
    args = server_args(tmp_path, "-http_port", "0", "-cpu")
    server = WKRServer(args, GateLoadWorker)
    server.start()
    try:
        wait_until(lambda: server.http_port, LIMIT_S, "the bridge to start")
        wait_until(lambda: http_call(server, "/health/live")[0] == 200, LIMIT_S, "live")
        status, _, body = http_call(server, "/health/ready")
        assert status == 503 and body["ready"] is False and "loading" in body["reason"]
        touch(os.path.join(str(tmp_path), "load-release"))
        server.wait_ready(LIMIT_S * 3)
        wait_until(lambda: http_call(server, "/health/ready")[0] == 200, LIMIT_S, "ready")
    finally:
        touch(os.path.join(str(tmp_path), "load-release"))
        server.close(30)
    assert not server.is_alive()


def test_bridge_processes_stop_with_the_server(tmp_path):
    args = server_args(tmp_path, "-http_port", "0", "-cpu", "-http_workers", "2")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with running_server(args, EchoWorker) as server:
        assert http_call(server, "/encode", {"data": 7})[2]["data"] == 7
        bridge = [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in before]
        names = " ".join(" ".join(p.cmdline()) for p in bridge)
        assert len(bridge) >= 2 + 1 + 2  # ventilator, sink, worker, bridge + its workers
    wait_until(lambda: all(gone(p.pid) for p in bridge), 30, f"every process to end: {names}")


def test_waiting_for_a_call_slot_counts_against_the_timeout(tmp_path):
    """With -http_max_connect 1 and that one call blocked in the model, a second call
    with a 300 ms timeout gets 504 once its timeout is spent waiting for the slot (not
    after the first call ends), and the first still completes."""
    args = server_args(tmp_path, "-http_port", "0", "-cpu", "-num_worker", "1",
                       "-http_max_connect", "1")
    gate = Gate(tmp_path, "slot")
    with running_server(args, ControlledWorker) as server:
        first: dict[str, Any] = {}
        holder = threading.Thread(target=lambda: first.update(answer=http_call(
            server, "/encode", {"data": gate.item("held")}, timeout=60)), daemon=True)
        holder.start()
        try:
            gate.wait_started()
            started = time.monotonic()
            status, _, body = http_call(server, "/encode", {"data": 1, "timeout": 300})
            waited = time.monotonic() - started
            assert status == 504, body
            assert "-http_max_connect" in body["error_message"], body
            assert waited < 10, f"answered after {waited:.1f} s"
        finally:
            gate.open()
            holder.join(30)
        assert first["answer"][0] == 200 and first["answer"][2]["data"]["value"] == "held"
