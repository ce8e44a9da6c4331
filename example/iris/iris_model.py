"""What the iris example's training script and worker share: the file names, the feature
and class names, and the only types the saved models may hold.

The models are saved with skops (``skops.io``), not pickle: loading a skops file builds
only the types it is told to trust, and runs no code from the file. ``TRUSTED_TYPES``
is that list. It is written here, in reviewed code, never read from the model directory,
so a model file swapped by someone who can write there cannot widen it.
"""

from __future__ import annotations

import os
from typing import Any

#: The classifier (a scikit-learn pipeline) in the model directory: ``-model_name``.
MODEL_FILE = "iris.skops"
#: The outlier detector (an IsolationForest), beside the classifier.
OUTLIER_FILE = "outlier.skops"
#: The evaluation file: the held-out rows, with the class name in ``species``.
EVAL_FILE = "eval.csv"

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
LABEL_COLUMN = "species"
#: Class index -> name, as load_iris numbers them.
LABELS = {0: "setosa", 1: "versicolor", 2: "virginica"}

#: Types the saved models need beyond those skops trusts by default, as
#: ``skops.io.get_untrusted_types`` named them when the models were trained
#: (scikit-learn 1.9, skops 0.16): the trees of the IsolationForest. The classifier
#: (StandardScaler + LogisticRegression) needs none. A new scikit-learn release may
#: need more: train.py then stops and names them, to be reviewed and added here.
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)


class UntrustedModel(ValueError):
    """A model file holds types that are not in ``TRUSTED_TYPES``."""


def check_types(path: str | os.PathLike[str]) -> list[str]:
    """The types ``path`` needs beyond skops' defaults; raise :class:`UntrustedModel`
    naming any that ``TRUSTED_TYPES`` does not list (nothing is loaded)."""
    import skops.io as sio

    needed = sio.get_untrusted_types(file=path)
    unknown = sorted(set(needed) - set(TRUSTED_TYPES))
    if unknown:
        raise UntrustedModel(
            f"{os.fspath(path)} holds types that are not trusted: {unknown}; review them "
            f"and add them to TRUSTED_TYPES in {__file__} if they are safe")
    return list(needed)


def load_trusted(path: str | os.PathLike[str]) -> Any:
    """Load a skops file after checking its types against ``TRUSTED_TYPES``."""
    import skops.io as sio

    check_types(path)
    return sio.load(path, trusted=list(TRUSTED_TYPES))
