"""Workers for the HTTP lifecycle tests (``/metadata``, ``/label``, ``/predict``,
``/evaluate``, model switches over HTTP and from the dashboard).

The model is a JSON file ``<model_dir>/<model_name>`` (see :func:`write_model`), so a
switch to another file (or directory) changes what the model answers, and a test sees
which model computed each item: every result carries the file's ``tag``.

- ``"kind": "classifier"``: a nearest-centroid classifier over 4 numbers (iris-like):
  the result is ``{"prediction": [p0, p1, p2], "is_outlier": bool, "outlier_score":
  float, "tag": tag}`` (the probabilities are a softmax of minus the distances; the
  outlier score is the distance to the nearest centroid).
- ``"kind": "regressor"``: ``coef · x + intercept``, the result a plain number.
- ``"fail": message``: ``get_model`` raises (a model that cannot be loaded).
- ``"load_gate": path``: ``get_model`` waits (bounded) until ``path`` exists, so a test
  can watch a switch while its new model loads.
- ``"describe": false``: ``get_metadata`` returns ``{}`` (no labels, no sample).

Inputs that are dicts with a ``"cmd"`` of ``"block"`` (``helpers.Gate``) hold their
worker until released, like ``workers.ControlledWorker``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from wkr_serving.server import WKRHardWorker
from workers import touch, wait_for_file

#: The iris-like classifier of the tests: three centroids and their names.
CENTROIDS = [[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]]
LABELS = ["setosa", "versicolor", "virginica"]
#: The model's data sample (the pattern's) and the distance beyond which an input is an
#: outlier.
SAMPLE = [[5.1, 3.5, 1.4, 0.2]]
OUTLIER_DISTANCE = 3.0


def write_model(directory: Any, name: str, **fields: Any) -> str:
    """Write the model file ``directory/name``: ``{"kind": "classifier", "tag": name,
    "centroids": CENTROIDS, "labels": LABELS}`` updated with ``fields``; return its
    path."""
    model = {"kind": "classifier", "tag": name, "centroids": CENTROIDS, "labels": LABELS}
    model.update(fields)
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(model, fh)
    return path


def classify(model: dict[str, Any], x: Any) -> dict[str, Any]:
    """What the classifier answers for one input (also used by the tests to check)."""
    values = [float(v) for v in x]
    distances = [math.dist(values, c) for c in model["centroids"]]
    exps = [math.exp(-d) for d in distances]
    total = sum(exps)
    nearest = min(distances)
    return {"prediction": [e / total for e in exps], "is_outlier": nearest > OUTLIER_DISTANCE,
            "outlier_score": nearest, "tag": model["tag"]}


class LifecycleModelWorker(WKRHardWorker):
    """The model of the module docstring."""

    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        with open(os.path.join(model_dir, model_name or "model.json"), encoding="utf-8") as fh:
            model: dict[str, Any] = json.load(fh)
        if model.get("load_gate"):
            wait_for_file(model["load_gate"])
        if model.get("fail"):
            raise RuntimeError(str(model["fail"]))
        return model

    def get_metadata(self, model: Any) -> dict[str, Any]:
        if model.get("describe") is False:
            return {}
        if model.get("kind") == "regressor":
            return {"data_type": "float64", "data_structure": "(1,2)",
                    "data_sample": [[1.0, 2.0], [3.0, 4.0]], "prediction_type": "float64",
                    "prediction_structure": "(1,)", "tag": model["tag"]}
        return {"data_type": "float32", "data_structure": "(1,4)", "data_sample": SAMPLE,
                "prediction_type": "float32", "prediction_structure": "(1,3)",
                "prediction_sample": classify(model, SAMPLE[0])["prediction"],
                "outlier_type": "bool, float32", "outlier_structure": "(1,2)",
                "labels": model.get("labels"), "tag": model["tag"],
                # a key the server has too: the server's wins in /metadata
                "protocol": "the model's own"}

    def predict(self, model: Any, input: Any) -> Any:
        out = []
        for item in input:
            if isinstance(item, dict) and item.get("cmd") == "block":
                touch(item["started"])
                released = wait_for_file(item["release"])
                out.append({"value": item.get("value"), "released": released,
                            "tag": model["tag"]})
            elif model.get("kind") == "regressor":
                out.append(sum(c * float(v) for c, v in zip(model["coef"], item, strict=True))
                           + model.get("intercept", 0.0))
            else:
                out.append(classify(model, item))
        return out
