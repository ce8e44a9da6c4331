"""Serve the Keras iris classifier of ``train.py`` (TensorFlow, CPU or one GPU per worker).

    python example/keras/train.py --out /tmp/keras-model
    wkr-serving-start example/keras/worker.Worker -model_dir /tmp/keras-model \\
        -model_name iris.keras -protocol numpy -cpu -bind 127.0.0.1

An input is the four measurements of one flower, in cm; its result is the three class
probabilities (float32), in the order of ``get_metadata()["labels"]``.

TensorFlow is imported by :func:`~wkr_serving.server.helper.import_tf` in ``get_env``,
after the server has pinned the worker's device. On a GPU (``-device_map 0``) the worker
may use at most ``-gpu_memory_fraction`` of the card's memory (a logical device with that
memory limit); on the CPU the fraction is accepted and has no effect. Either way the
worker logs what it got and ``get_metadata`` reports it (``device``, ``gpu_memory_fraction``,
``gpus``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from wkr_serving.server import WKRHardWorker
from wkr_serving.server.helper import import_tf

MODEL_FILE = "iris.keras"
LABELS_FILE = "labels.json"
FEATURES = 4
SAMPLE = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


class Worker(WKRHardWorker):
    def get_env(self, device_id: int, tmp_dir: str) -> Any:
        tf = import_tf(device_id, verbose=False, gpu_memory_fraction=self.gpu_memory_fraction)
        threads = self.config.worker_threads()  # the server's per-worker thread budget
        if threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        self.gpus = _gpu_settings(tf)
        self.framework = f"tensorflow {tf.__version__}"
        where = "cpu" if device_id < 0 else f"gpu:{device_id}"
        if self.gpus:
            applied = ", ".join(f"{g['name']}: " + (f"memory limit {g['memory_limit_mib']} MiB"
                                                   if g["memory_limit_mib"] else
                                                   "memory growth")
                                for g in self.gpus)
        else:
            applied = "no GPU visible, the fraction does not apply"
        self.new_logger().info("TensorFlow %s on %s, %s intra-op thread(s); "
                               "gpu_memory_fraction %g (%s)", tf.__version__, where,
                               threads or "default", self.gpu_memory_fraction, applied)
        return tf

    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        tf = envs
        path = os.path.join(model_dir, model_name or MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no Keras model at {path}: run example/keras/train.py "
                                    f"--out {model_dir} first")
        model = tf.keras.models.load_model(path)  # the native .keras format: no pickle
        labels_path = os.path.join(os.path.dirname(path), LABELS_FILE)
        with open(labels_path) as f:
            self.labels = [str(name) for name in json.load(f)]
        # One call now: the first call builds the model's graph, so the first client
        # does not wait for it.
        self.predict(model, np.asarray(SAMPLE, dtype=np.float32))
        return model

    def predict(self, model: Any, input: Any) -> np.ndarray:
        try:
            x = np.asarray(input, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"each input must be {FEATURES} numbers (sepal length, sepal "
                             f"width, petal length, petal width in cm): {exc}") from None
        if x.ndim != 2 or x.shape[1] != FEATURES:
            raise ValueError(f"each input must be {FEATURES} numbers (sepal length, sepal "
                             f"width, petal length, petal width in cm); got items of shape "
                             f"{x.shape[1:]}")
        return np.asarray(model(x, training=False), dtype=np.float32)

    def get_metadata(self, model: Any) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "data_sample": SAMPLE,
            "data_type": "float32",
            "data_structure": f"({FEATURES},) sepal length, sepal width, petal length, "
                              "petal width (cm)",
            "prediction_type": "float32",
            "prediction_structure": f"({len(self.labels)},) class probabilities",
            "framework": self.framework,
            "device": "cpu" if self.device_id < 0 else f"gpu:{self.device_id}",
            "gpu_memory_fraction": self.gpu_memory_fraction,
            "gpus": self.gpus,
        }


def _gpu_settings(tf: Any) -> list[dict[str, Any]]:
    """The GPUs this worker's TensorFlow sees and what ``import_tf`` set on each: a memory
    limit in MiB (from ``-gpu_memory_fraction``) or memory growth (``None``)."""
    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        logical = tf.config.get_logical_device_configuration(gpu) or []
        limit = next((c.memory_limit for c in logical if c.memory_limit), None)
        out.append({"name": gpu.name, "memory_limit_mib": limit,
                    "memory_growth": bool(tf.config.experimental.get_memory_growth(gpu))})
    return out
