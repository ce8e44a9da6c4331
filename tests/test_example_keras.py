"""example/keras end to end: ``train.py`` trains and saves a Keras model, a real
``wkr-serving-start example/keras/worker.Worker ... -cpu -gpu_memory_fraction 0.3`` serves
it, and clients call it: the served probabilities equal the saved model's own in this
process, the evaluation scores the held-out flowers, the fraction reaches the worker, and
``client.py`` works against the server as its README says."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing as npt
import pytest
from helpers import REPO_DIR, CLIServer
from wkr_serving.client import ModelError, WKRClient

EXAMPLE = os.path.join(REPO_DIR, "example", "keras")
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
#: Seconds train.py / client.py may take (TensorFlow alone takes ~5 s to import).
SCRIPT_LIMIT_S = 90
#: The served model computes in another process, on batches of another size: float32
#: round-off only.
ATOL = 1e-5


class Served:
    """The trained model directory, the server and a client of it."""

    def __init__(self, model_dir: Path, train_output: str, server: CLIServer,
                 client: WKRClient) -> None:
        self.model_dir = model_dir
        self.train_output = train_output
        self.server = server
        self.client = client


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run one of the example's scripts as its README does (from the repository root)."""
    done = subprocess.run([sys.executable, *args], cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=SCRIPT_LIMIT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    model_dir = tmp_path_factory.mktemp("keras_model")
    trained = run_script(os.path.join(EXAMPLE, "train.py"), "--out", str(model_dir))
    server = CLIServer(["example/keras/worker.Worker", "-model_name", "iris.keras",
                        "-protocol", "numpy", "-num_worker", "1", "-batch_size", "16",
                        "-cpu", "-gpu_memory_fraction", "0.3"], model_dir, cwd=REPO_DIR)
    try:
        client = server.client(protocol="numpy")
        try:
            yield Served(model_dir, trained.stdout, server, client)
        finally:
            client.close()
    finally:
        server.close()


@pytest.fixture(scope="module")
def eval_set(served) -> tuple[np.ndarray, list[str]]:
    with open(served.model_dir / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.asarray([[float(r[k]) for k in FEATURES] for r in rows], dtype=np.float32)
    return x, [r["species"] for r in rows]


@pytest.fixture(scope="module")
def local_model(served) -> Any:
    """The saved model loaded in this process, as a user would."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras.models.load_model(served.model_dir / "iris.keras")


def test_train_writes_the_model_files(served):
    names = sorted(p.name for p in served.model_dir.iterdir() if not p.name.endswith(".txt"))
    assert {"iris.keras", "labels.json", "eval.csv"} <= set(names)
    assert "accuracy on the 38 held-out ones" in served.train_output


def test_predictions_equal_the_models_own(served, eval_set, local_model):
    x, _ = eval_set
    expected = np.asarray(local_model.predict_on_batch(x), dtype=np.float32)
    assert expected.shape == (len(x), 3)
    batch = np.stack(served.client.encode_batch(x))  # several items in one request
    one_by_one = np.stack([served.client.encode(row) for row in x[:5]])
    assert batch.dtype == np.float32 and batch.shape == expected.shape
    npt.assert_allclose(batch, expected, atol=ATOL)
    npt.assert_allclose(one_by_one, expected[:5], atol=ATOL)
    npt.assert_allclose(batch.sum(axis=1), 1.0, atol=ATOL)  # softmax probabilities
    # plain lists are inputs too (-protocol numpy makes them arrays)
    npt.assert_allclose(served.client.encode([5.1, 3.5, 1.4, 0.2]),
                        local_model.predict_on_batch(np.asarray([[5.1, 3.5, 1.4, 0.2]],
                                                                dtype=np.float32))[0],
                        atol=ATOL)


def test_evaluate_scores_the_held_out_flowers(served, eval_set, local_model):
    x, species = eval_set
    labels = served.client.metadata()["metadata"]["labels"]
    own = [labels[i] for i in np.argmax(local_model.predict_on_batch(x), axis=1)]
    expected_accuracy = float(np.mean([a == b for a, b in zip(own, species, strict=True)]))
    result = served.client.evaluate(x, species)
    assert result["task"] == "classification" and result["num"] == len(x) == 38
    assert result["accuracy"] == pytest.approx(expected_accuracy)
    assert result["accuracy"] >= 0.9  # iris is easy: a working model is near 1
    assert result["classes"] == ["setosa", "versicolor", "virginica"]
    assert sum(map(sum, result["confusion_matrix"])) == 38


def test_gpu_memory_fraction_reaches_the_worker(served):
    meta = served.client.metadata()
    assert meta["model_name"] == "iris.keras"
    worker = meta["metadata"]
    assert worker["gpu_memory_fraction"] == pytest.approx(0.3)
    assert worker["device"] == "cpu" and worker["gpus"] == []  # -cpu: no GPU visible
    assert worker["framework"].startswith("tensorflow ")
    assert worker["labels"] == ["setosa", "versicolor", "virginica"]
    assert "gpu_memory_fraction 0.3 (no GPU visible, the fraction does not apply)" in \
        served.server.stderr()


def test_bad_input_is_a_clear_error_and_the_server_goes_on(served):
    with pytest.raises(ModelError, match="each input must be 4 numbers"):
        served.client.encode(np.asarray([1.0, 2.0, 3.0], dtype=np.float32))
    assert served.client.encode([6.7, 3.0, 5.2, 2.3]).shape == (3,)


def test_client_script(served):
    done = run_script(os.path.join(EXAMPLE, "client.py"), "-port", str(served.server.port),
                      "-port_out", str(served.server.port_out),
                      "-eval", str(served.model_dir / "eval.csv"))
    lines = done.stdout.splitlines()
    assert "gpu_memory_fraction 0.3" in lines[0] and "on cpu" in lines[0]
    assert lines[1].startswith("[5.1, 3.5, 1.4, 0.2] -> setosa (p = ")
    assert lines[2].startswith("evaluated on 38 flowers: accuracy ")
