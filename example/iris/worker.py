"""Serve the iris classifier, with an outlier score beside each prediction.

    python example/iris/train.py --out models
    wkr-serving-start example/iris/worker.Worker -model_dir models \
        -model_name iris.skops -protocol obj -http_port 8080 -bind 127.0.0.1

An input is one flower: 4 numbers (sepal length, sepal width, petal length, petal width
in cm), a list or an array. Its result::

    {"prediction": [p_setosa, p_versicolor, p_virginica],
     "is_outlier": false, "outlier_score": 0.42}

``prediction`` holds the class probabilities (classes 0, 1, 2: setosa, versicolor,
virginica); ``outlier_score`` is the IsolationForest's anomaly score (0..1, higher is
stranger; about 0.4 for a usual flower) and ``is_outlier`` says it is over the
detector's threshold (0.5).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from iris_model import FEATURES, LABELS, MODEL_FILE, OUTLIER_FILE, load_trusted
from wkr_serving.server import WKRHardWorker

#: What ``GET /predict/test`` computes: one flower (the first setosa of the data set).
SAMPLE = [5.1, 3.5, 1.4, 0.2]
SHAPE_HINT = (f"an iris input is {len(FEATURES)} numbers ({', '.join(FEATURES)}): a list "
              f"or an array of shape ({len(FEATURES)},)")


@dataclass
class Scored:
    """What ``predict`` returns: the class probabilities of a batch, with the features
    they were computed from (the postprocess scores those for outliers)."""

    features: np.ndarray  # (n, 4) float64
    probabilities: np.ndarray  # (n, 3) float64

    def __len__(self) -> int:
        return len(self.probabilities)


def features(batch: Any) -> np.ndarray:
    """The batch as an ``(n, 4)`` float64 array; a ValueError naming the expected shape
    for any input that is not 4 finite numbers."""
    if isinstance(batch, np.ndarray) and batch.ndim == 2:  # -protocol numpy: stacked
        rows = [batch[i] for i in range(len(batch))]
    else:
        rows = list(batch)
    out = np.empty((len(rows), len(FEATURES)), dtype=np.float64)
    for i, row in enumerate(rows):
        try:
            arr = np.asarray(row)
        except ValueError:  # ragged nested lists
            raise ValueError(f"{SHAPE_HINT}; got a ragged list") from None
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{SHAPE_HINT}; got values of type {arr.dtype}")
        if arr.shape != (len(FEATURES),):
            raise ValueError(f"{SHAPE_HINT}; got shape {arr.shape}")
        out[i] = arr
    if not np.isfinite(out).all():
        raise ValueError(f"{SHAPE_HINT}; got a NaN or infinite value")
    return out


class Worker(WKRHardWorker):
    """The classifier (``-model_name``, default iris.skops) and the outlier detector
    (outlier.skops beside it), both loaded with skops and a fixed list of trusted
    types (see iris_model.py)."""

    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        path = os.path.join(model_dir, model_name or MODEL_FILE)
        classifier = load_trusted(path)
        outlier = load_trusted(os.path.join(os.path.dirname(path), OUTLIER_FILE))
        # IsolationForest.predict calls an input an outlier when its score_samples is
        # below offset_: with the score as in the paper (-score_samples), when it is
        # over -offset_ (0.5 with contamination="auto").
        self.outlier = outlier
        self.threshold = float(-outlier.offset_)
        self.new_logger().info("iris model %s and outlier detector loaded (threshold %.3f)",
                               path, self.threshold)
        return classifier

    def predict(self, model: Any, input: Any) -> Scored:
        x = features(input)
        return Scored(x, model.predict_proba(x))

    def get_postprocess(self, envs: Any) -> Callable[[Scored], list[dict[str, Any]]]:
        def add_outlier_score(scored: Scored) -> list[dict[str, Any]]:
            scores = -self.outlier.score_samples(scored.features)
            return [{"prediction": p.tolist(), "is_outlier": bool(s > self.threshold),
                     "outlier_score": float(s)}
                    for p, s in zip(scored.probabilities, scores, strict=True)]

        return add_outlier_score

    def get_metadata(self, model: Any) -> dict[str, Any]:
        sample = np.asarray([SAMPLE])
        score = float(-self.outlier.score_samples(sample)[0])
        return {
            "labels": LABELS,
            "features": list(FEATURES),
            "data_type": "float64",
            "data_structure": f"(1,{len(FEATURES)})",
            "data_sample": [SAMPLE],
            "prediction_type": "float64",
            "prediction_structure": f"(1,{len(LABELS)})",
            "prediction_sample": model.predict_proba(sample)[0].tolist(),
            "outlier_type": "bool, float64",
            "outlier_structure": "(1,2)",
            "outlier_sample": [score > self.threshold, score],
            "outlier_threshold": self.threshold,
        }
