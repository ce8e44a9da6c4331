"""Train a small Keras classifier on the iris flowers and save it for the server.

    python example/keras/train.py --out /tmp/keras-model

Writes, in ``--out``:

- ``iris.keras``: the model in Keras' native format (a zip of its config and weights;
  loading it runs no pickled code). Its first layer normalises the four raw measurements,
  so clients send them as they are: ``[sepal length, sepal width, petal length, petal
  width]`` in cm; it outputs the three class probabilities.
- ``labels.json``: the class names, in the model's output order.
- ``eval.csv``: the held-out quarter of the data (not used for training), with a
  ``species`` label column, to evaluate the served model.

Runs in a few seconds on a CPU; the same seed gives the same model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads

import numpy as np

MODEL_FILE = "iris.keras"
LABELS_FILE = "labels.json"
EVAL_FILE = "eval.csv"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The iris data (bundled with scikit-learn, no download), split 3/4 for training and
    1/4 for evaluation, stratified: ``(x_train, y_train, x_eval, y_eval, class names)``."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_eval, y_eval, [str(n) for n in iris.target_names]


def build_model(x_train: np.ndarray, classes: int):
    """Normalization (fitted to the training data) -> Dense 16 ReLU -> Dense softmax."""
    import keras

    norm = keras.layers.Normalization(name="normalize")
    norm.adapt(x_train)
    model = keras.Sequential([
        keras.Input(shape=(x_train.shape[1],), name="measurements"),
        norm,
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(classes, activation="softmax", name="probabilities"),
    ], name="iris")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.02),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train(out: Path, epochs: int = 60, seed: int = 0) -> dict[str, float]:
    """Train, save the three files in ``out`` and return the evaluation accuracy."""
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_eval, y_eval, names = load_data(seed)
    model = build_model(x_train, len(names))
    started = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=16, verbose=0)
    seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(x_eval, y_eval, verbose=0)

    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    (out / LABELS_FILE).write_text(json.dumps(names) + "\n")
    with open(out / EVAL_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*FEATURES, "species"])
        for row, label in zip(x_eval.tolist(), y_eval.tolist(), strict=True):
            writer.writerow([*(round(v, 1) for v in row), names[label]])
    return {"eval_accuracy": float(accuracy), "train_seconds": seconds,
            "train_items": len(x_train), "eval_items": len(x_eval)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="directory for iris.keras, labels.json and eval.csv")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = train(args.out, args.epochs, args.seed)
    print(f"trained in {result['train_seconds']:.1f}s on {result['train_items']} flowers; "
          f"accuracy on the {result['eval_items']} held-out ones: "
          f"{result['eval_accuracy']:.3f}")
    print(f"wrote {args.out / MODEL_FILE}, {args.out / LABELS_FILE}, {args.out / EVAL_FILE}")


if __name__ == "__main__":
    main()
