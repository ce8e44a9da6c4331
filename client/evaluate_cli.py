"""``wkr-serving-evaluate``: evaluate a running server's model on a labelled file.

Reads a CSV or JSON-lines file (:func:`~wkr_serving.client.evalfile.read_table`), has
the server compute every row through its normal batching path, in chunks, with a
progress bar on stderr, then prints the metrics the model's ``evaluate`` returns as
JSON (or writes them to ``-output``).

Exit status: 0 done; 1 the server failed (unreachable, a model error, a timeout); 2 a
bad file or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import DEFAULT_TIMEOUT_MS
from .cli_common import add_connection_args, connect_any
from .errors import ClientUsageError, WKRError
from .evalfile import FORMATS, EvalFileError, read_table

__all__ = ["build_parser", "main"]

PROG = "wkr-serving-evaluate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Evaluate the model a WKR server serves on a labelled CSV or JSON-lines "
        "file: every row is computed through the server's batching path (in chunks, so "
        "live traffic keeps flowing), then the model's evaluate scores the predictions "
        "(accuracy, macro precision/recall/F1 and a confusion matrix for classes; MAE, "
        "RMSE and R2 for numbers). Prints the result as JSON. Exit status: 0 done, 1 "
        "server error, 2 bad file or arguments.")
    add_connection_args(parser)
    parser.add_argument("-file", required=True, help="the labelled data: CSV (a header "
                        "row) or JSON lines (one object per line)")
    parser.add_argument("-label_column", required=True,
                        help="the column (CSV) or key (JSON lines) holding the label")
    parser.add_argument("-format", default=None, choices=sorted(FORMATS),
                        help="the file's format (default: from its extension, else its "
                        "content)")
    parser.add_argument("-details", action="store_true",
                        help="add one entry per row (label, prediction, correct or error)")
    parser.add_argument("-chunk_size", type=int, default=None,
                        help="rows per request (default 256, at most the server's "
                        "-max_request_items)")
    parser.add_argument("-timeout", type=int, default=DEFAULT_TIMEOUT_MS,
                        help="milliseconds each request may take")
    parser.add_argument("-output", default=None,
                        help="write the JSON result to this file instead of stdout")
    parser.add_argument("-no_progress", action="store_true",
                        help="no progress bar on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wkr-serving-evaluate``; return its exit status."""
    args = build_parser().parse_args(argv)

    def fail(message: str, code: int) -> int:
        first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
        print(f"{PROG}: {'error: ' if code == 2 else ''}{first}", file=sys.stderr)
        return code

    if args.chunk_size is not None and args.chunk_size < 1:
        return fail("-chunk_size must be >= 1", 2)
    if args.timeout <= 0:
        return fail("-timeout must be > 0 milliseconds", 2)
    try:
        inputs, labels = read_table(args.file, args.label_column, args.format)
    except EvalFileError as exc:  # named with the file, once
        return fail(str(exc) if args.file in str(exc) else f"{args.file}: {exc}", 2)
    try:
        client = connect_any(args, min(args.timeout, 10_000), args.timeout)
    except ClientUsageError as exc:  # a bad port number, key file...
        return fail(str(exc), 2)
    except WKRError as exc:
        return fail(f"cannot connect to {args.ip}:{args.port}/{args.port_out}: {exc}", 1)
    try:
        with _progress_bar(len(inputs), args.no_progress) as bar:
            result = client.evaluate(inputs, labels, details=args.details,
                                     chunk_size=args.chunk_size,
                                     progress=lambda done: bar.update(done - bar.n),
                                     timeout=args.timeout)
    except ClientUsageError as exc:
        return fail(str(exc), 2)
    except WKRError as exc:
        return fail(f"the server failed: {exc}", 1)
    finally:
        client.close()
    text = json.dumps(result, indent=2, default=_json_default)
    if args.output is None:
        print(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as exc:
        return fail(f"cannot write {args.output}: {exc.strerror or exc}", 2)
    return 0


def _progress_bar(total: int, off: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the client alone (wkr-serving-client without its extra)
        if not off and sys.stderr.isatty():
            print(f"{PROG}: no progress bar: install tqdm (pip install "
                  "'wkr-serving-client[progress]')", file=sys.stderr)
        return _NoBar()
    # disable=None: no bar when stderr is not a terminal (a log file stays clean).
    return tqdm(total=total, unit="row", file=sys.stderr, desc="evaluate",
                disable=True if off else None, dynamic_ncols=True)


class _NoBar:
    """What the command uses of a tqdm bar (``n``, ``update``, a context), showing
    nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _json_default(value: Any) -> Any:
    """What a custom ``evaluate`` may return beyond JSON: arrays, numpy scalars, bytes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


if __name__ == "__main__":
    sys.exit(main())
