"""The Open Inference Protocol (KServe v2) REST API of the HTTP bridge (``server/http/v2.py``).

Driven mostly through the official client, ``tritonclient.http``, against real servers
with the bridge on: health and readiness (also while a slow model loads), server and
model metadata, inference with typed tensors in JSON and with the binary tensor
extension both ways, batches of rows becoming server items, several inputs and dict
outputs (protocol obj), BYTES tensors, compressed requests, the deadline parameter, the
bearer token, and error statuses with v2 error bodies (malformed requests are sent with
the stdlib ``http.client``, since the official client refuses to build them).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers import START_LIMIT_S, STOP_LIMIT_S, Gate, connect, serve, server_args, wait_until
from tritonclient.utils import InferenceServerException
from wkr_serving.client.version import __version__
from wkr_serving.server import WKRServer
from workers import ControlledWorker, EchoWorker, GateLoadWorker, touch

TOKEN = "v2-secret-token"


def auth() -> dict[str, str]:
    """The bearer header, a new dict each call (tritonclient's infer() adds keys to the
    headers dict it is given)."""
    return {"Authorization": f"Bearer {TOKEN}"}


HTTP_LIMIT_S = 30.0
HEADER_LENGTH = "Inference-Header-Content-Length"


def triton(port: int) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{port}",
                                            connection_timeout=HTTP_LIMIT_S,
                                            network_timeout=HTTP_LIMIT_S)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """One HTTP request with the stdlib: ``(status, headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_LIMIT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def post_json(port: int, path: str, body: Any, headers: dict[str, str] | None = None
              ) -> tuple[int, Any]:
    status, _, raw = call(port, "POST", path, json.dumps(body).encode(),
                          {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw)


def tensor_input(name: str, array: np.ndarray, binary: bool) -> httpclient.InferInput:
    datatype = "BYTES" if array.dtype == object else None
    tensor = httpclient.InferInput(name, list(array.shape), datatype or
                                   httpclient.np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def failure(call_: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call_()
    return info.value


# -- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def numpy_http(tmp_path_factory) -> Iterator[WKRServer]:
    """EchoWorker, protocol numpy, 1 worker, batch_size 8, bridge on; model "EchoWorker"."""
    yield from serve(tmp_path_factory, "v2_numpy", EchoWorker, "-protocol", "numpy",
                     "-num_worker", "1", "-batch_size", "8", "-cpu", "-http_port", "0")


@pytest.fixture(scope="module")
def np_client(numpy_http) -> Iterator[httpclient.InferenceServerClient]:
    client = triton(numpy_http.http_port)
    yield client
    client.close()


@pytest.fixture(scope="module")
def obj_http(tmp_path_factory) -> Iterator[WKRServer]:
    """ControlledWorker, protocol obj, 1 worker, ``-model_name controlled``, bridge with a
    bearer token."""
    yield from serve(tmp_path_factory, "v2_obj", ControlledWorker, "-protocol", "obj",
                     "-num_worker", "1", "-batch_size", "8", "-cpu", "-http_port", "0",
                     "-model_name", "controlled", "-http_token", TOKEN)


@pytest.fixture(scope="module")
def obj_client(obj_http) -> Iterator[httpclient.InferenceServerClient]:
    client = triton(obj_http.http_port)
    yield client
    client.close()


# -- health and metadata -----------------------------------------------------------------


def test_server_live_ready_and_metadata(np_client):
    assert np_client.is_server_live()
    assert np_client.is_server_ready()
    meta = np_client.get_server_metadata()
    assert meta["name"] == "wkr-serving"
    assert meta["version"] == __version__
    assert "binary_tensor_data" in meta["extensions"]


def test_model_named_after_worker_class_ready_and_metadata(np_client):
    assert np_client.is_model_ready("EchoWorker")
    assert np_client.is_model_ready("EchoWorker", model_version="1")
    meta = np_client.get_model_metadata("EchoWorker")
    assert meta["name"] == "EchoWorker"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "wkr-serving"
    for tensor in (*meta["inputs"], *meta["outputs"]):
        assert set(tensor) == {"name", "datatype", "shape"}
        assert tensor["shape"][0] == -1  # the batch dimension


def test_model_metadata_follows_the_requests(np_client):
    """After requests with rows of shape [3] then [5], the metadata shows the request's
    tensor names and datatypes, the dims that differed as -1. Retried because under a
    multi-process WSGI server the three calls may land in different processes (each
    keeps its own view)."""
    def described() -> Any:
        for rows in (np.zeros((2, 3), np.int16), np.ones((1, 5), np.int16)):
            np_client.infer("EchoWorker", [tensor_input("meta_in", rows, True)],
                            outputs=[httpclient.InferRequestedOutput("meta_out")])
        meta = np_client.get_model_metadata("EchoWorker")
        expected_in = [{"name": "meta_in", "datatype": "INT16", "shape": [-1, -1]}]
        expected_out = [{"name": "meta_out", "datatype": "INT16", "shape": [-1, -1]}]
        return meta if (meta["inputs"], meta["outputs"]) == (expected_in, expected_out) \
            else None

    wait_until(described, HTTP_LIMIT_S, "metadata describing the requests", interval=0.05)


def test_wrong_model_name_or_version(np_client, numpy_http):
    assert not np_client.is_model_ready("NoSuchModel")
    assert not np_client.is_model_ready("EchoWorker", model_version="7")
    error = failure(lambda: np_client.get_model_metadata("NoSuchModel"))
    assert error.status() == "404"
    assert "NoSuchModel" in error.message() and "EchoWorker" in error.message()
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    error = failure(lambda: np_client.infer("NoSuchModel", [tensor_input("x", x, True)]))
    assert error.status() == "404"
    error = failure(lambda: np_client.infer("EchoWorker", [tensor_input("x", x, True)],
                                            model_version="2"))
    assert error.status() == "404" and "version" in error.message()
    status, _, body = call(numpy_http.http_port, "GET", "/v2/models/NoSuchModel/ready")
    assert status == 404 and "NoSuchModel" in json.loads(body)["error"]


# -- inference, protocol numpy -----------------------------------------------------------


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=["FP32", "INT64"])
def test_infer_typed_tensor(np_client, dtype, binary_in, binary_out):
    x = (np.arange(12).reshape(3, 4) * 3 - 7).astype(dtype)
    if dtype == np.float32:
        x = x / np.float32(4)  # fractions survive JSON and binary alike
    result = np_client.infer(
        "EchoWorker", [tensor_input("INPUT0", x, binary_in)], request_id="req-42",
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)])
    y = result.as_numpy("OUTPUT0")
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    response = result.get_response()
    assert response["model_name"] == "EchoWorker" and response["model_version"] == "1"
    assert response["id"] == "req-42"
    output = response["outputs"][0]
    assert output["datatype"] == ("FP32" if dtype == np.float32 else "INT64")
    assert output["shape"] == [3, 4]
    if binary_out:
        assert output["parameters"]["binary_data_size"] == x.nbytes and "data" not in output
    else:
        assert output["data"] == x.reshape(-1).tolist()


def test_outputs_are_binary_by_default(np_client, numpy_http):
    """Without requested outputs tritonclient asks for binary_data_output; the raw
    response carries the header length and the little-endian bytes after the JSON."""
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    result = np_client.infer("EchoWorker", [tensor_input("INPUT0", x, False)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 8
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, -2]}],
            "parameters": {"binary_data_output": True}}
    status, headers, raw = call(numpy_http.http_port, "POST", "/v2/models/EchoWorker/infer",
                                json.dumps(body).encode())
    assert status == 200
    size = int(headers[HEADER_LENGTH])
    assert json.loads(raw[:size])["outputs"][0]["name"] == "OUTPUT0"
    assert raw[size:] == x.astype("<f4").tobytes()


def test_every_numeric_datatype_round_trips(np_client):
    for dtype in (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                  np.uint64, np.float16, np.float64):
        x = (np.arange(6).reshape(2, 3) % (2 if dtype == np.bool_ else 6)).astype(dtype)
        for binary in (False, True):
            result = np_client.infer(
                "EchoWorker", [tensor_input("INPUT0", x, binary)],
                outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
            y = result.as_numpy("OUTPUT0")
            assert y.dtype == x.dtype, (dtype, binary)
            np.testing.assert_array_equal(y, x)


def test_batch_rows_become_server_items(np_client, numpy_http):
    """A [7, 3] tensor is one request of 7 items for the server (batched there with
    other requests' items), and the stacked results equal the input."""
    status_client = connect(numpy_http)
    try:
        before = status_client.server_status
        x = np.random.default_rng(4).standard_normal((7, 3)).astype(np.float32)
        result = np_client.infer("EchoWorker", [tensor_input("rows", x, True)],
                                 outputs=[httpclient.InferRequestedOutput("echoed")])
        np.testing.assert_array_equal(result.as_numpy("echoed"), x)
        after = status_client.server_status
    finally:
        status_client.close()
    assert after["num_items"] - before["num_items"] == 7
    assert after["num_requests"] - before["num_requests"] == 1


def test_bytes_tensor_on_numpy_server(np_client):
    """BYTES travel as a numpy bytes array with -protocol numpy (no trailing NULs)."""
    x = np.array([[b"ab", b"c"], [b"", b"\xffz"]], dtype=object)
    result = np_client.infer("EchoWorker", [tensor_input("INPUT0", x, True)],
                             outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    assert result.as_numpy("OUTPUT0").tolist() == x.tolist()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(np_client, algorithm):
    x = np.arange(10, dtype=np.int64).reshape(5, 2)
    result = np_client.infer("EchoWorker", [tensor_input("INPUT0", x, True)],
                             request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def test_plain_json_request_with_nested_data(numpy_http):
    """curl-style: nested data, JSON response with flat data, ``id`` from the request,
    or else the X-Request-ID of the HTTP exchange."""
    body = {"id": "abc", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32",
                                     "data": [[1, 2], [3, 4]]}]}
    status, reply = post_json(numpy_http.http_port, "/v2/models/EchoWorker/versions/1/infer",
                              body)
    assert status == 200
    assert reply == {"model_name": "EchoWorker", "model_version": "1", "id": "abc",
                     "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [2, 2],
                                  "data": [1, 2, 3, 4]}]}
    del body["id"]
    status, reply = post_json(numpy_http.http_port, "/v2/models/EchoWorker/infer", body,
                              {"X-Request-ID": "trace-9"})
    assert status == 200 and reply["id"] == "trace-9"


def _infer_body(**input_fields: Any) -> dict[str, Any]:
    spec = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2], **input_fields}
    return {"inputs": [{k: v for k, v in spec.items() if v is not None}]}


BAD_REQUESTS = {
    "bad_datatype": (_infer_body(datatype="FP8"), "datatype"),
    "no_datatype": (_infer_body(datatype=None), "datatype"),
    "count_mismatch": (_infer_body(shape=[3]), "shape"),
    "scalar_shape": (_infer_body(shape=[], data=[1]), "shape"),
    "negative_dim": (_infer_body(shape=[-1], data=[1]), "shape"),
    "empty_batch": (_infer_body(shape=[0, 2], data=[]), "empty"),
    "not_numbers": (_infer_body(data=["a", "b"]), "FP32"),
    "ragged": (_infer_body(shape=[2, 2], data=[[1, 2], [3]]), "holds 4"),
    "uint8_overflow": (_infer_body(datatype="UINT8", data=[1, 300]), "UINT8"),
    "bytes_not_strings": (_infer_body(datatype="BYTES", data=[1, 2]), "strings"),
    "no_data": (_infer_body(data=None), "data"),
    "no_inputs": ({"inputs": []}, "inputs"),
    "duplicate_input": ({"inputs": [_infer_body()["inputs"][0]] * 2}, "twice"),
    "numpy_two_inputs": ({"inputs": [_infer_body()["inputs"][0],
                                     {**_infer_body()["inputs"][0], "name": "y"}]}, "one input"),
    "batch_mismatch": ({"inputs": [_infer_body()["inputs"][0],
                                   {"name": "y", "shape": [1], "datatype": "FP32",
                                    "data": [1]}]}, "batch"),
    "two_outputs_asked": ({**_infer_body(), "outputs": [{"name": "a"}, {"name": "b"}]},
                          "one output"),
    "classification": ({**_infer_body(), "outputs": [
        {"name": "a", "parameters": {"classification": 2}}]}, "classification"),
    "shared_memory": (_infer_body(parameters={"shared_memory_region": "r"}), "shared memory"),
    "bad_timeout": ({**_infer_body(), "parameters": {"timeout": -5}}, "timeout"),
    "missing_binary": (_infer_body(data=None, parameters={"binary_data_size": 8}), "runs past"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_400_with_v2_error(numpy_http, case):
    body, words = BAD_REQUESTS[case]
    status, reply = post_json(numpy_http.http_port, "/v2/models/EchoWorker/infer", body)
    assert status == 400, reply
    assert set(reply) == {"error"} and words in reply["error"], reply


def test_malformed_bodies(numpy_http):
    port, path = numpy_http.http_port, "/v2/models/EchoWorker/infer"
    status, _, raw = call(port, "POST", path, b"{not json")
    assert status == 400 and "JSON" in json.loads(raw)["error"]
    # binary data that no input claims, and a header length past the body
    header = json.dumps(_infer_body()).encode()
    status, _, raw = call(port, "POST", path, header + b"\0" * 8,
                          {HEADER_LENGTH: str(len(header))})
    assert status == 400 and "belong to no input" in json.loads(raw)["error"]
    status, _, raw = call(port, "POST", path, header, {HEADER_LENGTH: str(len(header) + 1)})
    assert status == 400 and HEADER_LENGTH in json.loads(raw)["error"]
    # binary data of the wrong size for its shape
    spec = {"name": "x", "shape": [2], "datatype": "FP32",
            "parameters": {"binary_data_size": 4}}
    header = json.dumps({"inputs": [spec]}).encode()
    status, _, raw = call(port, "POST", path, header + b"\0" * 4,
                          {HEADER_LENGTH: str(len(header))})
    assert status == 400 and "needs 8" in json.loads(raw)["error"]
    # a gzip body that is not gzip, and an unknown encoding
    status, _, raw = call(port, "POST", path, b"plain", {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in json.loads(raw)["error"]
    status, _, raw = call(port, "POST", path, b"{}", {"Content-Encoding": "br"})
    assert status == 415 and "br" in json.loads(raw)["error"]
    # and a well-formed gzip body still works through the stdlib too
    status, _, raw = call(port, "POST", path, gzip.compress(json.dumps(_infer_body()).encode()),
                          {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [1.0, 2.0]


def test_unknown_routes_and_methods_get_v2_errors(numpy_http):
    port = numpy_http.http_port
    status, _, raw = call(port, "GET", "/v2/models/EchoWorker/nothing")
    assert status == 404 and "/v2/models/EchoWorker/nothing" in json.loads(raw)["error"]
    status, _, raw = call(port, "GET", "/v2/models/EchoWorker/infer")
    assert status == 405 and "error" in json.loads(raw)
    status, _, raw = call(port, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(raw) == {"ready": True}


# -- inference, protocol obj (with a token) ----------------------------------------------


def test_token_needed_except_for_health(obj_client):
    assert obj_client.is_server_live()
    assert obj_client.is_server_ready()
    error = failure(obj_client.get_server_metadata)
    assert error.status() == "401" and "Bearer" in error.message()
    assert obj_client.get_server_metadata(headers=auth())["name"] == "wkr-serving"


def test_model_named_by_config(obj_client):
    assert obj_client.is_model_ready("controlled", headers=auth())
    assert not obj_client.is_model_ready("ControlledWorker", headers=auth())
    meta = obj_client.get_model_metadata("controlled", headers=auth())
    assert meta["name"] == "controlled" and meta["versions"] == ["1"]


def test_several_inputs_and_dict_outputs(obj_client):
    """Each row goes to the model as {input_name: row}; the model's dicts come back as
    one output per key, all of them or the ones asked for."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 2
    b = np.array([10, -20], dtype=np.int64)
    inputs = [tensor_input("a", a, True), tensor_input("b", b, False)]
    result = obj_client.infer("controlled", inputs, headers=auth())
    np.testing.assert_array_equal(result.as_numpy("a"), a)
    np.testing.assert_array_equal(result.as_numpy("b"), b)
    assert result.as_numpy("a").dtype == np.float32 and result.as_numpy("b").dtype == np.int64
    result = obj_client.infer("controlled", inputs, headers=auth(), outputs=[
        httpclient.InferRequestedOutput("b", binary_data=False)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["b"]
    assert result.get_response()["outputs"][0]["data"] == [10, -20]
    error = failure(lambda: obj_client.infer(
        "controlled", inputs, headers=auth(),
        outputs=[httpclient.InferRequestedOutput("c")]))
    assert error.status() == "400" and "'c'" in error.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_tensor_on_obj_server(obj_client, binary):
    x = np.array([[b"hello", "wörld".encode()], [b"", b"x y"]], dtype=object)
    result = obj_client.infer(
        "controlled", [tensor_input("text", x, binary)], headers=auth(),
        outputs=[httpclient.InferRequestedOutput("text", binary_data=binary)])
    y = result.as_numpy("text")
    assert y.shape == (2, 2)
    assert [v if isinstance(v, bytes) else v.encode() for v in y.reshape(-1)] == \
        x.reshape(-1).tolist()


def test_bytes_that_are_not_utf8_need_binary_output(obj_client):
    x = np.array([b"\xff\xfe"], dtype=object)
    result = obj_client.infer("controlled", [tensor_input("raw", x, True)], headers=auth())
    assert result.as_numpy("OUTPUT0").tolist() == [b"\xff\xfe"]
    error = failure(lambda: obj_client.infer(
        "controlled", [tensor_input("raw", x, True)], headers=auth(),
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)]))
    assert error.status() == "400" and "UTF-8" in error.message()


def test_model_error_is_500(obj_client):
    """Rows {"cmd": "raise", "message": m}: ControlledWorker's predict raises, the
    server answers ModelError, the bridge 500 with the message."""
    inputs = [tensor_input("cmd", np.array(["raise"], dtype=object), False),
              tensor_input("message", np.array(["boom-v2"], dtype=object), False)]
    error = failure(lambda: obj_client.infer("controlled", inputs, headers=auth()))
    assert error.status() == "500" and "boom-v2" in error.message()


def test_timeout_parameter_is_a_deadline(obj_client, obj_http, tmp_path):
    """While the only worker is blocked, a request with parameters.timeout (µs) fails
    with 504 instead of waiting; once released, requests work again."""
    gate = Gate(tmp_path, "v2-block")
    blocker = connect(obj_http)
    try:
        blocker.encode(gate.item("held"), blocking=False)
        gate.wait_started()
        x = np.array([1.0], dtype=np.float32)
        error = failure(lambda: obj_client.infer(
            "controlled", [tensor_input("x", x, True)], headers=auth(), timeout=300_000))
        assert error.status() == "504"
        gate.open()
        replies = blocker.fetch_all()
        assert replies[0]["value"] == "held" and replies[0]["released"]
        result = obj_client.infer("controlled", [tensor_input("x", x, True)], headers=auth())
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    finally:
        gate.open()
        blocker.close()


# -- readiness while the model loads -----------------------------------------------------


def test_ready_only_after_the_model_loads(tmp_path):
    """The bridge starts once the ventilator and sink are up: live at once, not ready
    (503) while GateLoadWorker's get_model waits, ready once released."""
    args = server_args(tmp_path, "-protocol", "numpy", "-num_worker", "1", "-cpu",
                       "-http_port", "0")
    release = os.path.join(str(tmp_path), "load-release")
    server = WKRServer(args, GateLoadWorker)
    server.start()
    client = None
    try:
        port = wait_until(lambda: server.http_port, START_LIMIT_S, "the HTTP bridge")
        client = triton(port)
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready("GateLoadWorker")
        status, _, raw = call(port, "GET", "/v2/health/ready")
        reply = json.loads(raw)
        assert status == 503 and reply["ready"] is False and "loading" in reply["error"]
        meta = client.get_model_metadata("GateLoadWorker")  # nothing seen yet: placeholder
        assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]}]
        assert not server.is_ready.is_set()  # the model really was still loading
        touch(release)
        server.wait_ready(START_LIMIT_S)
        wait_until(client.is_server_ready, HTTP_LIMIT_S, "v2 readiness")
        assert client.is_model_ready("GateLoadWorker")
    finally:
        if not os.path.exists(release):
            touch(release)
        if client is not None:
            client.close()
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()
