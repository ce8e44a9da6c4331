"""W2: a fixed numpy MLP, 256 -> 1024 -> 1024 -> 16 with ReLU. Batching pays here.

Weights come from ``np.random.default_rng(0)``, so every worker computes the same model.

    cd example && wkr-serving-start mlp_worker.Worker -protocol numpy -batch_size 32
"""

import time

import numpy as np

from wkr_serving.server import WKRHardWorker

LAYERS = (256, 1024, 1024, 16)


def build_mlp(seed=0, layers=LAYERS):
    """The W2 weights: He-scaled normal matrices and zero biases, float32."""
    rng = np.random.default_rng(seed)
    return [
        ((rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
         np.zeros(n_out, dtype=np.float32))
        for n_in, n_out in zip(layers[:-1], layers[1:])
    ]


def mlp_forward(weights, x):
    """Forward pass on a (batch, 256) float32 array; returns (batch, 16)."""
    h = np.asarray(x, dtype=np.float32)
    for i, (w, b) in enumerate(weights):
        h = h @ w + b
        if i < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


class Worker(WKRHardWorker):
    def get_model(self, envs, model_dir, model_name, tmp_dir):
        return build_mlp()

    def predict(self, model, input):
        started = time.perf_counter()
        batch = input if isinstance(input, np.ndarray) else np.stack(input)
        out = mlp_forward(model, batch)
        self.record_statistic({"predict_ms_per_item":
                               (time.perf_counter() - started) * 1000 / len(batch)})
        return out
