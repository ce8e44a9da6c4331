"""Ask the Keras iris server for predictions, and evaluate it on the held-out flowers.

    python example/keras/client.py -port 5555 -port_out 5556
    python example/keras/client.py -port 5555 -port_out 5556 -eval /tmp/keras-model/eval.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from wkr_serving.client import WKRClient

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def read_eval(path: Path) -> tuple[np.ndarray, list[str]]:
    """The measurements and the ``species`` labels of ``train.py``'s eval.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.asarray([[float(r[k]) for k in FEATURES] for r in rows], dtype=np.float32)
    return x, [r["species"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-ip", default="127.0.0.1")
    parser.add_argument("-port", type=int, default=5555)
    parser.add_argument("-port_out", type=int, default=5556)
    parser.add_argument("-eval", type=Path, help="eval.csv written by train.py")
    args = parser.parse_args(argv)

    with WKRClient(args.ip, args.port, args.port_out, protocol="numpy",
                   timeout=10_000) as client:
        meta = client.metadata()["metadata"]
        labels = meta["labels"]
        print(f"model: {meta['framework']} on {meta['device']}, "
              f"gpu_memory_fraction {meta['gpu_memory_fraction']}, classes {labels}")
        flower = meta["data_sample"][0]  # four measurements in cm
        scores = client.encode(np.asarray(flower, dtype=np.float32))
        best = int(np.argmax(scores))
        print(f"{flower} -> {labels[best]} (p = {scores[best]:.3f}); all: "
              + ", ".join(f"{name} {p:.3g}" for name, p in zip(labels, scores, strict=True)))
        if args.eval:
            x, species = read_eval(args.eval)
            result = client.evaluate(x, species)
            print(f"evaluated on {result['num']} flowers: accuracy {result['accuracy']:.3f}, "
                  f"macro F1 {result['f1']:.3f}; confusion matrix (rows: true "
                  f"{result['classes']}): {result['confusion_matrix']}")


if __name__ == "__main__":
    main()
