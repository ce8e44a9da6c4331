"""Evaluate, end to end: real servers serving real scikit-learn models (trained here,
pickled into the model directory), ``WKRClient.evaluate`` / ``AsyncWKRClient.evaluate``
checked against scikit-learn's metrics, a worker's own ``evaluate``, per-item details,
the ``wkr-serving-evaluate`` CLI on CSV and JSON-lines files, and live traffic served
while an evaluation runs."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pickle
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing as npt
import pytest
from eval_workers import CustomEvaluateWorker, ProbaWorker, SklearnWorker
from helpers import CALL_TIMEOUT_MS, connect, reserved_ports, running_server, server_args
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)
from wkr_serving.client import AsyncWKRClient, ClientUsageError, ModelError
from wkr_serving.server import WKRServer

#: Seconds one wkr-serving-evaluate run may take in these tests.
CLI_LIMIT_S = 120


# -- models and servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris() -> Any:
    return load_iris()


@pytest.fixture(scope="module")
def classifier(iris) -> LogisticRegression:
    """Trained on every other row, so that it errs on a few of all 150."""
    return LogisticRegression(max_iter=1000).fit(iris.data[::2], iris.target[::2])


@pytest.fixture(scope="module")
def regression_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 3.0 + rng.normal(scale=0.3, size=300)
    return x, y


@pytest.fixture(scope="module")
def regressor(regression_data) -> LinearRegression:
    x, y = regression_data
    return LinearRegression().fit(x[:150], y[:150])


def model_server(tmp_path_factory: Any, name: str, worker: type, model: Any,
                 *flags: str) -> Iterator[WKRServer]:
    """A server of ``worker`` with ``model`` pickled as its ``-model_name``."""
    model_dir = tmp_path_factory.mktemp(name)
    with open(model_dir / "model.pkl", "wb") as f:
        pickle.dump(model, f)
    args = server_args(model_dir, "-model_name", "model.pkl", "-protocol", "obj",
                       "-num_worker", "1", "-batch_size", "32", "-cpu", *flags)
    with running_server(args, worker) as server:
        yield server


@pytest.fixture(scope="module")
def clf_server(tmp_path_factory, classifier) -> Iterator[WKRServer]:
    yield from model_server(tmp_path_factory, "clf", SklearnWorker, classifier)


@pytest.fixture(scope="module")
def reg_server(tmp_path_factory, regressor) -> Iterator[WKRServer]:
    yield from model_server(tmp_path_factory, "reg", SklearnWorker, regressor)


@pytest.fixture(scope="module")
def proba_server(tmp_path_factory, classifier, iris) -> Iterator[WKRServer]:
    model = {"estimator": classifier, "labels": iris.target_names.tolist()}
    yield from model_server(tmp_path_factory, "proba", ProbaWorker, model)


@pytest.fixture(scope="module")
def custom_server(tmp_path_factory) -> Iterator[WKRServer]:
    yield from model_server(tmp_path_factory, "custom", CustomEvaluateWorker, None)


def check_classification(result: dict[str, Any], truth: list[Any], predicted: list[Any]
                         ) -> None:
    """``result`` has scikit-learn's numbers for these labels and predicted classes."""
    assert result["task"] == "classification"
    assert result["num"] == len(truth)
    classes = result["classes"]
    assert classes == sorted(set(truth) | set(predicted))
    npt.assert_allclose(result["accuracy"], accuracy_score(truth, predicted))
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro",
                                                 zero_division=0)
    npt.assert_allclose([result["precision"], result["recall"], result["f1"]], [p, r, f])
    p, r, f, s = precision_recall_fscore_support(truth, predicted, labels=classes,
                                                 zero_division=0)
    npt.assert_allclose(result["per_class"]["precision"], p)
    npt.assert_allclose(result["per_class"]["recall"], r)
    npt.assert_allclose(result["per_class"]["f1"], f)
    assert result["per_class"]["support"] == s.tolist()
    assert result["confusion_matrix"] == confusion_matrix(truth, predicted,
                                                          labels=classes).tolist()


def check_regression(result: dict[str, Any], truth: Any, predicted: Any) -> None:
    assert result["task"] == "regression"
    assert result["num"] == len(truth)
    npt.assert_allclose(result["mae"], mean_absolute_error(truth, predicted), rtol=1e-9)
    npt.assert_allclose(result["rmse"], np.sqrt(mean_squared_error(truth, predicted)),
                        rtol=1e-9)
    npt.assert_allclose(result["r2"], r2_score(truth, predicted), rtol=1e-9)


# -- WKRClient.evaluate ------------------------------------------------------------------------


def test_classifier_matches_sklearn(clf_server, iris, classifier):
    expected = classifier.predict(iris.data).tolist()
    seen: list[int] = []
    with connect(clf_server) as client:
        result = client.evaluate(list(iris.data), iris.target.tolist(), chunk_size=40,
                                 progress=seen.append)
    check_classification(result, iris.target.tolist(), expected)
    assert 0.8 < result["accuracy"] < 1.0  # a real model, with real mistakes
    assert seen == [40, 80, 120, 150]  # one call per chunk
    assert "details" not in result


def test_regressor_matches_sklearn(reg_server, regression_data, regressor):
    x, y = regression_data
    with connect(reg_server) as client:
        # An ndarray of inputs and numpy labels are taken as they are.
        result = client.evaluate(x, y)
    check_regression(result, y, regressor.predict(x))
    assert result["r2"] > 0.9


def test_score_vectors_named_by_the_models_labels(proba_server, iris, classifier):
    """Results are dicts ({"prediction": probabilities, "is_outlier", ...}); the labels
    are class names, which the worker's get_metadata()["labels"] gives to the argmax."""
    names = iris.target_names.tolist()
    truth = [names[i] for i in iris.target]
    expected = [names[i] for i in classifier.predict_proba(iris.data).argmax(axis=1)]
    with connect(proba_server) as client:
        assert client.metadata()["metadata"]["labels"] == names
        result = client.evaluate(list(iris.data), truth, details=True)
    check_classification(result, truth, expected)
    assert result["classes"] == names
    assert [d["prediction"] for d in result["details"]] == expected
    assert [d["correct"] for d in result["details"]] == [
        t == p for t, p in zip(truth, expected, strict=True)]


def test_details_one_entry_per_item(clf_server, iris, classifier):
    expected = classifier.predict(iris.data).tolist()
    with connect(clf_server) as client:
        result = client.evaluate(list(iris.data), iris.target.tolist(), details=True)
    details = result["details"]
    assert [d["index"] for d in details] == list(range(150))
    assert [d["label"] for d in details] == iris.target.tolist()
    assert [d["prediction"] for d in details] == expected
    assert sum(d["correct"] for d in details) == round(result["accuracy"] * 150)
    assert sum(not d["correct"] for d in details) > 0


def test_regression_details(reg_server, regression_data, regressor):
    x, y = regression_data
    with connect(reg_server) as client:
        result = client.evaluate(list(x[:20]), y[:20].tolist(), details=True)
    errors = [d["error"] for d in result["details"]]
    npt.assert_allclose(errors, regressor.predict(x[:20]) - y[:20], rtol=1e-9, atol=1e-12)
    check_regression(result, y[:20], regressor.predict(x[:20]))


def test_a_workers_own_evaluate(custom_server):
    inputs = list(range(10))
    labels = [2 * x if x % 2 == 0 else -1 for x in inputs]
    with connect(custom_server) as client:
        result = client.evaluate(inputs, labels, chunk_size=3)
        assert result["custom"] is True
        assert result["count"] == 10 and result["matches"] == 5
        assert result["num"] == 10  # added by the client
        # Details the worker did not give are computed by the client from the
        # predictions (here: classes, the labels being integers).
        detailed = client.evaluate(inputs, labels, details=True)
        assert [d["prediction"] for d in detailed["details"]] == [2 * x for x in inputs]
        assert sum(d["correct"] for d in detailed["details"]) == 5
        # The worker's evaluate raising is a ModelError naming the cause.
        with pytest.raises(ModelError, match="boom at label 3"):
            client.evaluate(inputs[:4], [0, 2, 4, "boom"])
        # The server keeps serving.
        assert client.encode(21) == 42


def test_default_evaluate_errors_reach_the_client(proba_server, iris):
    """Number labels against score vectors: the default evaluate says what is wrong."""
    with connect(proba_server) as client:
        with pytest.raises(ModelError, match="prediction 0 is"):
            client.evaluate(list(iris.data[:5]), [0.5, 1.5, 2.5, 0.5, 1.5])
        assert client.evaluate(list(iris.data[:5]), ["setosa"] * 5)["accuracy"] == 1.0


def test_length_mismatch_and_bad_arguments(clf_server, iris):
    with connect(clf_server) as client:
        sent = client.status["num_request"]
        with pytest.raises(ClientUsageError, match="150 inputs but 149 labels"):
            client.evaluate(list(iris.data), iris.target.tolist()[:-1])
        with pytest.raises(ClientUsageError, match="nothing to evaluate"):
            client.evaluate([], [])
        with pytest.raises(ClientUsageError, match="chunk_size"):
            client.evaluate(list(iris.data), iris.target.tolist(), chunk_size=0)
        assert client.status["num_request"] == sent  # refused before sending anything


def test_async_client(clf_server, iris, classifier):
    async def evaluate() -> tuple[dict[str, Any], list[int]]:
        seen: list[int] = []
        async with AsyncWKRClient("127.0.0.1", clf_server.port, clf_server.port_out,
                                  timeout=CALL_TIMEOUT_MS) as client:
            result = await client.evaluate(list(iris.data), iris.target.tolist(),
                                           details=True, chunk_size=64,
                                           progress=seen.append)
        return result, seen

    result, seen = asyncio.run(evaluate())
    expected = classifier.predict(iris.data).tolist()
    check_classification(result, iris.target.tolist(), expected)
    assert seen == [64, 128, 150]
    assert [d["prediction"] for d in result["details"]] == expected


def test_live_traffic_keeps_flowing(clf_server, iris, classifier):
    """While a 3,000-row evaluation runs, another client's calls are answered, correctly
    and promptly."""
    x = np.repeat(iris.data, 20, axis=0)
    y = np.repeat(iris.target, 20)
    expected = classifier.predict(iris.data).tolist()
    progress: list[int] = [0]
    started = threading.Event()
    finished = threading.Event()
    live_enough = threading.Event()
    outcome: dict[str, Any] = {}

    def on_progress(done: int) -> None:
        progress.append(done)
        started.set()
        if done >= len(x) // 2:
            # Half-way at the latest, the live client has had its turn (bounded).
            live_enough.wait(30)

    def evaluate() -> None:
        try:
            with connect(clf_server) as client:
                outcome["result"] = client.evaluate(x, y, chunk_size=100,
                                                    progress=on_progress)
        except BaseException as exc:  # reported by the test below
            outcome["error"] = exc
        finally:
            finished.set()

    thread = threading.Thread(target=evaluate, daemon=True)
    thread.start()
    latencies: list[float] = []
    during = 0
    try:
        assert started.wait(60), "the evaluation computed no chunk"
        with connect(clf_server) as live:
            for n in range(2000):  # bounded; ends when the evaluation does
                if finished.is_set():
                    break
                begin = time.monotonic()
                assert live.encode(iris.data[n % 150], timeout=10_000) == expected[n % 150]
                latencies.append(time.monotonic() - begin)
                if progress[-1] < len(x):
                    during += 1
                if during >= 20:
                    live_enough.set()
    finally:
        live_enough.set()
        thread.join(60)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    check_classification(outcome["result"], y.tolist(), np.repeat(expected, 20).tolist())
    assert during >= 20, f"only {during} live calls during the evaluation"
    assert max(latencies) < 5.0, f"a live call waited {max(latencies):.2f}s"


# -- wkr-serving-evaluate ----------------------------------------------------------------------


def run_cli(server: WKRServer | None, *args: str,
            ports: tuple[int, int] | None = None) -> subprocess.CompletedProcess[str]:
    """``wkr-serving-evaluate`` (this checkout's module) aimed at ``server``."""
    port, port_out = ports or (server.port, server.port_out)  # type: ignore[union-attr]
    return subprocess.run(
        [sys.executable, "-m", "wkr_serving.client.evaluate_cli", "-ip", "127.0.0.1",
         "-port", str(port), "-port_out", str(port_out), *args],
        capture_output=True, text=True, timeout=CLI_LIMIT_S, stdin=subprocess.DEVNULL)


def explain(out: subprocess.CompletedProcess[str]) -> str:
    return f"rc={out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-3000:]}"


def write_iris_csv(path: Path, iris: Any) -> None:
    lines = ["sepal_length,sepal_width,species,petal_length,petal_width"]
    for row, label in zip(iris.data, iris.target, strict=True):
        a, b, c, d = (repr(float(v)) for v in row)
        lines.append(f"{a},{b},{label},{c},{d}")
    path.write_text("\n".join(lines) + "\n")


def test_cli_csv(clf_server, iris, classifier, tmp_path):
    path = tmp_path / "iris.csv"
    write_iris_csv(path, iris)
    out = run_cli(clf_server, "-file", str(path), "-label_column", "species",
                  "-chunk_size", "32")
    assert out.returncode == 0, explain(out)
    result = json.loads(out.stdout)
    check_classification(result, iris.target.tolist(), classifier.predict(iris.data).tolist())
    # -details and -output: the same metrics, plus one entry per row, in the file.
    target = tmp_path / "result.json"
    out = run_cli(clf_server, "-file", str(path), "-label_column", "species", "-details",
                  "-output", str(target), "-protocol", "obj")
    assert out.returncode == 0, explain(out)
    assert out.stdout == ""
    written = json.loads(target.read_text())
    assert {k: v for k, v in written.items() if k != "details"} == result
    assert len(written["details"]) == 150


def run_cli_on_a_terminal(server: WKRServer, *args: str) -> tuple[int, str, str]:
    """``wkr-serving-evaluate`` with its stderr on a pseudo-terminal (100 columns), as a
    person runs it: returns (exit status, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "wkr_serving.client.evaluate_cli", "-ip", "127.0.0.1",
         "-port", str(server.port), "-port_out", str(server.port_out), *args],
        stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + CLI_LIMIT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, stdout.decode(), shown.decode(errors="replace")


def test_cli_progress_bar_on_a_terminal(clf_server, iris, classifier, tmp_path):
    path = tmp_path / "iris.csv"
    write_iris_csv(path, iris)
    code, stdout, shown = run_cli_on_a_terminal(
        clf_server, "-file", str(path), "-label_column", "species", "-chunk_size", "50")
    assert code == 0, shown
    assert "evaluate: 100%" in shown and "150/150" in shown, shown
    check_classification(json.loads(stdout), iris.target.tolist(),
                         classifier.predict(iris.data).tolist())
    # -no_progress: nothing on the terminal.
    code, stdout, shown = run_cli_on_a_terminal(
        clf_server, "-file", str(path), "-label_column", "species", "-no_progress")
    assert code == 0 and "evaluate" not in shown and json.loads(stdout)["num"] == 150


def test_cli_json_lines(reg_server, regression_data, regressor, tmp_path):
    x, y = regression_data
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"target": float(t), "features": row.tolist()}) + "\n"
                            for row, t in zip(x, y, strict=True)))
    out = run_cli(reg_server, "-file", str(path), "-label_column", "target")
    assert out.returncode == 0, explain(out)
    check_regression(json.loads(out.stdout), y, regressor.predict(x))


def test_cli_bad_files_and_arguments(tmp_path, iris):
    """Exit 2 with one line naming the problem; nothing needs a server for these."""
    bad = tmp_path / "bad.csv"
    write_iris_csv(bad, iris)
    lines = bad.read_text().splitlines()
    lines[7] = "5.1,3.5,0,1.4"  # line 8: a field short
    bad.write_text("\n".join(lines) + "\n")
    with reserved_ports(2) as (port, port_out):
        ports = (port, port_out)
        out = run_cli(None, "-file", str(bad), "-label_column", "species", ports=ports)
        assert out.returncode == 2, explain(out)
        assert "line 8: 4 fields, but the header has 5" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""
        jsonl = tmp_path / "bad.jsonl"
        jsonl.write_text('{"x": 1, "y": 1}\n{"x": 2, "y": 2}\n{"x": 3,\n')
        out = run_cli(None, "-file", str(jsonl), "-label_column", "y", ports=ports)
        assert out.returncode == 2 and "line 3: not valid JSON" in out.stderr, explain(out)
        out = run_cli(None, "-file", str(jsonl), "-label_column", "nope", ports=ports)
        assert out.returncode == 2 and "line 1: no 'nope' key" in out.stderr, explain(out)
        out = run_cli(None, "-file", str(tmp_path / "missing.csv"), "-label_column", "y",
                      ports=ports)
        assert out.returncode == 2 and "cannot read" in out.stderr, explain(out)
        out = run_cli(None, "-label_column", "y", ports=ports)  # no -file
        assert out.returncode == 2 and "-file" in out.stderr, explain(out)
        # A good file and no server: a server error, exit 1.
        good = tmp_path / "good.csv"
        write_iris_csv(good, iris)
        out = run_cli(None, "-file", str(good), "-label_column", "species", "-timeout",
                      "500", ports=ports)
        assert out.returncode == 1 and "cannot connect" in out.stderr, explain(out)


def test_numpy_protocol(tmp_path):
    """With -protocol numpy the inputs go as raw arrays and the evaluate request (a map)
    as msgpack: the server scores the model's own score vectors."""
    from workers import EchoWorker

    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-protocol", "numpy")
    with running_server(args, EchoWorker) as server, \
            connect(server, protocol="numpy") as client:
        result = client.evaluate(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), [1, 1, 1])
        assert result["accuracy"] == pytest.approx(2 / 3)
        assert result["confusion_matrix"] == [[0, 0], [1, 2]]
        regression = client.evaluate(np.array([1.0, 2.0, 4.0]), [1.0, 2.0, 3.0])
        assert regression["mae"] == pytest.approx(1 / 3)


def test_the_handshake_tells_the_chunk_size(tmp_path):
    """The server's -batch_size and -num_worker reach the client in its handshake, and an
    evaluation's chunks are one batch per worker."""
    from workers import EchoWorker

    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "5", "-cpu")
    with running_server(args, EchoWorker) as server, connect(server) as client:
        assert client._server_info["batch_size"] == 5
        assert client._server_info["num_worker"] == 2
        done: list[int] = []
        result = client.evaluate([1, 2, 3] * 9, [1, 2, 3] * 9, progress=done.append)
        assert result["accuracy"] == 1.0
        assert done == [10, 20, 27]
