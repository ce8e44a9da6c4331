"""The evaluation metrics (default_evaluate, item_details) against scikit-learn's, and the
evaluation file reader (read_table): formats, typing rules and every malformed row."""

from __future__ import annotations

import json

import numpy as np
import numpy.testing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)
from wkr_serving.client import ClientUsageError
from wkr_serving.client.evalfile import DEFAULT_MAX_ROWS, EvalFileError, read_table
from wkr_serving.client.evaluation import (
    DEFAULT_CHUNK_SIZE,
    MAX_CONFUSION_CLASSES,
    chunk_size_for,
    default_evaluate,
    item_details,
)

pytestmark = [
    # scikit-learn's own remarks on the random cases (one class; huge residuals).
    pytest.mark.filterwarnings("ignore:A single label was found:UserWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# -- default_evaluate vs scikit-learn --------------------------------------------------------


def check_classification(result: dict, truth: list, predicted: list) -> None:
    """``result`` has scikit-learn's numbers for these labels and predicted classes."""
    classes = result["classes"]
    assert classes == sorted(set(truth) | set(predicted))
    assert result["task"] == "classification"
    assert result["num"] == len(truth)
    npt.assert_allclose(result["accuracy"], accuracy_score(truth, predicted))
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro",
                                                 zero_division=0)
    npt.assert_allclose([result["precision"], result["recall"], result["f1"]], [p, r, f])
    p, r, f, s = precision_recall_fscore_support(truth, predicted, labels=classes,
                                                 zero_division=0)
    per = result["per_class"]
    npt.assert_allclose(per["precision"], p)
    npt.assert_allclose(per["recall"], r)
    npt.assert_allclose(per["f1"], f)
    assert per["support"] == s.tolist()
    assert result["confusion_matrix"] == confusion_matrix(truth, predicted,
                                                          labels=classes).tolist()
    json.dumps(result)  # plain Python values only


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), min_size=1, max_size=60))
def test_classification_matches_sklearn(pairs):
    truth = [t for t, _ in pairs]
    predicted = [p for _, p in pairs]
    check_classification(default_evaluate(predicted, truth), truth, predicted)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["cat", "dog", "eel"]),
                          st.sampled_from(["cat", "dog", "eel", "fox"])),
                min_size=1, max_size=40))
def test_string_classes_match_sklearn(pairs):
    truth = [t for t, _ in pairs]
    predicted = [p for _, p in pairs]
    check_classification(default_evaluate(predicted, truth), truth, predicted)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=60))
def test_regression_matches_sklearn(pairs):
    truth = [t for t, _ in pairs]
    predicted = [p for _, p in pairs]
    result = default_evaluate(predicted, truth)
    assert result["task"] == "regression"
    assert result["num"] == len(truth)
    npt.assert_allclose(result["mae"], mean_absolute_error(truth, predicted),
                        rtol=1e-9, atol=1e-9)
    npt.assert_allclose(result["rmse"], np.sqrt(mean_squared_error(truth, predicted)),
                        rtol=1e-9, atol=1e-9)
    npt.assert_allclose(result["r2"], r2_score(truth, predicted), rtol=1e-6, atol=1e-6)


def test_regression_edges_follow_sklearn():
    assert default_evaluate([2.0, 2.0], [2.0, 2.0])["r2"] == r2_score([2.0, 2.0], [2.0, 2.0])
    assert default_evaluate([1.0, 3.0], [2.0, 2.0])["r2"] == r2_score([2.0, 2.0], [1.0, 3.0])
    one = default_evaluate([1.0], [1.5])
    assert one["r2"] is None and one["mae"] == 0.5 and one["rmse"] == 0.5
    # Integer predictions of number labels are numbers; numpy values too.
    result = default_evaluate([np.float32(1.0), 2, np.array(3.5)], [1.5, 2.0, 3.0])
    npt.assert_allclose(result["mae"], mean_absolute_error([1.5, 2, 3], [1, 2, 3.5]))


def test_score_vectors_dicts_and_names():
    scores = [np.array([0.1, 0.7, 0.2]), [0.9, 0.05, 0.05], {"prediction": [0.2, 0.3, 0.5],
                                                            "is_outlier": True}]
    # Integer labels: the argmax is the class.
    check_classification(default_evaluate(scores, [1, 0, 1]), [1, 0, 1], [1, 0, 2])
    # String labels: the argmax named by a list, or by a mapping with int or str keys.
    names = ["setosa", "versicolor", "virginica"]
    truth = ["versicolor", "setosa", "versicolor"]
    expected = ["versicolor", "setosa", "virginica"]
    for label_names in (names, dict(enumerate(names)),
                        {str(i): n for i, n in enumerate(names)}):
        check_classification(default_evaluate(scores, truth, label_names), truth, expected)
    # Names are used only for string labels; without names the index stays.
    assert default_evaluate(scores, [1, 0, 1], names)["classes"] == [0, 1, 2]
    assert default_evaluate(scores, truth)["accuracy"] == 0.0


def test_scalar_predictions_and_plain_types():
    # numpy labels and predictions come back as plain Python values.
    truth = np.array([0, 1, 1, 2], dtype=np.int64)
    predicted = [np.int64(0), 1.0, [1], np.array([2])]
    result = default_evaluate(predicted, truth)
    assert result["accuracy"] == 1.0
    assert result["classes"] == [0, 1, 2] and all(type(c) is int for c in result["classes"])
    json.dumps(result)
    # Booleans are classes; bytes predictions compare with string labels.
    check_classification(default_evaluate([True, False, True], [True, True, True]),
                         [True, True, True], [True, False, True])
    assert default_evaluate([b"a", "b"], ["a", "b"])["accuracy"] == 1.0


def test_many_classes_have_no_confusion_matrix():
    """Beyond MAX_CONFUSION_CLASSES the matrix (quadratic in size) is left out; the
    other metrics stay exact."""
    truth = list(range(MAX_CONFUSION_CLASSES + 1))
    predicted = [*truth[1:], 0]
    result = default_evaluate(predicted, truth)
    assert result["confusion_matrix"] is None
    assert result["accuracy"] == 0.0 and result["per_class"]["support"] == [1] * len(truth)
    # A batch-of-one score array (1, classes) counts as its row.
    assert default_evaluate([np.array([[0.1, 0.9]])], [1])["accuracy"] == 1.0


def test_item_details():
    details = item_details([[0.2, 0.8], {"prediction": 0, "x": 1}, 1], ["b", "a", "b"],
                           ["a", "b"])
    assert details == [
        {"index": 0, "label": "b", "prediction": "b", "correct": True},
        {"index": 1, "label": "a", "prediction": 0, "correct": False},
        {"index": 2, "label": "b", "prediction": 1, "correct": False},
    ]
    assert item_details([1.0, 2.5], [1.5, 2.0]) == [
        {"index": 0, "label": 1.5, "prediction": 1.0, "error": -0.5},
        {"index": 1, "label": 2.0, "prediction": 2.5, "error": 0.5},
    ]


@pytest.mark.parametrize(("predictions", "labels", "message"), [
    ([], [], "nothing to evaluate"),
    ([1, 2], [1], "2 predictions but 1 labels"),
    (["a"], [1.5], "prediction 0 is str"),
    ([[1.0, 2.0]], [1.5], "prediction 0 is list"),
    ([float("nan")], [1.5], "must be finite"),
    ([1.0], [float("inf")], "must be finite"),
    ([1, 2], [1, [2]], "label 1 is list"),
    ([1, 2], [1.5, "a"], "label 1 is str"),
    ([{"score": 1}], [1], "without a 'prediction' key"),
    ([np.zeros((2, 2))], [1], "1-D vector of scores"),
    ([None], [1], "prediction 0 is NoneType"),
    ("ab", [1, 2], "predictions must be a list"),
])
def test_bad_input_is_a_clear_error(predictions, labels, message):
    with pytest.raises(ClientUsageError, match=message):
        default_evaluate(predictions, labels)


def test_chunk_size():
    assert chunk_size_for(None, {}) == DEFAULT_CHUNK_SIZE
    assert chunk_size_for(None, {"max_request_items": 100}) == 100
    assert chunk_size_for(50, {"max_request_items": 100}) == 50
    assert chunk_size_for(500, {"max_request_items": 100}) == 100
    # one batch per worker, as the server said in the handshake
    served = {"max_request_items": 100, "batch_size": 16, "num_worker": 3}
    assert chunk_size_for(None, served) == 48
    assert chunk_size_for(None, {**served, "batch_size": 64}) == 100
    assert chunk_size_for(7, served) == 7
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ClientUsageError, match="chunk_size"):
            chunk_size_for(bad, {})


# -- read_table --------------------------------------------------------------------------------


def test_csv_numbers_text_and_label_types(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,y,b\n1,0,2.5\n\n3,1,-4\n")
    inputs, labels = read_table(path, "y")
    npt.assert_array_equal(inputs, [[1.0, 2.5], [3.0, -4.0]])
    assert all(x.dtype == np.float64 for x in inputs)
    assert labels == [0, 1] and all(type(y) is int for y in labels)
    # One text column: the text; labels with a fraction: floats; else strings.
    assert read_table(b'text,y\nhello,1.5\n"a, b",2\n', "y") == (["hello", "a, b"],
                                                                 [1.5, 2.0])
    assert read_table(b"\xef\xbb\xbfx,y\n1,cat\n2,dog\n", "y", "csv")[1] == ["cat", "dog"]
    one = read_table(b"x,y\n1,cat\n2,dog\n", "y")[0]
    npt.assert_array_equal(one, [[1.0], [2.0]])


def test_jsonl_inputs_and_labels(tmp_path):
    lines = [{"x": [1, 2], "y": 1}, {"y": 0, "x": [3.5, 4]}, {}, {"input": "hi", "y": 2}]
    path = tmp_path / "data.ndjson"
    path.write_text("\n".join("" if not row else json.dumps(row) for row in lines) + "\n")
    inputs, labels = read_table(path, "y")
    npt.assert_array_equal(inputs[0], [1.0, 2.0])
    npt.assert_array_equal(inputs[1], [3.5, 4.0])
    assert inputs[0].dtype == np.float64 and inputs[2] == "hi"
    assert labels == [1, 0, 2]
    # "data" when there is no "input"; several other values in key order; sniffed bytes.
    data = b'{"data": {"k": 1}, "y": "a"}\n {"b": 2, "a": 1, "y": "b"}\n'
    inputs, labels = read_table(data, "y")
    assert inputs[0] == {"k": 1} and labels == ["a", "b"]
    npt.assert_array_equal(inputs[1], [2.0, 1.0])
    assert read_table(b'{"t": "x", "y": 1}\n{"t": "z", "y": "q"}\n', "y")[1] == ["1", "q"]


@pytest.mark.parametrize(("content", "fmt", "message"), [
    (b"a,b,y\n1,2,0\n1,2\n", None, "line 3: 2 fields, but the header has 3"),
    (b"a,b,y\n1,2,0\n\n3,x,1\n", None, "line 4, column 'b': 'x' is not a number"),
    (b"a,b\n1,2\n", None, "line 1: no column 'y' in the header; its columns are: 'a', 'b'"),
    (b"y,y,a\n1,2,3\n", None, "names column 'y' 2 times"),
    (b"y\n1\n", None, "only the label column"),
    (b"a,y\n1,2\n3,\n", None, "line 3: no label"),
    (b"a,y\n1,2\n3,nan\n", None, "line 3: the label 'nan' is not a finite number"),
    (b"", "csv", "needs a header row"),
    (b"a,y\n", None, "no data rows"),
    (b'a,y\n"1,2\n', None, "line 2: malformed CSV"),
    (b"a,y\n1,\xff\n", None, "line 2: not UTF-8"),
    (b'{"x": 1, "y": 1}\n[1, 2]\n', None, "line 2: expected a JSON object, got an array"),
    (b'{"x": 1, "y": 1}\n\n{"x": 1, "y"\n', None, "line 3: not valid JSON"),
    (b'{"x": 1, "y": 1}\n{"x": 1}\n', None, "line 2: no 'y' key"),
    (b'{"x": 1, "y": null}\n', None, "line 1: the label 'y' is null"),
    (b'{"x": 1, "y": [1]}\n', None, "line 1: the label 'y' is an array"),
    (b'{"y": 1}\n', None, "line 1: no input"),
    (b'{"x": 1, "y": 1}\n', "xml", "unknown file format 'xml'"),
])
def test_malformed_files_name_the_line(content, fmt, message):
    with pytest.raises(EvalFileError, match=message) as info:
        read_table(content, "y", fmt)
    assert isinstance(info.value, ClientUsageError)


def test_file_level_errors(tmp_path):
    with pytest.raises(EvalFileError, match=r"cannot read .*missing\.csv"):
        read_table(tmp_path / "missing.csv", "y")
    with pytest.raises(EvalFileError, match="line 4: more than 2 data rows"):
        read_table(b"a,y\n1,1\n2,2\n3,3\n", "y", max_rows=2)
    with pytest.raises(EvalFileError, match="line 3: more than 1 data rows"):
        read_table(b'{"x": 1, "y": 1}\n\n{"x": 2, "y": 2}\n', "y", max_rows=1)
    with pytest.raises(EvalFileError, match="label column"):
        read_table(b"a,y\n1,1\n", "")
    assert DEFAULT_MAX_ROWS >= 1_000_000
    # The extension decides over the content; an unknown one lets the content decide.
    path = tmp_path / "data.txt"
    path.write_text('{"x": 1, "y": 1}\n')
    assert read_table(path, "y")[1] == [1]
    path = tmp_path / "data.csv"
    path.write_text('{"x": 1, "y": 1}\n')
    with pytest.raises(EvalFileError, match="no column 'y'"):
        read_table(path, "y")
