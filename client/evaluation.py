"""Evaluate a served model on labelled data (Rekcurd's ``EvaluateResult``/``EvaluateDetail``).

Two halves:

- the metrics, pure functions over a model's predictions and the true labels:
  :func:`default_evaluate` (what :meth:`WKRHardWorker.evaluate
  <wkr_serving.server.WKRHardWorker.evaluate>` computes unless a worker overrides it) and
  :func:`item_details` (one entry per item);
- the client side, :func:`run_evaluation` (``WKRClient.evaluate``) and
  :func:`arun_evaluation` (``AsyncWKRClient.evaluate``): the inputs are computed through
  the normal batching path, one chunk at a time (other clients' requests are served
  between and beside the chunks), then one *evaluate request* (options
  ``{"evaluate": True}``, one item ``{"predictions": [...], "labels": [...]}``) has a
  worker score the predictions with the model's ``evaluate``.

Both clients run the same steps (:func:`_steps`, a generator that says what to ask the
server and takes the answers), so they cannot drift apart.

Labels are *classes* when every one is a string, a boolean or an integer, and *numbers*
(regression) when they are real numbers and at least one is not an integer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ClientUsageError, UnknownCommand

__all__ = ["DEFAULT_CHUNK_SIZE", "EVALUATE_OPTIONS", "MAX_CONFUSION_CLASSES",
           "arun_evaluation", "default_evaluate", "item_details", "run_evaluation"]

#: Inputs per request while computing the predictions of an evaluation, unless told
#: otherwise or the server says its batch size (never more than the server's
#: ``-max_request_items``).
DEFAULT_CHUNK_SIZE = 256
#: The request options that make a request an evaluate request.
EVALUATE_OPTIONS: dict[str, Any] = {"evaluate": True}

#: Most classes that get a confusion matrix (its size grows with their square): beyond,
#: ``confusion_matrix`` is None. (Thousands of classes are often number labels given as
#: integers: give floats to have them scored as numbers.)
MAX_CONFUSION_CLASSES = 1000

CLASSIFICATION = "classification"
REGRESSION = "regression"

#: An evaluation step: ("batch", inputs) -> their results; ("evaluate", item) -> the
#: evaluate request's result; ("metadata", None) -> the client's metadata().
_Step = tuple[str, Any]


# -- metrics -------------------------------------------------------------------------------


def default_evaluate(predictions: Sequence[Any], labels: Sequence[Any],
                     label_names: Any = None) -> dict[str, Any]:
    """Score ``predictions`` against ``labels`` (same length, in the same order).

    Classes (labels all strings, booleans or integers): ``{"task": "classification",
    "num", "accuracy", "precision", "recall", "f1"`` (macro averages over ``classes``),
    ``"classes"`` (the sorted union of labels and predicted classes), ``"per_class":
    {"precision", "recall", "f1", "support"}`` (lists in ``classes`` order) and
    ``"confusion_matrix"`` (rows: true class, columns: predicted class; None beyond
    :data:`MAX_CONFUSION_CLASSES` classes)``}``. A class with no true or no predicted
    item scores 0 where the ratio is undefined, as scikit-learn does with
    ``zero_division=0``.

    Numbers: ``{"task": "regression", "num", "mae", "rmse", "r2"}``; ``r2`` is None for
    fewer than two items, 1.0 for constant labels predicted exactly, else 0.0 for
    constant labels (scikit-learn's ``r2_score``).

    A prediction may be a class, a score vector (a list or 1-D array of more than one
    number: the class is its argmax, named by ``label_names`` when the labels are
    strings: a list, or a mapping from index to name), or a dict whose ``"prediction"``
    is one of these. Everything returned is plain Python (msgpack- and JSON-able).
    Raises :class:`~wkr_serving.client.errors.ClientUsageError` for empty input, lengths
    that differ, or predictions that do not fit the labels.
    """
    task, truth, predicted = _prepare(predictions, labels, label_names)
    if task == REGRESSION:
        return _regression(np.asarray(truth, dtype=np.float64),
                           np.asarray(predicted, dtype=np.float64))
    return _classification(truth, predicted)


def item_details(predictions: Sequence[Any], labels: Sequence[Any],
                 label_names: Any = None) -> list[dict[str, Any]]:
    """One entry per item, in order: ``{"index", "label", "prediction", "correct"}`` for
    classes (``prediction`` is the class compared with the label, see
    :func:`default_evaluate`), ``{"index", "label", "prediction", "error"}`` for numbers
    (``error`` is prediction minus label)."""
    task, truth, predicted = _prepare(predictions, labels, label_names)
    if task == REGRESSION:
        return [{"index": i, "label": t, "prediction": p, "error": p - t}
                for i, (t, p) in enumerate(zip(truth, predicted, strict=True))]
    return [{"index": i, "label": t, "prediction": p, "correct": bool(t == p)}
            for i, (t, p) in enumerate(zip(truth, predicted, strict=True))]


def _prepare(predictions: Sequence[Any], labels: Sequence[Any],
             label_names: Any) -> tuple[str, list[Any], list[Any]]:
    """The task, the labels and the predictions as plain Python values to compare."""
    predictions = _as_list(predictions, "predictions")
    labels = [_plain(x) for x in _as_list(labels, "labels")]
    check_lengths(len(predictions), len(labels), "predictions")
    task = label_task(labels)
    if task == REGRESSION:
        truth = [float(x) for x in labels]
        predicted = [_number(p, i) for i, p in enumerate(predictions)]
        return task, truth, predicted
    names = label_names if any(isinstance(x, str) for x in labels) else None
    return task, labels, [_class_of(p, i, names) for i, p in enumerate(predictions)]


def check_lengths(count: int, labels: int, what: str = "inputs") -> None:
    """Refuse an evaluation of nothing, or of ``count`` items against a different number
    of ``labels``."""
    if count != labels:
        raise ClientUsageError(f"{count} {what} but {labels} labels: give one label per "
                               "item")
    if count == 0:
        raise ClientUsageError(f"nothing to evaluate: no {what} and no labels")


def label_task(labels: Sequence[Any]) -> str:
    """``"classification"`` when every label is a string, boolean or integer,
    ``"regression"`` when they are real numbers (some not integers); else an error."""
    if all(isinstance(x, (str, bool, int)) for x in labels):
        return CLASSIFICATION
    for i, x in enumerate(labels):
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            raise ClientUsageError(
                f"label {i} is {_brief(x)}: labels must all be classes (strings, booleans, "
                "integers) or all be numbers")
        if not math.isfinite(x):
            raise ClientUsageError(f"label {i} is {x}: number labels must be finite")
    return REGRESSION


def _as_list(values: Any, what: str) -> list[Any]:
    if isinstance(values, np.ndarray):
        return list(values) if values.ndim else [values]
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ClientUsageError(f"{what} must be a list (or array), got {_brief(values)}")
    return list(values)


def _plain(value: Any) -> Any:
    """A numpy scalar or 0-d array as the Python value it holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _prediction(value: Any, index: int) -> Any:
    """The prediction itself: a dict's ``"prediction"``, a one-element list's element."""
    if isinstance(value, Mapping):
        if "prediction" not in value:
            raise ClientUsageError(
                f"prediction {index} is a dict without a 'prediction' key (keys: "
                f"{', '.join(map(str, list(value)[:10]))}): the default evaluate needs "
                "one, or override the worker's evaluate")
        value = value["prediction"]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    elif isinstance(value, np.ndarray):
        if value.ndim > 1 and value.shape[0] == 1:  # a batch of one: (1, classes)
            value = value[0]
        if value.size == 1 and value.ndim <= 1:
            value = value.reshape(-1)[0]
    return _plain(value)


def _number(value: Any, index: int) -> float:
    """A regression prediction as a finite float."""
    value = _prediction(value, index)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ClientUsageError(
            f"prediction {index} is {_brief(value)}: number labels need one number per "
            "prediction")
    value = float(value)
    if not math.isfinite(value):
        raise ClientUsageError(f"prediction {index} is {value}: predictions must be finite")
    return value


def _class_of(value: Any, index: int, names: Any) -> Any:
    """The class a classification prediction stands for."""
    value = _prediction(value, index)
    if isinstance(value, (list, tuple, np.ndarray)):
        scores = np.asarray(value)
        if scores.ndim != 1 or scores.dtype.kind not in "biuf":
            raise ClientUsageError(
                f"prediction {index} is {_brief(value)}: a class prediction is a class or "
                "a 1-D vector of scores")
        best = int(np.argmax(scores))
        return best if names is None else _name(names, best)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 for class 1 (a model that outputs floats)
    if isinstance(value, (str, bool, int, float)):
        return value
    raise ClientUsageError(f"prediction {index} is {_brief(value)}: not a class")


def _name(names: Any, index: int) -> Any:
    """Class ``index`` named by ``names`` (a list, or a mapping whose keys are indices
    as integers or digit strings); the index itself when it has no name."""
    if isinstance(names, Mapping):
        for key in (index, str(index)):
            if key in names:
                return names[key]
        return index
    if isinstance(names, (list, tuple)) and 0 <= index < len(names):
        return names[index]
    return index


def _class_key(value: Any) -> tuple[int, Any]:
    """Sort classes: numbers (booleans included) first, then strings."""
    if isinstance(value, (int, float)):
        return 0, value
    if isinstance(value, str):
        return 1, value
    return 2, repr(value)


def _classification(truth: list[Any], predicted: list[Any]) -> dict[str, Any]:
    # One class per distinct value (1 and True, 1 and 1.0 are one class, as in Python).
    classes = sorted(set(truth) | set(predicted), key=_class_key)
    position = {c: i for i, c in enumerate(classes)}
    true_idx = np.fromiter((position[t] for t in truth), np.intp, len(truth))
    pred_idx = np.fromiter((position[p] for p in predicted), np.intp, len(predicted))
    k = len(classes)
    hits = np.bincount(true_idx[true_idx == pred_idx], minlength=k).astype(np.float64)
    support = np.bincount(true_idx, minlength=k)
    chosen = np.bincount(pred_idx, minlength=k)
    precision = _ratio(hits, chosen)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    matrix: list[list[int]] | None = None
    if k <= MAX_CONFUSION_CLASSES:
        counts = np.zeros((k, k), dtype=np.int64)
        np.add.at(counts, (true_idx, pred_idx), 1)
        matrix = counts.tolist()
    return {
        "task": CLASSIFICATION,
        "num": len(truth),
        "accuracy": float(hits.sum() / len(truth)),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "classes": classes,
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(),
                      "f1": f1.tolist(), "support": support.tolist()},
        "confusion_matrix": matrix,
    }


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """``top / bottom``, 0 where ``bottom`` is 0."""
    out = np.zeros(len(top), dtype=np.float64)
    np.divide(top, bottom, out=out, where=bottom != 0)
    return out


def _regression(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    residual = truth - predicted
    ss_res = float(np.sum(residual ** 2))
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    r2: float | None
    if len(truth) < 2:
        r2 = None
    elif ss_tot == 0.0:
        r2 = 1.0 if ss_res == 0.0 else 0.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return {
        "task": REGRESSION,
        "num": len(truth),
        "mae": float(np.mean(np.abs(residual))),
        "rmse": float(math.sqrt(ss_res / len(truth))),
        "r2": r2,
    }


def _brief(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


# -- the client side -----------------------------------------------------------------------


def run_evaluation(client: Any, inputs: Sequence[Any], labels: Sequence[Any],
                   details: bool = False, chunk_size: int | None = None,
                   progress: Callable[[int], Any] | None = None,
                   timeout: int | None = None) -> dict[str, Any]:
    """:meth:`WKRClient.evaluate <wkr_serving.client.WKRClient.evaluate>`: compute
    ``inputs`` in chunks of ``chunk_size`` (default :data:`DEFAULT_CHUNK_SIZE`, at most
    the server's ``-max_request_items``) with ``encode_batch``, calling ``progress(done)``
    after each chunk, then have a worker score the predictions against ``labels``;
    return its result (with ``num``, and with ``details``, one entry per item).
    ``timeout`` (ms) bounds each request."""
    if not getattr(client, "_connected", True):
        client._connect()  # the server's limits, before the chunk size is chosen
    steps = _steps(inputs, labels, details, chunk_size, progress,
                   getattr(client, "_server_info", {}))
    answer: Any = None
    while True:
        try:
            kind, arg = steps.send(answer)
        except StopIteration as done:
            return done.value
        if kind == "batch":
            answer = client.encode_batch(arg, timeout=timeout)
        elif kind == "evaluate":
            answer = client._call([arg], "one", True, timeout, None, EVALUATE_OPTIONS)
        else:
            answer = _metadata_or_none(client.metadata)


async def arun_evaluation(client: Any, inputs: Sequence[Any], labels: Sequence[Any],
                          details: bool = False, chunk_size: int | None = None,
                          progress: Callable[[int], Any] | None = None,
                          timeout: int | None = None) -> dict[str, Any]:
    """:meth:`AsyncWKRClient.evaluate <wkr_serving.client.AsyncWKRClient.evaluate>`:
    :func:`run_evaluation` for the asyncio client."""
    await client.connect()  # the server's limits, before the chunk size is chosen
    steps = _steps(inputs, labels, details, chunk_size, progress,
                   getattr(client, "server_info", {}))
    answer: Any = None
    while True:
        try:
            kind, arg = steps.send(answer)
        except StopIteration as done:
            return done.value
        if kind == "batch":
            answer = await client.encode_batch(arg, timeout=timeout)
        elif kind == "evaluate":
            answer = (await client._request([arg], timeout, EVALUATE_OPTIONS)).value[0]
        else:
            metadata: Any = None
            with contextlib.suppress(UnknownCommand):  # a server without "metadata"
                metadata = await client.metadata()
            answer = metadata


def _metadata_or_none(call: Callable[[], Any]) -> Any:
    with contextlib.suppress(UnknownCommand):
        return call()
    return None


def chunk_size_for(chunk_size: int | None, server_info: Mapping[str, Any]) -> int:
    """Inputs per request: ``chunk_size``, else the server's ``-batch_size`` times its
    ``-num_worker``, else :data:`DEFAULT_CHUNK_SIZE`; at most the server's
    ``-max_request_items`` (all learnt in the client's handshake)."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(
            chunk_size, bool) or chunk_size < 1):
        raise ClientUsageError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    batch, workers = server_info.get("batch_size"), server_info.get("num_worker")
    if chunk_size is None and isinstance(batch, int) and isinstance(workers, int):
        # One batch per worker: requests of live callers sent meanwhile wait behind at
        # most one chunk (benchmarks/lifecycle.py: a 256-item chunk on 2 workers of
        # -batch_size 32 tripled their p99; 64 kept it within 2x of the traffic alone).
        size = batch * workers
    limit = server_info.get("max_request_items")
    if isinstance(limit, int) and limit > 0:
        size = min(size, limit)
    return size


def _steps(inputs: Sequence[Any], labels: Sequence[Any], details: bool,
           chunk_size: int | None, progress: Callable[[int], Any] | None,
           server_info: Mapping[str, Any]) -> Generator[_Step, Any, dict[str, Any]]:
    """The steps of an evaluation, for either client: yields what to ask the server,
    receives the answers, returns the result."""
    if not isinstance(inputs, np.ndarray) or not inputs.ndim:
        inputs = _as_list(inputs, "inputs")
    label_list = _wire_labels(labels)
    check_lengths(len(inputs), len(label_list))
    size = chunk_size_for(chunk_size, server_info)
    predictions: list[Any] = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start:start + size]
        results = yield "batch", chunk
        if len(results) != len(chunk):
            raise ClientUsageError(f"the server answered {len(results)} results for a "
                                   f"chunk of {len(chunk)} inputs")
        predictions.extend(results)
        if progress is not None:
            progress(len(predictions))
    result = yield "evaluate", {"predictions": predictions, "labels": label_list}
    if not isinstance(result, dict):
        result = {"result": result}
    result.setdefault("num", len(label_list))
    if details and "details" not in result:
        metadata = yield "metadata", None
        names = None
        if isinstance(metadata, Mapping) and isinstance(metadata.get("metadata"), Mapping):
            names = metadata["metadata"].get("labels")
        result["details"] = item_details(predictions, label_list, names)
    return result


def _wire_labels(labels: Sequence[Any]) -> list[Any]:
    """The labels as a list of msgpack-able values (numpy scalars as Python ones)."""
    if isinstance(labels, np.ndarray):
        return labels.tolist() if labels.ndim else [labels.item()]
    return [_plain(x) for x in _as_list(labels, "labels")]
