"""Worker classes of the evaluate tests (tests/test_evaluate.py).

They live in an importable module because the server starts its workers with
multiprocessing *spawn*: the child re-imports this module by name. The models are real
scikit-learn estimators, trained by the test and pickled into the server's
``-model_dir`` under ``-model_name``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
from wkr_serving.server import WKRHardWorker


def load_pickle(model_dir: str, model_name: str | None) -> Any:
    with open(os.path.join(model_dir, model_name or "model.pkl"), "rb") as f:
        return pickle.load(f)  # the test's own file


def rows(input: Any) -> np.ndarray:
    """A batch of feature vectors as one 2-D float64 array."""
    return np.asarray([np.asarray(x, dtype=np.float64).reshape(-1) for x in input])


class SklearnWorker(WKRHardWorker):
    """A pickled scikit-learn estimator; ``predict`` is the estimator's (classes or
    numbers, as plain Python values). Evaluate is the default one."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        return load_pickle(model_dir, model_name)

    def predict(self, model, input):
        return model.predict(rows(input)).tolist()


class ProbaWorker(WKRHardWorker):
    """A pickled ``{"estimator": classifier, "labels": [names]}``: each result is a dict,
    ``{"prediction": class probabilities, "is_outlier": bool, "outlier_score": float}``;
    ``get_metadata`` gives the class names as ``labels``."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        return load_pickle(model_dir, model_name)

    def get_metadata(self, model):
        return {"labels": list(model["labels"]), "data_type": "float64"}

    def predict(self, model, input):
        scores = model["estimator"].predict_proba(rows(input))
        return [{"prediction": row, "is_outlier": bool(row.max() < 0.5),
                 "outlier_score": float(1.0 - row.max())} for row in scores]


class CustomEvaluateWorker(WKRHardWorker):
    """Doubles numbers; its own ``evaluate`` counts exact matches, and raises
    ``ValueError("boom ...")`` when a label is the string ``"boom"``."""

    def predict(self, model, input):
        return [x * 2 for x in input]

    def evaluate(self, predictions, labels):
        if "boom" in labels:
            raise ValueError(f"boom at label {labels.index('boom')}")
        matches = sum(1 for p, y in zip(predictions, labels, strict=True) if p == y)
        return {"custom": True, "count": len(predictions), "matches": matches,
                "pid": os.getpid()}
