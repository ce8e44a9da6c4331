"""example/iris end to end: the README's commands (train, serve, the Python client, every
curl call, wkr-serving-evaluate, the prediction log) run as written, ports aside, against
one real server; answers checked against scikit-learn's own."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO_DIR, CLIServer, http_call, readme_commands, run, wait_until
from wkr_serving.client import ModelError, WKRClient

IRIS_DIR = os.path.join(REPO_DIR, "example", "iris")
README = os.path.join(IRIS_DIR, "README.rst")
#: The ports the README names, and what each becomes here.
README_ZMQ = ("5555", "5556")
README_HTTP = "localhost:8080"
#: Typical flowers of the data set (rows 0, 63 and 145 of load_iris) and their class.
KNOWN = [([5.1, 3.5, 1.4, 0.2], 0), ([6.1, 2.9, 4.7, 1.4], 1), ([6.7, 3.0, 5.2, 2.3], 2)]
FAR_AWAY = [9.0, 1.0, 9.0, 0.1]

if IRIS_DIR not in sys.path:
    sys.path.insert(0, IRIS_DIR)  # iris_model: the file names and the trusted types


def with_ports(command: str, server: CLIServer) -> list[str]:
    """``command`` as arguments, with the README's ports replaced by the server's."""
    command = command.replace(README_HTTP, f"127.0.0.1:{server.http_port}")
    ports = dict(zip(README_ZMQ, (str(server.port), str(server.port_out)), strict=True))
    return [ports.get(word, word) for word in shlex.split(command)]


@dataclass
class Iris:
    work: Path  # the README's current directory: example/ (a link), models/, logs/
    server: CLIServer
    commands: list[str]
    train_output: str

    @property
    def models(self) -> Path:
        return self.work / "models"

    def client(self) -> WKRClient:
        return WKRClient("127.0.0.1", self.server.port, self.server.port_out,
                         protocol="obj", timeout=20_000, connect_timeout=10_000)

    def command(self, start: str) -> list[str]:
        """The README commands that start with ``start``."""
        found = [c for c in self.commands if c.startswith(start)]
        assert found, f"the README has no command starting with {start!r}"
        return found


@pytest.fixture(scope="module")
def iris(tmp_path_factory) -> Iterator[Iris]:
    """The README's train command, then its server with the prediction log, run in a
    directory where ``example`` is a link to the repository's."""
    work = tmp_path_factory.mktemp("iris")
    (work / "example").symlink_to(os.path.join(REPO_DIR, "example"))
    commands = readme_commands(README)
    train = [c for c in commands if c.startswith("python example/iris/train.py")]
    assert train == ["python example/iris/train.py --out models"]
    train_output = run(shlex.split(train[0]), work)
    serve = [c for c in commands if c.startswith("wkr-serving-start")]
    assert len(serve) == 2, serve
    quick, logged = (shlex.split(c) for c in serve)
    assert logged == [*quick, "-log_dir", "logs", "-log_predictions"]
    args = logged[1:]
    args[args.index("-http_port") + 1] = "0"  # any free port (CLIServer: the others too)
    args[args.index("-log_dir") + 1] = str(work / "logs")
    server = CLIServer(args, work / "models", cwd=str(work))
    try:
        server.client().close()  # ready: every worker has loaded the model
        yield Iris(work, server, commands, train_output)
    finally:
        server.close()


def test_train_writes_models_and_eval_file(iris):
    for name in ("iris.skops", "outlier.skops", "eval.csv"):
        assert f"wrote models/{name}" in iris.train_output
    rows = (iris.models / "eval.csv").read_text().splitlines()
    assert rows[0] == "sepal_length,sepal_width,petal_length,petal_width,species"
    assert len(rows) == 1 + 45
    assert {r.rsplit(",", 1)[1] for r in rows[1:]} == {"setosa", "versicolor", "virginica"}
    # Deterministic: a second training (in this process: no second start of Python
    # and scikit-learn) writes the same evaluation file and models that give the same
    # answers.
    from iris_model import load_trusted

    again = iris.work / "again"
    spec = importlib.util.spec_from_file_location("iris_train", Path(IRIS_DIR, "train.py"))
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.train(str(again))["eval_rows"] == 45
    assert (again / "eval.csv").read_text() == (iris.models / "eval.csv").read_text()

    x = np.array([flower for flower, _ in KNOWN])
    for name in ("iris.skops", "outlier.skops"):
        first, second = load_trusted(iris.models / name), load_trusted(again / name)
        score = "predict_proba" if name == "iris.skops" else "score_samples"
        np.testing.assert_array_equal(getattr(first, score)(x), getattr(second, score)(x))


def test_readme_install_and_client(iris):
    install = iris.command("pip install")
    assert install == ["pip install . scikit-learn skops"]
    (call,) = iris.command("python example/iris/client.py")
    out = run(with_ports(call, iris.server), iris.work)
    lines = out.splitlines()
    assert lines[0].startswith("a setosa [5.1, 3.5, 1.4, 0.2]: setosa (p=")
    assert lines[1].startswith("a versicolor [6.4, 3.2, 4.5, 1.5]: versicolor (p=")
    assert lines[2].startswith("a virginica [6.7, 3.0, 5.2, 2.3]: virginica (p=")
    assert lines[3].startswith("no flower seen yet") and lines[3].endswith(" OUTLIER")
    assert not any(line.endswith("OUTLIER") for line in lines[:3])
    found = re.search(r"evaluation on 45 flowers of models/eval.csv: accuracy (\S+),", out)
    assert found and float(found.group(1)) > 0.9
    assert "[15, 0, 0]" in out  # the confusion matrix: every setosa found


def test_encode_known_flowers(iris):
    with iris.client() as client:
        metadata = client.metadata()["metadata"]
        assert metadata["labels"] == {0: "setosa", 1: "versicolor", 2: "virginica"}
        assert metadata["data_sample"] == [[5.1, 3.5, 1.4, 0.2]]
        for flower, species in KNOWN:
            for x in (flower, np.array(flower), np.array(flower, dtype=np.float32)):
                result = client.encode(x)
                assert set(result) == {"prediction", "is_outlier", "outlier_score"}
                p = result["prediction"]
                assert len(p) == 3 and abs(sum(p) - 1) < 1e-9
                assert int(np.argmax(p)) == species
                assert result["is_outlier"] is False
                assert 0 < result["outlier_score"] < 0.5
        far = client.encode(FAR_AWAY)
        assert far["is_outlier"] is True and far["outlier_score"] > 0.5


def test_scores_are_scikit_learns(iris):
    """The evaluation through the server equals scikit-learn's on the same model, and the
    answers are the models' own numbers."""
    from iris_model import LABELS, load_trusted
    from wkr_serving.client.evalfile import read_table

    classifier = load_trusted(iris.models / "iris.skops")
    outlier = load_trusted(iris.models / "outlier.skops")
    inputs, species = read_table(iris.models / "eval.csv", "species")
    x = np.stack(inputs)
    expected = float(np.mean([LABELS[c] == s for c, s in
                              zip(classifier.predict(x), species, strict=True)]))
    with iris.client() as client:
        metrics = client.evaluate(inputs, species)
        answers = client.encode_batch(inputs)
    assert metrics["num"] == 45 and metrics["accuracy"] > 0.9
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert f"held-out accuracy {expected:.3f}" in iris.train_output
    np.testing.assert_allclose([a["prediction"] for a in answers],
                               classifier.predict_proba(x), rtol=1e-12)
    scores = -outlier.score_samples(x)
    np.testing.assert_allclose([a["outlier_score"] for a in answers], scores, rtol=1e-12)
    assert [a["is_outlier"] for a in answers] == (outlier.predict(x) == -1).tolist()


def test_bad_input_fails_alone(iris):
    """A wrong shape is a ModelError naming the expected shape; the other requests of
    its batch still get their results (seen in the prediction log: the failed request
    shared a batch)."""
    log = iris.work / "logs" / "WKRServer.predictions.jsonl"
    bad_inputs: list[Any] = [[1.0, 2.0, 3.0], [[5.1, 3.5, 1.4, 0.2]], ["a", "b", "c", "d"],
                             [1.0, float("nan"), 1.0, 1.0], {"x": 1}]
    shared = False
    with iris.client() as client:
        for attempt in range(5):  # until a bad input is computed beside good ones
            ids = []
            for n in range(24):
                bad = n % 6 == 3
                x = bad_inputs[(n // 6) % len(bad_inputs)] if bad else KNOWN[n % 3][0]
                ids.append((f"bad-{attempt}-{n}" if bad else None, n % 3))
                client.encode(x, blocking=False, request_id=ids[-1][0])
            results = client.fetch_all(on_error="return")
            for (bad_id, species), result in zip(ids, results, strict=True):
                if bad_id is None:
                    assert int(np.argmax(result["prediction"])) == species
                else:
                    assert isinstance(result, ModelError), result
                    assert "an iris input is 4 numbers" in str(result)
                    assert "shape (4,)" in str(result)

            def logged(attempt: int = attempt) -> list[dict[str, Any]]:
                if not log.exists():
                    return []
                lines = [json.loads(line) for line in log.read_text().splitlines()]
                bad = [r for r in lines if r["request_id"].startswith(f"bad-{attempt}-")]
                return bad if len(bad) == 4 else []

            records = wait_until(logged, 10, "the failed requests in the prediction log")
            assert all(r["outcome"] == "model_error" for r in records)
            if any(r["batch_size"] > 1 for r in records):
                shared = True
                break
    assert shared, "no bad input ever shared a batch with good ones"


def test_readme_curl_calls(iris):
    seen = set()
    for command in iris.command("curl"):
        args = with_ports(command, iris.server)
        args[1:1] = ["--max-time", "30", "--fail-with-body"]
        answer = json.loads(run(args, iris.work))
        route = next(a for a in args if "127.0.0.1:" in a).split(str(iris.server.http_port))[1]
        seen.add(route)
        if route in ("/predict", "/predict/test"):
            assert answer["job_id"]
            assert len(answer["prediction"]) == 3
            assert isinstance(answer["is_outlier"], bool)
            assert isinstance(answer["outlier_score"], float)
        if route == "/predict/test":
            assert int(np.argmax(answer["prediction"])) == 0 and not answer["is_outlier"]
        elif route == "/encode":
            assert answer["error_code"] == 0
            assert int(np.argmax(answer["data"]["prediction"])) == 2
        elif route == "/label":
            assert answer == {"0": "setosa", "1": "versicolor", "2": "virginica"}
        elif route == "/metadata":
            for key in ("data_type", "data_structure", "data_sample", "prediction_type",
                        "prediction_structure", "prediction_sample", "outlier_type",
                        "outlier_structure"):
                assert key in answer, key
            assert answer["model_name"] == "iris.skops"
        elif route == "/evaluate":
            assert answer["num"] == 45 and answer["accuracy"] > 0.9
            assert answer["classes"] == ["setosa", "versicolor", "virginica"]
        elif route == "/v2/models/iris.skops/infer":
            outputs = {o["name"]: o for o in answer["outputs"]}
            assert outputs["prediction"]["shape"] == [2, 3]
            assert outputs["is_outlier"] == {"name": "is_outlier", "datatype": "BOOL",
                                             "shape": [2], "data": [False, False]}
            assert outputs["outlier_score"]["datatype"] == "FP64"
            probabilities = np.reshape(outputs["prediction"]["data"], (2, 3))
            assert np.argmax(probabilities, axis=1).tolist() == [0, 2]
        elif route != "/predict":
            raise AssertionError(f"a README curl call to {route} is not checked")
    assert seen == {"/encode", "/v2/models/iris.skops/infer", "/predict", "/predict/test",
                    "/label", "/metadata", "/evaluate"}


def test_readme_evaluate_cli(iris):
    (command,) = iris.command("wkr-serving-evaluate")
    args = with_ports(command, iris.server)
    args[0] = shutil.which(args[0]) or args[0]
    metrics = json.loads(run([*args, "-no_progress"], iris.work))
    assert metrics["num"] == 45 and metrics["accuracy"] > 0.9
    assert metrics["confusion_matrix"][0] == [15, 0, 0]


def test_prediction_log_has_outlier_score(iris):
    """The README's logged call, then its ``tail`` of the log: the line of that request
    holds the answer with its outlier score."""
    (logged_call,) = [c for c in iris.command("curl") if "X-Request-ID: flower-1" in c]
    log = iris.work / "logs" / "WKRServer.predictions.jsonl"

    def lines() -> list[dict[str, Any]]:
        """The log's lines of flower-1 (the curl test sent it too)."""
        if not log.exists():
            return []
        records = [json.loads(text) for text in log.read_text().splitlines()]
        return [r for r in records if r["request_id"] == "flower-1"]

    before = len(lines())
    answer = json.loads(run(with_ports(logged_call, iris.server), iris.work))
    assert answer["is_outlier"] is True and answer["job_id"] == "flower-1"
    records = wait_until(lambda: len(lines()) > before and lines(), 10,
                         "flower-1 in the prediction log")
    record = records[-1]
    assert record["outcome"] == "ok" and record["input"] == [[9.0, 1.0, 9.0, 0.1]]
    (output,) = record["output"]
    assert output == {k: answer[k] for k in ("prediction", "is_outlier", "outlier_score")}
    (tail,) = iris.command("tail")
    last = json.loads(run(shlex.split(tail), iris.work).strip())
    assert set(last["output"][0]) == {"prediction", "is_outlier", "outlier_score"}
    # /predict also runs through the bridge from Python, and /health says ready.
    status, _, health = http_call(iris.server, "/health")
    assert status == 200 and health == {"health": "ok"}


def test_untrusted_model_is_refused(iris, tmp_path):
    """A model file that needs a type outside TRUSTED_TYPES (here a "model" that would
    call os.system) is refused before anything is loaded, and the server does not
    start."""
    import skops.io as sio
    from iris_model import UntrustedModel, load_trusted
    from sklearn.preprocessing import FunctionTransformer

    bad = tmp_path / "iris.skops"
    sio.dump(FunctionTransformer(func=os.system), bad)
    shutil.copy(iris.models / "outlier.skops", tmp_path / "outlier.skops")
    with pytest.raises(UntrustedModel, match=r"not trusted: \['posix.system'\]"):
        load_trusted(bad)
    server = CLIServer(["example/iris/worker.Worker", "-model_name", "iris.skops",
                        "-protocol", "obj", "-startup_timeout", "60"], tmp_path,
                       cwd=REPO_DIR, name="untrusted")
    try:
        assert server.wait_exit(60) != 0
        assert "posix.system" in server.stderr()
    finally:
        server.close(0)
