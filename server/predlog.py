"""The prediction log: one JSON line per request, written off the hot path.

With ``-log_predictions`` every worker process appends to
``<log_dir>/<log_name>.predictions.jsonl``. After a batch's results are sent, the worker
takes a bounded snapshot of each part of the batch (:func:`capture` copies at most
:data:`MAX_ELEMENTS` elements of an array, at most :data:`MAX_VALUE_BYTES` of an encoded
value) and hands it to :class:`PredictionLog`: a queue bounded in lines and in bytes, and
one writer thread (woken every :data:`WAKE_LINES` entries or :data:`WAKE_AFTER_S` after
the first) that turns entries into JSON (:func:`format_entry`) and appends each line
with a single ``write()`` on a file opened with ``O_APPEND``, so the lines of several
workers never interleave (and the thread gives the GIL back between lines). When the
queue is full the entry is dropped and counted, never waited for: a request is never
slowed down by its log line.

The log never stops its worker: a file that cannot be opened or written loses its lines
(counted, with one error line) and is tried again. It follows rotation: the writer
reopens the path when :meth:`PredictionLog.reopen` asks (the worker's SIGHUP handler),
and by itself when the file at the path is no longer the one it has open (looked at
every :data:`CHECK_EVERY_S` or :data:`CHECK_EVERY_LINES` lines, not per line).

One line is written per *part*: a request whose items were computed in one batch (every
single-item request) has one line; a request split over several batches has one line
per batch, with ``offset``/``count``/``total`` saying which items it covers.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
from wkr_serving.client import protocol as P

from .logs import LogThrottle, log_base

__all__ = ["Entry", "PredictionLog", "capture", "format_entry", "log_path"]

#: Most array (or list) elements written for one value; longer ones are cut, with a marker.
MAX_ELEMENTS = 1000
#: Largest encoded (msgpack) value written; a bigger one is replaced by a marker.
MAX_VALUE_BYTES = 64 * 1024
#: Deepest nesting written for one value.
MAX_DEPTH = 32
#: Longest error message written.
MAX_MESSAGE_CHARS = 2000
#: Queue bounds: entries waiting for the writer, and the bytes they hold.
MAX_LINES = 10_000
MAX_BYTES = 64 * 1024 * 1024
#: Bytes counted for an entry besides its captured items.
ENTRY_OVERHEAD = 256
#: The writer wakes when this many entries wait, or this many seconds after the first
#: one was queued: under load it runs in bursts instead of once per request.
WAKE_LINES = 64
WAKE_AFTER_S = 0.05
#: The writer looks whether the file at its path is still the one it has open (renamed by
#: logrotate? removed?), or tries to open it again after a failure, at most this often.
CHECK_EVERY_S = 1.0
CHECK_EVERY_LINES = 1000
#: Flags of the log file: appends only, so the lines of several workers never interleave.
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def log_path(log_dir: str, log_name: str | None) -> str:
    """The prediction log file of a server."""
    return log_base(log_dir, log_name) + ".predictions.jsonl"


class Item(NamedTuple):
    """A bounded snapshot of one item: its wire meta, the bytes kept (None when not
    kept: too big, pickled) and the item's full size in bytes."""

    meta: Any
    data: bytes | None
    nbytes: int


class Entry(NamedTuple):
    """What the worker hands over for one part of a batch (no formatting done yet)."""

    time: float  # wall clock (time.time()) when the batch's results were sent
    latency_s: float  # from the ventilator receiving the request to the results sent
    client: bytes
    req_id: int
    request_id: str | None  # the caller's id (option ``request_id``)
    offset: int
    n_items: int  # items of the request in this part
    total: int
    batch_size: int
    worker: int
    error: Any  # None, or the wire error [code, message, traceback]
    inputs: list[Item] | None  # None: suppressed by the request
    outputs: list[Item] | None  # None: the part failed
    model_name: str | None = None  # the model that computed it (-model_name)
    model_version: str | None = None  # ... and its version (-model_version)


def capture(meta: Any, buf: Any) -> Item:
    """Snapshot one item (a frame's buffer, bytes or a uint8 array) for the log, copying
    only what will be written, so the log neither holds big frames nor sees a buffer the
    model reuses for its next batch."""
    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    nbytes = view.nbytes
    if meta.__class__ is list:  # a raw array: keep its first MAX_ELEMENTS elements
        try:
            itemsize = P.parse_dtype(meta[0]).itemsize
        except (P.ProtocolError, IndexError, TypeError):
            return Item(meta, None, nbytes)
        return Item(meta, bytes(view[:MAX_ELEMENTS * itemsize]), nbytes)
    if meta == P.MSGPACK_ITEM and nbytes <= MAX_VALUE_BYTES:
        return Item(meta, buf if buf.__class__ is bytes else bytes(view), nbytes)
    return Item(meta, None, nbytes)


def entry_size(entry: Entry) -> int:
    """Bytes an entry holds in the queue (what its items keep, plus a fixed overhead)."""
    size = ENTRY_OVERHEAD
    for items in (entry.inputs, entry.outputs):
        if items:
            for item in items:
                size += 64 + (len(item.data) if item.data is not None else 0)
    return size


# -- formatting (the writer thread) -------------------------------------------------------


def format_entry(entry: Entry) -> bytes:
    """One log line (JSON, ASCII, ending with a newline) for an entry."""
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(entry.time, timezone.utc).isoformat(
            timespec="microseconds").replace("+00:00", "Z"),
        "request_id": entry.request_id or f"{entry.client.hex()}:{entry.req_id}",
        "client": entry.client.hex(),
        "req_id": entry.req_id,
        "latency_ms": round(entry.latency_s * 1000.0, 3),
        "batch_size": entry.batch_size,
        "worker": entry.worker,
        "model": entry.model_name,
        "model_version": entry.model_version,
        "outcome": "ok" if entry.error is None else _error_code(entry.error),
        "offset": entry.offset,
        "count": entry.n_items,
        "total": entry.total,
    }
    if entry.error is not None:
        record["error"] = _error_message(entry.error)
    record["input"] = None if entry.inputs is None else [_item_json(i) for i in entry.inputs]
    if entry.inputs is None:
        record["input_suppressed"] = True
    record["output"] = (None if entry.outputs is None
                        else [_item_json(i) for i in entry.outputs])
    try:
        text = _ENCODER.encode(record)
    except (TypeError, ValueError) as exc:  # a value _jsonable missed: keep the line
        record["input"] = record["output"] = None
        record["unloggable"] = f"{type(exc).__name__}: {exc}"
        text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)
    return text.encode("ascii") + b"\n"


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # ASCII output


def _error_code(error: Any) -> str:
    if isinstance(error, list) and error and isinstance(error[0], str):
        return error[0]
    return "server_error"


def _error_message(error: Any) -> str:
    message = error[1] if isinstance(error, list) and len(error) > 1 else error
    return str(message)[:MAX_MESSAGE_CHARS]


def _item_json(item: Item) -> Any:
    """An item as JSON: values as they are, arrays as (nested) lists, bytes as base64;
    what was not kept or cannot be read becomes a marker object."""
    meta, data = item.meta, item.data
    if meta.__class__ is list:
        if data is None:
            return {"unreadable": f"raw array item with meta {P.brief(meta)}",
                    "nbytes": item.nbytes}
        try:
            dtype = P.parse_dtype(meta[0])
            shape = [int(d) for d in meta[1]]
            flat = np.frombuffer(data, dtype=dtype)
        except Exception as exc:
            return {"unreadable": f"{type(exc).__name__}: {exc}", "nbytes": item.nbytes}
        return _array_json(flat, dtype, shape)
    if meta == P.PICKLE_ITEM:
        return {"pickled": True, "nbytes": item.nbytes}
    if data is None:
        return {"truncated": True, "nbytes": item.nbytes,
                "reason": f"encoded value over {MAX_VALUE_BYTES} bytes"}
    try:
        value = P.decode_item(P.MSGPACK_ITEM, data)
    except Exception as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}", "nbytes": item.nbytes}
    return _jsonable(value, 0)


def _array_json(flat: np.ndarray, dtype: np.dtype, shape: list[int]) -> Any:
    """An array given by (the head of) its flat elements and its shape."""
    size = math.prod(shape)
    if size == flat.size and size <= MAX_ELEMENTS:
        return _jsonable(flat.reshape(shape).tolist(), 0)
    return {"dtype": dtype.str, "shape": shape, "truncated": True,
            "head": _jsonable(flat[:MAX_ELEMENTS].tolist(), 0)}


def _jsonable(value: Any, depth: int) -> Any:
    """A decoded value as plain JSON types, bounded in length and depth."""
    cls = value.__class__
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is float:
        return value if math.isfinite(value) else str(value)
    if depth >= MAX_DEPTH:
        return {"truncated": True, "reason": f"nested deeper than {MAX_DEPTH}"}
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v, depth + 1) for v in value[:MAX_ELEMENTS]]
        if len(value) > MAX_ELEMENTS:
            return {"truncated": True, "length": len(value), "head": items}
        return items
    if isinstance(value, dict):
        out = {}
        for n, (key, v) in enumerate(value.items()):
            if n >= MAX_ELEMENTS:
                out["..."] = f"{len(value) - MAX_ELEMENTS} more keys"
                break
            out[key if isinstance(key, str) else str(_jsonable(key, depth + 1))] = _jsonable(
                v, depth + 1)
        return out
    if isinstance(value, np.ndarray):
        return _array_json(value.reshape(-1), value.dtype, list(value.shape))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, complex):
        return [_jsonable(value.real, depth), _jsonable(value.imag, depth)]
    if isinstance(value, np.generic):
        return _jsonable(value.item(), depth)
    if isinstance(value, float):  # a float subclass
        return _jsonable(float(value), depth)
    if isinstance(value, int):  # an int subclass (bool handled above)
        return int(value)
    return str(value)  # datetimes from datetime64 arrays, anything else


# -- the queue and the writer --------------------------------------------------------------


class PredictionLog:
    """A bounded queue of log entries and the thread that appends them to ``path``.

    :meth:`put` never blocks: beyond ``max_lines`` entries or ``max_bytes`` captured bytes
    waiting, the entry is dropped and counted in :attr:`dropped`. Lines lost to a failed
    write (a full disk) or to a file that cannot be opened are counted in :attr:`failed`;
    neither raises. ``start=False`` leaves the writer stopped until :meth:`start` (for
    tests of the bounds). ``check_s`` and ``check_lines``: how often the writer looks
    whether the file was rotated.
    """

    def __init__(self, path: str, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES,
                 logger: logging.Logger | None = None, start: bool = True,
                 check_s: float = CHECK_EVERY_S,
                 check_lines: int = CHECK_EVERY_LINES) -> None:
        self.path = path
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.logger = logger or logging.getLogger("wkr_serving")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # queue grew, or an entry is done
        self._queue: deque[tuple[Entry, int]] = deque()
        self._bytes = 0
        self._taken = 0  # entries the writer took off the queue and has not written yet
        self._closing = False
        self._flushing = 0  # callers of flush() waiting: the writer must not linger
        self.dropped = 0
        self.failed = 0
        self.written = 0
        self._reported = 0  # dropped + failed already taken by take_lost()
        self._error_log = LogThrottle(self.logger, logging.ERROR)
        self.check_s = check_s
        self.check_lines = check_lines
        # The writer thread's own state: the file, and when to look at the path again.
        self._fd: int | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of _fd
        self._check_at = time.monotonic() + check_s
        self._lines_to_check = check_lines
        self._failing_since: int | None = None  # self.failed when lines began to be lost
        self._reopen_wanted = False  # set by reopen(), from any thread or signal handler
        self._open()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        self._thread.start()

    def reopen(self) -> None:
        """Make the writer close the file and open the path again before its next line
        (after logrotate renamed the file). Only sets a flag: no lock, no I/O, so a
        signal handler may call it (the worker's SIGHUP handler does)."""
        self._reopen_wanted = True

    def put(self, entry: Entry, size: int | None = None) -> bool:
        """Queue an entry; False (and counted as dropped) when the queue is full."""
        size = entry_size(entry) if size is None else size
        with self._lock:
            if (self._closing or len(self._queue) + self._taken >= self.max_lines
                    or self._bytes + size > self.max_bytes):
                self.dropped += 1
                return False
            self._queue.append((entry, size))
            self._bytes += size
            if len(self._queue) in (1, WAKE_LINES):  # the writer waits for one of these
                self._changed.notify_all()
        return True

    @property
    def pending(self) -> int:
        """Entries queued and not yet written."""
        with self._lock:
            return len(self._queue) + self._taken

    def take_lost(self) -> int:
        """Lines dropped or failed since the last call (the worker reports them)."""
        lost = self.dropped + self.failed
        new = lost - self._reported
        self._reported = lost
        return new

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every queued entry is written (or failed);
        return whether it was."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: not self._queue and not self._taken,
                                              timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop the writer."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():  # a huge backlog: give up on it (the process ends)
            with self._lock:
                self.dropped += len(self._queue)
                self._queue.clear()
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.notify_all()  # for flush(): everything taken is written
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                # Linger a little for more entries: one wake-up for many lines.
                self._changed.wait_for(lambda: len(self._queue) >= WAKE_LINES
                                       or self._closing or self._flushing, WAKE_AFTER_S)
                entries = list(self._queue)
                self._queue.clear()
                self._taken = len(entries)
            for entry, size in entries:
                self._write(entry)
                with self._lock:  # its room in the queue is free once it is written
                    self._bytes -= size
                    self._taken -= 1

    def _write(self, entry: Entry) -> None:
        try:
            line = format_entry(entry)
        except Exception as exc:  # a bug in formatting must not stop the log
            self.failed += 1
            self._error_log.log("prediction log: cannot format an entry: %s", exc)
            return
        self._check_file()
        if self._fd is None:  # the path cannot be opened: said once, by _open()
            self.failed += 1
            return
        try:
            # One write per line on an O_APPEND file: lines of several processes never
            # interleave. A short write happens only when the disk is full.
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            self._lost("prediction log: cannot write to %s: %s: %s", exc)
            self.failed += 1
            return
        self.written += 1
        if self._failing_since is not None:
            self.logger.info("prediction log: writing to %s again (%d line(s) lost)",
                             self.path, self.failed - self._failing_since)
            self._failing_since = None

    # -- the file (writer thread only, and __init__/close when the writer is not running) --

    def _check_file(self) -> None:
        """Before a line: reopen when asked to, or when the path no longer names the open
        file (looked at every ``check_s`` seconds or ``check_lines`` lines)."""
        if self._reopen_wanted:
            self._reopen_wanted = False  # cleared first: a request made now is kept
            self._reopen()
            return
        self._lines_to_check -= 1
        if self._lines_to_check > 0 and time.monotonic() < self._check_at:
            return
        self._lines_to_check = self.check_lines
        self._check_at = time.monotonic() + self.check_s
        if self._fd is None or self._moved():
            self._reopen()

    def _moved(self) -> bool:
        """Whether the file at the path is gone or another one than the file open."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id

    def _reopen(self) -> None:
        old, self._fd = self._fd, None
        if old is not None:
            os.close(old)
        self._open()

    def _open(self) -> None:
        """Open the path for appending; when it cannot be, lines are lost (counted) until
        a later check opens it."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            self._lost("prediction log: cannot open %s: %s: %s; its lines are counted as "
                       "lost until it can be opened", exc)
            return
        st = os.fstat(fd)
        self._fd, self._file_id = fd, (st.st_dev, st.st_ino)

    def _lost(self, message: str, exc: OSError) -> None:
        """Say once (until a line is written again) that lines are being lost."""
        if self._failing_since is None:
            self._failing_since = self.failed
            self.logger.error(message, self.path, type(exc).__name__, exc)
