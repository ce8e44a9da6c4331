"""Read an evaluation file: CSV or JSON lines, one labelled input per row.

:func:`read_table` turns a file (a path, or the bytes of an HTTP upload) into the
``inputs`` and ``labels`` of :meth:`WKRClient.evaluate
<wkr_serving.client.WKRClient.evaluate>`. Every malformed row is refused with an
:class:`EvalFileError` that names its line.

- CSV: a header row names the columns; ``label_column`` is the label, the other columns
  the input: one float64 array per row when every value is a number, the text itself
  when there is one non-numeric column.
- JSON lines: one object per line; the label is its ``label_column`` key; the input is
  its ``"input"`` key if present, else ``"data"``, else the other values in key order.
  Numbers (and lists of numbers) become float64 arrays.

Labels are integers when every label of the file is one, else numbers when every label
is a number, else strings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .errors import ClientUsageError

__all__ = ["DEFAULT_MAX_ROWS", "FORMATS", "EvalFileError", "guess_format", "read_table"]

#: Most data rows :func:`read_table` reads unless told otherwise.
DEFAULT_MAX_ROWS = 10_000_000
#: The formats, by the names they are given (``fmt``, ``-format``) and their extensions.
FORMATS = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "jsonlines": "jsonl"}
#: Keys of a JSON-lines object that hold the input, in order of preference.
INPUT_KEYS = ("input", "data")
#: Longest value quoted in an error message.
QUOTE_CHARS = 40


class EvalFileError(ClientUsageError):
    """An evaluation file that cannot be read: the message names the line."""


def read_table(source: str | os.PathLike[str] | bytes | bytearray | memoryview,
               label_column: str, fmt: str | None = None,
               max_rows: int = DEFAULT_MAX_ROWS) -> tuple[list[Any], list[Any]]:
    """Read ``source`` (a path, or a file's content as bytes) into ``(inputs, labels)``.

    ``fmt``: ``"csv"`` or ``"jsonl"`` (also ``"ndjson"``, ``"jsonlines"``); by default
    guessed from the path's extension, else from the content (a first ``{``: JSON
    lines). Blank lines are skipped. Raises :class:`EvalFileError` for a file that
    cannot be read, a malformed row (naming its line), no data rows, or more than
    ``max_rows`` of them.
    """
    if not isinstance(label_column, str) or not label_column:
        raise EvalFileError("the label column must be a non-empty name")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        named = _format_name(fmt) if fmt is not None else _sniff(data)
        return _read(io.BytesIO(data), named, label_column, max_rows)
    path = os.fspath(source)
    kind = _format_name(fmt) if fmt is not None else guess_format(path)
    try:
        with open(path, "rb") as f:
            if kind is None:  # an extension that says nothing: the content tells
                kind = _sniff(f.read(4096))
                f.seek(0)
            return _read(f, kind, label_column, max_rows)
    except OSError as exc:
        raise EvalFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def guess_format(path: str) -> str | None:
    """The format a file name says (None: its extension says none)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return FORMATS.get(ext)


def _format_name(fmt: str) -> str:
    kind = FORMATS.get(str(fmt).lower())
    if kind is None:
        raise EvalFileError(f"unknown file format {fmt!r}: use csv or jsonl")
    return kind


def _sniff(head: bytes) -> str:
    text = head.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
    return "jsonl" if text.startswith(b"{") else "csv"


def _read(f: Iterable[bytes], kind: str, label_column: str,
          max_rows: int) -> tuple[list[Any], list[Any]]:
    lines = _text_lines(f)
    if kind == "csv":
        inputs, raw_labels = _read_csv(lines, label_column, max_rows)
    else:
        inputs, raw_labels = _read_jsonl(lines, label_column, max_rows)
    if not inputs:
        raise EvalFileError("no data rows: the file has no labelled input")
    return inputs, _labels(raw_labels)


def _text_lines(f: Iterable[bytes]) -> Iterator[str]:
    """The file's lines as text (UTF-8, a byte order mark ignored), newlines kept."""
    for number, raw in enumerate(f, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalFileError(f"line {number}: not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start})") from None


def _check_rows(count: int, max_rows: int, line: int) -> None:
    if count > max_rows:
        raise EvalFileError(f"line {line}: more than {max_rows} data rows; split the file")


# -- CSV -----------------------------------------------------------------------------------


def _read_csv(lines: Iterator[str], label_column: str,
              max_rows: int) -> tuple[list[Any], list[tuple[int, Any]]]:
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    label_at = 0
    names: list[str] = []
    inputs: list[Any] = []
    texts: list[str] = []  # one feature column: its values as read
    labels: list[tuple[int, Any]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise EvalFileError(f"line {reader.line_num}: malformed CSV ({exc})") from None
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if header is None:
            header = [name.strip() for name in row]
            label_at = _label_position(header, label_column, line)
            names = [name for i, name in enumerate(header) if i != label_at]
            continue
        if len(row) != len(header):
            raise EvalFileError(f"line {line}: {len(row)} fields, but the header has "
                                f"{len(header)} ({', '.join(header)})")
        _check_rows(len(labels) + 1, max_rows, line)
        label = row[label_at]
        if not label.strip():
            raise EvalFileError(f"line {line}: no label (column {label_column!r} is "
                                "empty)")
        labels.append((line, label))
        features = row[:label_at] + row[label_at + 1:]
        if len(features) == 1:
            texts.append(features[0])
        else:
            inputs.append(_numbers(features, names, line))
    if header is None:
        raise EvalFileError("the file is empty: a CSV evaluation file needs a header row "
                            "naming its columns")
    if len(names) == 1:  # numbers when every value is one, else the text
        try:
            return [np.array([float(t)]) for t in texts], labels
        except ValueError:
            return texts, labels
    return inputs, labels


def _label_position(header: list[str], label_column: str, line: int) -> int:
    found = [i for i, name in enumerate(header) if name == label_column]
    if not found:
        raise EvalFileError(f"line {line}: no column {label_column!r} in the header; its "
                            f"columns are: {', '.join(map(repr, header))}")
    if len(found) > 1:
        raise EvalFileError(f"line {line}: the header names column {label_column!r} "
                            f"{len(found)} times")
    if len(header) < 2:
        raise EvalFileError(f"line {line}: the header has only the label column "
                            f"{label_column!r}; the other columns are the input")
    return found[0]


def _numbers(values: list[str], names: list[str], line: int) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        try:
            out[i] = float(value)
        except ValueError:
            raise EvalFileError(
                f"line {line}, column {names[i]!r}: {_quote(value)} is not a number (with "
                "several input columns, every value must be a number)") from None
    return out


# -- JSON lines ----------------------------------------------------------------------------


def _read_jsonl(lines: Iterator[str], label_column: str,
                max_rows: int) -> tuple[list[Any], list[tuple[int, Any]]]:
    inputs: list[Any] = []
    labels: list[tuple[int, Any]] = []
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            raise EvalFileError(f"line {line}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise EvalFileError(f"line {line}: expected a JSON object, got "
                                f"{_json_type(row)}")
        if label_column not in row:
            raise EvalFileError(f"line {line}: no {label_column!r} key (the label); its "
                                f"keys are: {', '.join(map(repr, list(row)[:20]))}")
        label = row.pop(label_column)
        if label is None or isinstance(label, (list, dict)):
            raise EvalFileError(f"line {line}: the label {label_column!r} is "
                                f"{_json_type(label)}; a label is a string, number or "
                                "boolean")
        _check_rows(len(labels) + 1, max_rows, line)
        labels.append((line, label))
        inputs.append(_json_input(row, line))
    return inputs, labels


def _json_input(row: dict[str, Any], line: int) -> Any:
    for key in INPUT_KEYS:
        if key in row:
            return _as_array(row[key])
    if not row:
        raise EvalFileError(f"line {line}: no input: the object has only its label")
    values = list(row.values())
    if len(values) == 1:
        return _as_array(values[0])
    return _as_array(values)


def _as_array(value: Any) -> Any:
    """A number, or a (nested) list of numbers, as a float64 array; anything else as is."""
    if _is_number(value):
        return np.array([float(value)])
    if isinstance(value, list) and value:
        try:
            array = np.array(value)
        except (ValueError, TypeError):  # ragged
            return value
        if array.dtype.kind in "iuf":
            return array.astype(np.float64)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# -- labels --------------------------------------------------------------------------------


def _labels(raw: list[tuple[int, Any]]) -> list[Any]:
    """The file's labels: integers if all are, else numbers if all are, else strings."""
    values = [value for _, value in raw]
    if all(isinstance(v, bool) for v in values):
        return values
    ints = _all(values, _int)
    if ints is not None:
        return ints
    floats = _all(values, _float)
    if floats is not None:
        for (line, value), number in zip(raw, floats, strict=True):
            if not math.isfinite(number):
                raise EvalFileError(f"line {line}: the label {_quote(value)} is not a "
                                    "finite number")
        return floats
    return [v if isinstance(v, str) else json.dumps(v) for v in values]


def _all(values: list[Any], convert: Any) -> list[Any] | None:
    out = []
    for value in values:
        converted = convert(value)
        if converted is None:
            return None
        out.append(converted)
    return out


def _int(value: Any) -> int | None:
    if isinstance(value, (bool, float)):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."
