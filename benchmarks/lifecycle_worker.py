"""The model of ``benchmarks/lifecycle.py``: a small dense layer (64 -> 10 class scores)
whose weights are drawn from the seed written in ``<model_dir>/<model_name>``, so two
model files are two different models of the same cost."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from wkr_serving.server import WKRHardWorker

FEATURES = 64
CLASSES = 10


class DenseWorker(WKRHardWorker):
    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        with open(os.path.join(model_dir, model_name or "model.txt"), encoding="utf-8") as fh:
            seed = int(fh.read().strip())
        return np.random.default_rng(seed).standard_normal((FEATURES, CLASSES))

    def get_metadata(self, model: Any) -> dict[str, Any]:
        return {"labels": [f"class-{k}" for k in range(CLASSES)],
                "data_type": "float32", "data_structure": f"(1,{FEATURES})"}

    def predict(self, model: Any, input: Any) -> Any:
        batch = np.asarray(input, dtype=np.float32).reshape(-1, FEATURES)
        return (batch @ model).astype(np.float32)
