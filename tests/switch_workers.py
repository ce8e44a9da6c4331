"""Workers for the model-switch tests: the "model" is a number read from a file.

``<model_dir>/<model_name>`` holds one integer, the factor; predict multiplies each
input (a number) by it and answers ``[value * factor, model_version]``, so a test sees
which model computed each item. A missing file fails the load (``get_model`` raises).
"""

from __future__ import annotations

import os
from typing import Any

from wkr_serving.server import WKRHardWorker


class FactorWorker(WKRHardWorker):
    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        with open(os.path.join(model_dir, model_name or "model.txt"), encoding="utf-8") as fh:
            return int(fh.read().strip())

    def get_metadata(self, model: Any) -> dict[str, Any]:
        return {"factor": model, "labels": ["low", "high"], "data_sample": [1],
                "data_type": "int"}

    def predict(self, model: Any, input: Any) -> Any:
        return [[x * model, self.model_version] for x in input]
