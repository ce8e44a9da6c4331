"""Workers for the model-switch tests: the "model" is a number read from a file.

``<model_dir>/<model_name>`` holds one integer, the factor; predict multiplies each
input (a number) by it and answers ``[value * factor, model_version]``, so a test sees
which model computed each item. A missing file fails the load (``get_model`` raises).
"""

from __future__ import annotations

import os
from typing import Any

from wkr_serving.server import WKRHardWorker
from workers import wait_for_file


class FactorWorker(WKRHardWorker):
    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        path = os.path.join(model_dir, model_name or "model.txt")
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
        if text.startswith("gate "):  # "gate <factor>": load once <path>.release exists
            if not wait_for_file(path + ".release"):
                raise TimeoutError(f"{path}.release never appeared")
            text = text.split()[1]
        elif text.startswith("flaky "):  # "flaky <factor>": every second load fails
            with open(path + ".loads", "a+", encoding="utf-8") as log:
                log.seek(0)
                loads = len(log.read())
                log.write("x")
            if loads % 2 == 1:
                raise RuntimeError(f"load {loads + 1} of {path} failed (flaky model)")
            text = text.split()[1]
        return int(text)

    def get_metadata(self, model: Any) -> dict[str, Any]:
        return {"factor": model, "labels": ["low", "high"], "data_sample": [1],
                "data_type": "int"}

    def predict(self, model: Any, input: Any) -> Any:
        return [[x * model, self.model_version] for x in input]
