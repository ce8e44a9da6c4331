"""Train the iris example's models and write them, with an evaluation file, to a directory.

    python example/iris/train.py --out models

writes ``models/iris.skops`` (StandardScaler + LogisticRegression: class probabilities),
``models/outlier.skops`` (an IsolationForest fitted on the training features) and
``models/eval.csv`` (the held-out 30 %: the four features and the ``species`` name).
It uses scikit-learn's bundled copy of the iris data (no download) and fixed random
states, so two runs fit the same models and write the same evaluation file. Before it
saves a model, it checks that the model needs no type beyond ``TRUSTED_TYPES``
(iris_model.py), the types the worker trusts when it loads them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

import numpy as np
import skops.io as sio
from iris_model import (
    EVAL_FILE,
    FEATURES,
    LABEL_COLUMN,
    LABELS,
    MODEL_FILE,
    OUTLIER_FILE,
    UntrustedModel,
    check_types,
)
from sklearn.datasets import load_iris
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

SEED = 0


def train(out: str) -> dict[str, float]:
    """Fit both models on 70 % of iris, save them and the other 30 % to ``out``; return
    the classifier's accuracy on the held-out rows."""
    x, y = load_iris(return_X_y=True)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=SEED)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(x_train, y_train)
    # contamination "auto": an input is an outlier when its score (-score_samples, the
    # score of the IsolationForest paper, 0..1) is over 0.5.
    outlier = IsolationForest(n_estimators=100, contamination="auto", random_state=SEED)
    outlier.fit(x_train)

    os.makedirs(out, exist_ok=True)
    for model, name in ((classifier, MODEL_FILE), (outlier, OUTLIER_FILE)):
        _save(model, os.path.join(out, name))
    with open(os.path.join(out, EVAL_FILE), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*FEATURES, LABEL_COLUMN])
        for row, label in zip(x_eval.tolist(), y_eval.tolist(), strict=True):
            writer.writerow([*(repr(v) for v in row), LABELS[label]])
    accuracy = float(np.mean(classifier.predict(x_eval) == y_eval))
    return {"train_rows": len(x_train), "eval_rows": len(x_eval), "accuracy": accuracy}


def _save(model: object, path: str) -> None:
    """Write ``model`` to ``path`` (through a temporary file in the same directory, so a
    reader never sees half a file) once its types are known to be trusted."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".skops.tmp")
    os.close(fd)
    try:
        sio.dump(model, tmp)
        check_types(tmp)
        # mkstemp makes the file 0600: a server running as another user (a container
        # reading a model trained on the host) must be able to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the models to")
    args = parser.parse_args()
    try:
        summary = train(args.out)
    except UntrustedModel as exc:
        sys.exit(f"train.py: {exc}")
    print(f"trained on {summary['train_rows']} flowers; held-out accuracy "
          f"{summary['accuracy']:.3f} on {summary['eval_rows']}")
    for name in (MODEL_FILE, OUTLIER_FILE, EVAL_FILE):
        print("wrote", os.path.join(args.out, name))


if __name__ == "__main__":
    main()
