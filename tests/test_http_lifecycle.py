"""The model's lifecycle over HTTP (server/http/lifecycle.py, /metadata in app.py, the v2
model repository), against real servers with the bridge:

- ``/health``, ``/metadata`` (the worker's get_metadata merged), ``/label``,
  ``/predict/test``, ``POST /predict`` (job id, extra fields), each with its errors;
- ``POST /evaluate``: JSON, a multipart upload of a CSV or JSON-lines file, the file as
  the body; metrics checked against scikit-learn; malformed files and mismatched lengths
  are 400s naming the problem; the body limit is a 413;
- switching models: ``tritonclient.http``'s ``get_model_repository_index`` and
  ``load_model``, the index's READY / LOADING / UNAVAILABLE states, a failed switch, a
  switch under concurrent HTTP and ZeroMQ load with no failed request, the v2 model
  name and version after it, ``/metrics``;
- who may switch: loopback peers, the bearer token (``-http_token``), a peer on another
  address (403, or allowed with the server's ``-auth_token``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import tritonclient.http as httpclient
from helpers import (
    HTTP_LIMIT_S,
    START_LIMIT_S,
    STOP_LIMIT_S,
    bridge_connections,
    connect,
    http_call,
    http_request,
    http_send,
    running_server,
    server_args,
    wait_until,
)
from lifecycle_workers import CENTROIDS, LABELS, SAMPLE, LifecycleModelWorker, classify, write_model
from sklearn.metrics import (
    accuracy_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)
from tritonclient.utils import InferenceServerException
from wkr_serving.client import errors as E
from wkr_serving.server import WKRServer
from workers import touch

#: Centroids of model "b": the same points with the classes in another order, so every
#: prediction of b differs from a's.
CENTROIDS_B = [CENTROIDS[2], CENTROIDS[0], CENTROIDS[1]]
#: Inputs of the evaluations: near each centroid, and a few between them.
POINTS = [[5.1, 3.5, 1.4, 0.2], [4.9, 3.0, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5],
          [5.7, 2.8, 4.1, 1.3], [6.3, 3.3, 6.0, 2.5], [7.2, 3.0, 5.8, 1.6],
          [6.0, 2.2, 5.0, 1.5], [5.6, 3.0, 4.5, 1.5], [4.6, 3.4, 1.4, 0.3]]
TRUTH = ["setosa", "setosa", "versicolor", "versicolor", "virginica", "virginica",
         "virginica", "versicolor", "versicolor"]


def models_dir(directory: Any) -> str:
    """A model directory with the models of these tests: a.json (tag a), b.json (the
    classes permuted), bad.json (fails to load), reg.json (a regressor), plain.json
    (describes nothing)."""
    write_model(directory, "a.json")
    write_model(directory, "b.json", centroids=CENTROIDS_B)
    write_model(directory, "bad.json", fail="boom-bad-model")
    write_model(directory, "reg.json", kind="regressor", coef=[2.0, -1.0], intercept=0.5)
    write_model(directory, "plain.json", describe=False)
    return str(directory)


def start(directory: Any, *flags: str) -> Any:
    return running_server(server_args(models_dir(directory), "-http_port", "0", "-cpu",
                                      *flags), LifecycleModelWorker)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[WKRServer]:
    """Model a.json, version v1, two workers; never switched (read-only tests)."""
    logs = tmp_path_factory.mktemp("lifecycle_logs")
    with start(tmp_path_factory.mktemp("lifecycle"), "-model_name", "a.json",
               "-model_version", "v1", "-num_worker", "2", "-batch_size", "4",
               "-max_request_items", "16", "-log_dir", str(logs), "-log_predictions",
               "-log_name", "life") as server:
        yield server


@pytest.fixture(scope="module")
def numpy_served(tmp_path_factory) -> Iterator[WKRServer]:
    """The regressor, -protocol numpy, a small body limit."""
    with start(tmp_path_factory.mktemp("lifecycle_np"), "-model_name", "reg.json",
               "-protocol", "numpy", "-num_worker", "1", "-http_max_body", "65536") as server:
        yield server


@pytest.fixture(scope="module")
def reg_served(tmp_path_factory) -> Iterator[WKRServer]:
    """The regressor, -protocol obj."""
    with start(tmp_path_factory.mktemp("lifecycle_reg"), "-model_name", "reg.json",
               "-num_worker", "1") as server:
        yield server


def post(server: WKRServer, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    status, _, reply = http_call(server, path, body, method="POST", **kwargs)
    return status, reply


def get(server: WKRServer, path: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, reply = http_call(server, path, **kwargs)
    return status, reply


def assert_envelope(reply: Any, status: int, kind: str, *words: str) -> None:
    assert reply["error_code"] == status and reply["error_type"] == kind, reply
    assert reply["data"] is None
    for word in words:
        assert word in reply["error_message"], (word, reply)


# -- describing the model -------------------------------------------------------------------

def test_health_is_ok_when_ready(served):
    assert get(served, "/health") == (200, {"health": "ok"})


def test_metadata_merges_the_workers_get_metadata(served):
    status, meta = get(served, "/metadata")
    assert status == 200
    assert meta["model_name"] == "a.json" and meta["model_version"] == "v1"
    assert meta["epoch"] == 0 and meta["switch"] is None
    # the worker's keys at top level, as in the prediction-log pattern
    assert meta["data_sample"] == SAMPLE and meta["labels"] == LABELS
    assert meta["data_type"] == "float32" and meta["prediction_structure"] == "(1,3)"
    assert meta["tag"] == "a.json"
    # the server's own keys win; the worker's value is kept aside
    assert meta["protocol"] == "obj"
    assert meta["model_metadata"] == {"protocol": "the model's own"}
    assert meta["worker_class"] == "lifecycle_workers.LifecycleModelWorker"
    assert meta["num_worker"] == 2 and meta["versions"]["wkr_serving"]


def test_label_is_an_index_to_name_object(served):
    assert get(served, "/label") == (200, {"0": "setosa", "1": "versicolor", "2": "virginica"})


def test_predict_test_computes_the_data_sample(served):
    status, headers, reply = http_call(served, "/predict/test")
    assert status == 200
    expected = classify({"centroids": CENTROIDS, "tag": "a.json"}, SAMPLE[0])
    assert reply["job_id"] == headers["X-Request-ID"]
    assert reply["prediction"] == pytest.approx(expected["prediction"])
    assert reply["is_outlier"] is False
    assert reply["outlier_score"] == pytest.approx(expected["outlier_score"])
    assert reply["tag"] == "a.json"


def test_predict_answers_with_the_job_id_and_extra_fields(served):
    status, headers, reply = http_call(served, "/predict", {"data": [[6.7, 3.0, 5.2, 2.3]]},
                                       {"X-Request-ID": "job-1934ee"})
    assert status == 200 and headers["X-Request-ID"] == "job-1934ee"
    expected = classify({"centroids": CENTROIDS, "tag": "a.json"}, [6.7, 3.0, 5.2, 2.3])
    assert set(reply) == {"job_id", "prediction", "is_outlier", "outlier_score", "tag"}
    assert reply["job_id"] == "job-1934ee"
    assert reply["prediction"] == pytest.approx(expected["prediction"])
    assert int(np.argmax(reply["prediction"])) == 2
    assert reply["is_outlier"] is False and reply["outlier_score"] < 1.0
    # an input far from every class is an outlier
    status, reply = post(served, "/predict", {"data": [[40.0, 0.0, 0.0, 9.0]]})
    assert status == 200 and reply["is_outlier"] is True and reply["outlier_score"] > 3.0
    # several inputs: one entry per input, in order, under one job id
    status, headers, reply = http_call(served, "/predict", {"data": POINTS[:3]})
    assert status == 200 and set(reply) == {"job_id", "results"}
    assert reply["job_id"] == headers["X-Request-ID"] and len(reply["results"]) == 3
    for point, result in zip(POINTS[:3], reply["results"], strict=True):
        assert result["prediction"] == pytest.approx(classify(
            {"centroids": CENTROIDS, "tag": "a.json"}, point)["prediction"])


def test_predict_job_id_reaches_the_prediction_log(served):
    status, reply = post(served, "/predict", {"data": [[5.0, 3.4, 1.5, 0.2]]},
                         headers={"X-Request-ID": "job-in-the-log"})
    assert status == 200 and reply["job_id"] == "job-in-the-log"
    path = os.path.join(served.config.log_dir, "life.predictions.jsonl")

    def logged() -> list[dict[str, Any]]:
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
        return [line for line in lines if "job-in-the-log" in json.dumps(line)]

    entries = wait_until(logged, HTTP_LIMIT_S, "the prediction log line of the job")
    assert "outlier_score" in json.dumps(entries[0])


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    ({"data": []}, ["non-empty list"]),
    ({"data": 5}, ["non-empty list"]),
    ({"inputs": [[1, 2, 3, 4]]}, ['{"data": [input, ...]}']),
    ({"data": [[1, 2, 3, 4]], "batch": [[1, 2, 3, 4]]}, ['{"data": [input, ...]}']),
    ({"data": [[1, 2, 3, 4]], "timeout": -1}, ["timeout"]),
    ({"data": [[1, 2, 3, 4]] * 17}, ["-max_request_items 16"]),
])
def test_predict_refuses_bad_bodies(served, body, words):
    status, reply = post(served, "/predict", body)
    assert status == 400
    assert_envelope(reply, 400, "bad_input", *words)


def test_predict_model_error_is_500(served):
    status, reply = post(served, "/predict", {"data": [[1.0, 2.0]]})  # 2 numbers, not 4
    assert status == 500
    assert_envelope(reply, 500, "model_error")


def test_label_and_predict_test_are_404_without_them(tmp_path):
    with start(tmp_path, "-model_name", "plain.json", "-num_worker", "1") as server:
        status, reply = get(server, "/label")
        assert status == 404
        assert_envelope(reply, 404, "no_labels", "declares no labels")
        status, reply = get(server, "/predict/test")
        assert status == 404
        assert_envelope(reply, 404, "no_data_sample", "declares no data_sample")
        status, meta = get(server, "/metadata")
        assert status == 200 and "labels" not in meta and "model_metadata" not in meta


def test_numpy_server_predict_test_with_several_samples(numpy_served):
    status, headers, reply = http_call(numpy_served, "/predict/test")
    assert status == 200 and reply["job_id"] == headers["X-Request-ID"]
    # two samples: [1, 2] and [3, 4] through 2*x0 - x1 + 0.5
    assert reply["results"] == [{"prediction": 0.5}, {"prediction": 2.5}]
    status, reply = get(numpy_served, "/label")
    assert status == 404 and reply["error_type"] == "no_labels"
    status, reply = post(numpy_served, "/predict", {"data": [[2, 1]], "dtype": "float32"})
    assert status == 200 and reply["prediction"] == 3.5 and set(reply) == {"job_id",
                                                                            "prediction"}


def test_health_is_503_while_the_model_loads(tmp_path):
    """Open /health says "not ready" (503) while get_model waits, the index says LOADING;
    then ok and READY."""
    gate = os.path.join(str(tmp_path), "load-release")
    models_dir(tmp_path)
    write_model(tmp_path, "slow.json", load_gate=gate)
    args = server_args(tmp_path, "-http_port", "0", "-cpu", "-num_worker", "1",
                       "-model_name", "slow.json", "-http_token", "tok")
    server = WKRServer(args, LifecycleModelWorker)
    server.start()
    try:
        port = wait_until(lambda: server.http_port, START_LIMIT_S, "the HTTP bridge")
        status, _, raw = http_request(f"http://127.0.0.1:{port}/health")
        reply = json.loads(raw)
        assert status == 503 and reply["health"] == "not ready", reply
        assert "loading" in reply["reason"]
        status, _, raw = http_request(f"http://127.0.0.1:{port}/v2/repository/index",
                                      headers={"Authorization": "Bearer tok"})
        index = json.loads(raw)
        assert status == 200 and index == [{"name": "slow.json", "version": "1",
                                            "state": "LOADING", "reason": index[0]["reason"]}]
        assert not server.is_ready.is_set()
        touch(gate)
        server.wait_ready(START_LIMIT_S)
        status, _, raw = http_request(f"http://127.0.0.1:{port}/health")
        assert status == 200 and json.loads(raw) == {"health": "ok"}
    finally:
        if not os.path.exists(gate):
            touch(gate)
        server.close(STOP_LIMIT_S)
    assert not server.is_alive()


# -- evaluation -----------------------------------------------------------------------------

def expected_classification(points: list[list[float]], truth: list[str]) -> dict[str, Any]:
    predicted = [LABELS[int(np.argmax(classify({"centroids": CENTROIDS, "tag": ""},
                                                 p)["prediction"]))] for p in points]
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(truth, predicted), "precision": precision,
            "recall": recall, "f1": f1, "predicted": predicted}


def assert_classification(result: dict[str, Any], points: list[list[float]],
                          truth: list[str]) -> None:
    want = expected_classification(points, truth)
    assert result["task"] == "classification" and result["num"] == len(points)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert result[key] == pytest.approx(want[key]), key
    assert 0.0 < want["accuracy"] < 1.0  # some right, some wrong: the numbers mean something


def test_evaluate_json_body(served):
    status, result = post(served, "/evaluate", {"inputs": POINTS, "labels": TRUTH,
                                                "details": True, "chunk_size": 4})
    assert status == 200, result
    assert_classification(result, POINTS, TRUTH)
    want = expected_classification(POINTS, TRUTH)["predicted"]
    assert [d["prediction"] for d in result["details"]] == want
    assert [d["correct"] for d in result["details"]] == [p == t for p, t in zip(want, TRUTH,
                                                                                strict=True)]
    status, result = post(served, "/evaluate", {"inputs": POINTS, "labels": TRUTH})
    assert status == 200 and "details" not in result


def multipart(server: WKRServer, content: bytes, filename: str, **fields: str,
              ) -> tuple[int, Any]:
    response = requests.post(f"http://127.0.0.1:{server.http_port}/evaluate",
                             files={"file": (filename, content)}, data=fields,
                             timeout=HTTP_LIMIT_S)
    return response.status_code, response.json()


def csv_of(points: list[list[float]], truth: list[Any]) -> bytes:
    rows = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    rows += [",".join(map(str, p)) + f",{t}" for p, t in zip(points, truth, strict=True)]
    return ("\n".join(rows) + "\n").encode()


def test_evaluate_csv_upload(served):
    status, result = multipart(served, csv_of(POINTS, TRUTH), "iris.csv",
                               label_column="species", details="true")
    assert status == 200, result
    assert_classification(result, POINTS, TRUTH)
    assert len(result["details"]) == len(POINTS)


def test_evaluate_jsonl_upload_and_raw_body(served):
    lines = [json.dumps({"input": p, "species": t}) for p, t in zip(POINTS, TRUTH,
                                                                     strict=True)]
    content = ("\n".join(lines) + "\n").encode()
    status, result = multipart(served, content, "data.txt", label_column="species",
                               format="jsonl")
    assert status == 200, result
    assert_classification(result, POINTS, TRUTH)
    # the file itself as the body, the fields as query parameters
    status, _, raw = http_request(
        f"http://127.0.0.1:{served.http_port}/evaluate?label_column=species",
        csv_of(POINTS, TRUTH), {"Content-Type": "text/csv"}, "POST")
    assert status == 200
    assert_classification(json.loads(raw), POINTS, TRUTH)


def test_evaluate_regression_against_sklearn(reg_served):
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(40, 2)).round(3)
    truth = (2.0 * inputs[:, 0] - inputs[:, 1] + 0.5 + rng.normal(scale=0.3, size=40)).round(3)
    predicted = 2.0 * inputs[:, 0] - inputs[:, 1] + 0.5
    status, result = post(reg_served, "/evaluate", {"inputs": inputs.tolist(),
                                                    "labels": truth.tolist()})
    assert status == 200, result
    assert result["task"] == "regression" and result["num"] == 40
    assert result["mae"] == pytest.approx(mean_absolute_error(truth, predicted))
    assert result["rmse"] == pytest.approx(np.sqrt(mean_squared_error(truth, predicted)))
    assert result["r2"] == pytest.approx(r2_score(truth, predicted))


def test_evaluate_on_a_numpy_server(numpy_served):
    inputs = [[1.0, 2.0], [3.0, 4.0], [0.5, 0.0]]  # 2*x0 - x1 + 0.5: 0.5, 2.5, 1.5
    status, result = post(numpy_served, "/evaluate", {"inputs": inputs,
                                                      "labels": [0.5, 3.5, 1.5],
                                                      "dtype": "float64", "details": True})
    assert status == 200, result
    assert result["task"] == "regression" and result["mae"] == pytest.approx(1 / 3)
    assert [d["error"] for d in result["details"]] == pytest.approx([0.0, -1.0, 0.0])


def test_evaluate_errors_name_the_problem(served):
    status, reply = post(served, "/evaluate", {"inputs": POINTS, "labels": TRUTH[:-1]})
    assert status == 400
    assert_envelope(reply, 400, "bad_input", "9 items", "8")
    status, reply = post(served, "/evaluate", {"inputs": [], "labels": []})
    assert status == 400 and reply["error_type"] == "bad_input"
    status, reply = post(served, "/evaluate", {"inputs": POINTS, "labels": TRUTH, "x": 1})
    assert status == 400 and "unknown field" in reply["error_message"]
    status, reply = post(served, "/evaluate", {"inputs": POINTS, "labels": TRUTH,
                                               "chunk_size": 0})
    assert status == 400 and "chunk_size" in reply["error_message"]
    # a malformed CSV: the error names the line
    bad = csv_of(POINTS[:3], TRUTH[:3]).replace(b"6.4,3.2", b"6.4,oops", 1)
    status, reply = multipart(served, bad, "bad.csv", label_column="species")
    assert status == 400
    assert_envelope(reply, 400, "bad_input", "line 4")
    short = csv_of(POINTS[:3], TRUTH[:3]).replace(b",setosa\n4.9", b"\n4.9", 1)
    status, reply = multipart(served, short, "short.csv", label_column="species")
    assert status == 400 and "line 2" in reply["error_message"], reply
    status, reply = multipart(served, csv_of(POINTS, TRUTH), "iris.csv", label_column="nope")
    assert status == 400 and "nope" in reply["error_message"]
    status, reply = multipart(served, csv_of(POINTS, TRUTH), "iris.csv")
    assert status == 400 and "label_column" in reply["error_message"]
    status, reply = multipart(served, csv_of(POINTS, TRUTH), "iris.csv",
                              label_column="species", format="xml")
    assert status == 400 and "format" in reply["error_message"]
    response = requests.post(f"http://127.0.0.1:{served.http_port}/evaluate",
                             files={"other": ("x.csv", b"a,b\n1,2\n")}, timeout=HTTP_LIMIT_S)
    assert response.status_code == 400 and '"file"' in response.json()["error_message"]
    # a model that cannot score these labels: the worker's error, as a 4xx/5xx envelope
    status, reply = post(served, "/evaluate", {"inputs": [[1.0, 2.0]], "labels": ["x"]})
    assert status == 500 and reply["error_type"] == "model_error"


def test_evaluate_body_over_the_limit_is_413(numpy_served):
    rows = [[float(i), 1.0] for i in range(4000)]  # ~70 KB of JSON, over -http_max_body 64 KiB
    status, reply = post(numpy_served, "/evaluate", {"inputs": rows, "labels": [0.0] * 4000})
    assert status == 413 and reply["error_type"] == "body_too_large"


# -- the model repository: index, load (switch), unload ---------------------------------------

def triton(server: WKRServer, headers: dict[str, str] | None = None,
           ) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}",
                                            connection_timeout=HTTP_LIMIT_S,
                                            network_timeout=120.0)


def test_index_load_parameters_and_unload_errors(served):
    client = triton(served)
    try:
        assert client.get_model_repository_index() == [
            {"name": "a.json", "version": "v1", "state": "READY", "reason": ""}]
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("a.json")
        assert "not supported" in str(info.value) and "load" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.load_model("a.json", config=json.dumps({"backend": "onnx"}))
        assert "not supported" in str(info.value)
    finally:
        client.close()
    status, reply = get(served, "/v2/repository/index")
    assert status == 200 and [r["state"] for r in reply] == ["READY"]
    status, reply = post(served, "/v2/repository/index", {"ready": "yes"})
    assert status == 400 and "ready" in reply["error"]
    for body, words in (({"parameters": {"model_dir": 5}}, "model_dir"),
                        ({"parameters": {"weights": "x"}}, "unknown load parameter"),
                        ({"parameters": []}, "parameters"), ([1], "JSON object")):
        status, reply = post(served, "/v2/repository/models/a.json/load", body)
        assert status == 400 and words in reply["error"], reply
    # a model directory the server refuses: the server's own error, nothing switched
    status, reply = post(served, "/v2/repository/models/a.json/load",
                         {"parameters": {"model_dir": "/no/such/dir"}})
    assert status in (400, 409) and reply["error"], reply
    assert get(served, "/metadata")[1]["epoch"] == 0


def tags_of(results: list[Any]) -> list[str]:
    return [r["tag"] for r in results]


def test_switch_over_http_under_load(tmp_path):
    """tritonclient's load_model switches a.json -> b.json while HTTP and ZeroMQ clients
    keep sending: no request fails, each is answered by a or by b, and after the switch
    only by b; then the version changes over a plain POST, and the whole server
    reports the new model (metadata, v2 model metadata, index, metrics)."""
    with start(tmp_path, "-model_name", "a.json", "-model_version", "v1", "-num_worker", "2",
               "-batch_size", "4") as server:
        stop = threading.Event()
        switched = threading.Event()  # set once load_model has returned
        failures: list[str] = []
        seen: list[list[tuple[bool, set[str]]]] = []  # per client: (after, tags) per request

        def http_load() -> None:
            calls: list[tuple[bool, set[str]]] = []
            with requests.Session() as session:
                while not stop.is_set():
                    after = switched.is_set()
                    response = session.post(f"http://127.0.0.1:{server.http_port}/predict",
                                            json={"data": POINTS[:3]}, timeout=HTTP_LIMIT_S)
                    if response.status_code != 200:
                        failures.append(f"HTTP {response.status_code}: {response.text}")
                        return
                    calls.append((after, set(tags_of(response.json()["results"]))))
            seen.append(calls)

        def zmq_load() -> None:
            calls: list[tuple[bool, set[str]]] = []
            with connect(server) as client:
                while not stop.is_set():
                    after = switched.is_set()
                    try:
                        calls.append((after, set(tags_of(client.encode_batch(POINTS[:2])))))
                    except E.WKRError as exc:
                        failures.append(f"ZeroMQ: {exc!r}")
                        return
            seen.append(calls)

        def requests_done() -> int:
            return int(get(server, "/status/server")[1]["num_requests"])

        threads = [threading.Thread(target=f) for f in (http_load, http_load, zmq_load)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: failures or requests_done() > 20, HTTP_LIMIT_S,
                       "traffic before the switch")
            client = triton(server)
            try:
                client.load_model("b.json")
                switched.set()
                assert client.get_model_repository_index() == [
                    {"name": "b.json", "version": "v1", "state": "READY", "reason": ""}]
            finally:
                client.close()
            done = requests_done()
            wait_until(lambda: failures or requests_done() > done + 20, HTTP_LIMIT_S,
                       "traffic after the switch")
        finally:
            stop.set()
            for t in threads:
                t.join(HTTP_LIMIT_S)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert len(seen) == 3
        for calls in seen:
            # every request answered by one model; a before the switch, only b after it
            assert all(len(tags) == 1 and tags <= {"a.json", "b.json"} for _, tags in calls)
            after = [tags for was_after, tags in calls if was_after]
            assert after and all(tags == {"b.json"} for tags in after), calls
        assert any(calls[0][1] == {"a.json"} for calls in seen)  # a answered before

        # a new version of the same model, over a plain POST
        status, report = post(server, "/v2/repository/models/b.json/load",
                              {"parameters": {"version": "v2"}})
        assert status == 200, report
        assert report["model_name"] == "b.json" and report["model_version"] == "v2"
        assert report["epoch"] == 2 and report["previous"]["model_version"] == "v1"
        status, meta = get(server, "/metadata")
        assert meta["model_name"] == "b.json" and meta["model_version"] == "v2"
        assert meta["epoch"] == 2 and meta["switch"]["state"] == "done"
        assert meta["tag"] == "b.json"
        status, reply = post(server, "/predict", {"data": [SAMPLE[0]]})
        assert reply["tag"] == "b.json" and int(np.argmax(reply["prediction"])) == 1
        client = triton(server)
        try:
            meta = client.get_model_metadata("b.json")
            assert meta["name"] == "b.json" and meta["versions"] == ["v2"]
            assert client.is_model_ready("b.json", "v2")
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("a.json")
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("b.json", "v1")
            tensor = httpclient.InferInput("INPUT0", [1, 4], "FP64")
            tensor.set_data_from_numpy(np.array([SAMPLE[0]]))
            result = client.infer("b.json", [tensor], model_version="v2")
            assert result.get_response()["model_version"] == "v2"
        finally:
            client.close()
        status, _, text = http_call(server, "/metrics", raw=True)
        assert status == 200
        assert b'wkr_model_info{epoch="2",model_name="b.json",model_version="v2"} 1.0' \
            in text, text.decode()[:3000]
        assert b"wkr_model_switches_total 2.0" in text
        assert b'wkr_model_switch_state{state="done"} 1.0' in text


def test_index_shows_loading_then_failed_switch(tmp_path):
    """During a switch the target is LOADING beside the READY current model; a switch whose
    model fails leaves the old model serving, answers 409, and the index shows the target
    UNAVAILABLE with the reason."""
    gate = os.path.join(str(tmp_path), "slow-release")
    with start(tmp_path, "-model_name", "a.json", "-num_worker", "1") as server:
        write_model(tmp_path, "slow.json", load_gate=gate)
        answer: list[tuple[int, Any]] = []
        switcher = threading.Thread(target=lambda: answer.append(post(
            server, "/v2/repository/models/slow.json/load",
            {"parameters": {"version": "s1"}}, timeout=120.0)))
        switcher.start()
        try:
            def loading() -> Any:
                index = get(server, "/v2/repository/index")[1]
                return index if len(index) == 2 else None

            index = wait_until(loading, HTTP_LIMIT_S, "the target to be LOADING")
            assert index == [{"name": "a.json", "version": "1", "state": "READY", "reason": ""},
                             {"name": "slow.json", "version": "s1", "state": "LOADING",
                              "reason": ""}]
            assert post(server, "/v2/repository/index", {"ready": True})[1] == index[:1]
            # a second switch meanwhile is refused (409), the first goes on
            status, reply = post(server, "/v2/repository/models/b.json/load")
            assert status == 409 and "under way" in reply["error"], reply
            status, reply = post(server, "/predict", {"data": [SAMPLE[0]]})
            assert status == 200 and reply["tag"] == "a.json"
        finally:
            touch(gate)
            switcher.join(120.0)
        assert not switcher.is_alive() and answer[0][0] == 200, answer
        assert get(server, "/v2/repository/index")[1] == [
            {"name": "slow.json", "version": "s1", "state": "READY", "reason": ""}]

        status, reply = post(server, "/v2/repository/models/bad.json/load")
        assert status == 409, reply
        assert reply["error_type"] == "switch_failed" and "boom-bad-model" in reply["error"]
        index = get(server, "/v2/repository/index")[1]
        assert index[0] == {"name": "slow.json", "version": "s1", "state": "READY",
                            "reason": ""}
        assert index[1]["name"] == "bad.json" and index[1]["state"] == "UNAVAILABLE"
        assert "boom-bad-model" in index[1]["reason"]
        status, reply = post(server, "/predict", {"data": [SAMPLE[0]]})
        assert status == 200 and reply["tag"] == "slow.json"
        status, _, text = http_call(server, "/metrics", raw=True)
        assert b'wkr_model_switch_state{state="failed"} 1.0' in text


def test_every_bridge_process_follows_a_switch(tmp_path):
    """With -http_workers 2, a switch asked of one bridge process is seen by the other at
    once: its v2 routes take the new name and version (it asks the server again when a
    request names a model it does not know), and refuse the old ones."""
    with start(tmp_path, "-model_name", "a.json", "-num_worker", "1",
               "-http_workers", "2") as server:
        conns = bridge_connections(server)
        try:
            for conn in conns:  # each process has learnt the model served now
                status, raw = http_send(conn, "GET", "/v2/models/a.json")
                assert status == 200 and json.loads(raw)["versions"] == ["1"]
            status, raw = http_send(conns[0], "POST", "/v2/repository/models/b.json/load",
                                    {"parameters": {"version": "v7"}})
            assert status == 200, raw
            for conn in conns:
                status, raw = http_send(conn, "GET", "/v2/models/b.json")
                assert status == 200 and json.loads(raw)["versions"] == ["v7"], raw
                status, raw = http_send(conn, "GET", "/v2/models/a.json")
                assert status == 404 and "b.json" in json.loads(raw)["error"]
                status, raw = http_send(conn, "GET", "/v2/repository/index")
                assert json.loads(raw) == [{"name": "b.json", "version": "v7",
                                            "state": "READY", "reason": ""}]
        finally:
            for conn in conns:
                conn.close()


def test_switch_with_the_http_token(tmp_path):
    with start(tmp_path, "-model_name", "a.json", "-num_worker", "1",
               "-http_token", "s3cret") as server:
        path = "/v2/repository/models/b.json/load"
        status, reply = post(server, path)
        assert status == 401 and reply["error"], reply
        status, reply = post(server, path, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        assert get(server, "/v2/repository/index")[0] == 401
        assert get(server, "/health")[0] == 200  # open, like /health/*
        status, reply = post(server, path, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and reply["model_name"] == "b.json", reply
        status, reply = get(server, "/label", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and reply["0"] == "setosa"


def other_address() -> str | None:
    """An IPv4 address of this host that is not loopback (None if it has none)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return str(a.address)
    return None


def test_switch_from_another_address_needs_a_token(tmp_path):
    """Without -http_token, a peer that is not loopback gets 403; with the server's
    -auth_token as bearer it may switch (the bridge passes that token to the server)."""
    from wkr_serving.server.http.lifecycle import control_refusal

    address = other_address()
    if address is None:  # a host with loopback only: the decision itself, for such a peer
        class Config:
            http_token = None
            auth_token = "srv"

        backend: Any = type("B", (), {"config": Config()})()
        assert control_refusal(backend, "192.0.2.7", None) is not None
        assert control_refusal(backend, "192.0.2.7", "Bearer srv") is None
        assert control_refusal(backend, "127.0.0.1", None) is None
        return
    with start(tmp_path, "-model_name", "a.json", "-num_worker", "1", "-bind", address,
               "-auth_token", "srv") as server:
        base = f"http://{address}:{server.http_port}"
        status, _, raw = http_request(base + "/v2/repository/models/b.json/load", b"",
                                      {"Content-Type": "application/json"}, "POST")
        reply = json.loads(raw)
        assert status == 403 and "own host" in reply["error"], reply
        assert reply["error_type"] == "forbidden"
        status, _, raw = http_request(base + "/v2/repository/index")
        assert status == 200 and json.loads(raw)[0]["name"] == "a.json"
        status, _, raw = http_request(base + "/v2/repository/models/b.json/load", b"",
                                      {"Authorization": "Bearer wrong"}, "POST")
        assert status == 403
        status, _, raw = http_request(base + "/v2/repository/models/b.json/load", b"",
                                      {"Authorization": "Bearer srv"}, "POST")
        assert status == 200 and json.loads(raw)["model_name"] == "b.json", raw
        status, _, raw = http_request(base + "/metadata")
        assert json.loads(raw)["model_name"] == "b.json"
