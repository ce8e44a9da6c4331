"""The prediction log (``-log_predictions``): one JSON line per request (per part of a
request split over batches) in ``<log_dir>/<log_name>.predictions.jsonl``.

Against real servers: bursts of requests on both protocols give exactly one line each,
with the right request ids (the caller's ``request_id`` option, else
``<client hex>:<req_id>``), batch sizes, worker indices and latencies; inputs are left
out when a request asks (``suppress_log_input``) while outputs stay; failed requests are
logged with their error code; a split request has one line per part; the HTTP bridge's
``/encode`` passes ``X-Request-ID`` and ``suppress_log_input``; the REQUEST options field
is validated on the wire; lines the log loses are reported in ``server_status``.

Units: the writer's queue is bounded in lines and bytes and drops (and counts) instead of
blocking, failed writes are counted, the formatting of every kind of value (truncated
arrays, base64 bytes, non-finite floats, deep nesting), and snapshots that do not see a
buffer changed after the batch.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers import (
    Gate,
    RawClient,
    connect,
    http_call,
    running_server,
    server_args,
    wait_idle,
    wait_until,
)
from wkr_serving.client import BadInput, ClientUsageError, ModelError
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import error_from_wire
from wkr_serving.server.config import ConfigError, ServerConfig
from wkr_serving.server.predlog import (
    MAX_ELEMENTS,
    MAX_VALUE_BYTES,
    Entry,
    Item,
    PredictionLog,
    capture,
    format_entry,
    log_path,
)
from workers import ControlledWorker, EchoWorker

V = P.PROTOCOL_VERSION
#: Longest wait for log lines or replies (the box is slow and shared).
LIMIT_S = 20.0


# -- helpers -------------------------------------------------------------------------------


def read_lines(path: str) -> list[dict[str, Any]]:
    """Every line of a prediction log, parsed (each must be one complete JSON object)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    # Only complete lines count: a line is written with a single write(), ending in \n.
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def lines_of(path: str, client: bytes) -> list[dict[str, Any]]:
    return [r for r in read_lines(path) if r["client"] == client.hex()]


def wait_lines(path: str, client: bytes, n: int) -> list[dict[str, Any]]:
    """Wait until the log has ``n`` lines of ``client``; return them (fails on more)."""
    found = wait_until(lambda: len(lines_of(path, client)) >= n and lines_of(path, client),
                       LIMIT_S, f"{n} log lines of client {client!r}")
    assert len(found) == n, f"{len(found)} lines instead of {n}"
    return found


def check_common(line: dict[str, Any], server: Any) -> None:
    """Fields every line has, with plausible values."""
    assert set(line) >= {"time", "request_id", "client", "req_id", "latency_ms", "batch_size",
                         "worker", "outcome", "offset", "count", "total", "input", "output"}
    when = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert when.tzinfo == timezone.utc
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 600
    assert line["latency_ms"] > 0
    assert 1 <= line["batch_size"] <= server.config.batch_size
    assert 0 <= line["worker"] < server.config.num_worker


# -- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def obj_log(tmp_path_factory) -> Any:
    """ControlledWorker, obj, 2 workers, batch_size 4, logging predictions, HTTP bridge."""
    root = tmp_path_factory.mktemp("predlog_obj")
    args = server_args(root, "-protocol", "obj", "-num_worker", "2", "-batch_size", "4",
                       "-cpu", "-log_dir", str(root / "logs"), "-log_name", "objsrv",
                       "-log_predictions", "-http_port", "0", "-graceful_timeout", "5")
    with running_server(args, ControlledWorker) as server:
        server.predictions = log_path(str(root / "logs"), "objsrv")
        yield server


@pytest.fixture(scope="module")
def numpy_log(tmp_path_factory) -> Any:
    """EchoWorker, numpy, 1 worker, batch_size 4, logging predictions (default name)."""
    root = tmp_path_factory.mktemp("predlog_numpy")
    args = server_args(root, "-protocol", "numpy", "-num_worker", "1", "-batch_size", "4",
                       "-cpu", "-log_dir", str(root / "logs"), "-log_predictions",
                       "-graceful_timeout", "5")
    with running_server(args, EchoWorker) as server:
        server.predictions = str(root / "logs" / "WKRServer.predictions.jsonl")
        yield server


# -- bursts --------------------------------------------------------------------------------


def test_obj_burst_gives_one_line_per_request(obj_log):
    n = 60
    identity = b"predlog-obj-burst"
    values = [{"i": i, "tag": "burst", "xs": [i, i + 0.5]} for i in range(n)]
    with connect(obj_log, identity=identity) as client:
        for i, value in enumerate(values):
            client.encode(value, blocking=False, request_id=f"obj-burst-{i}")
        assert client.fetch_all() == values
    lines = wait_lines(obj_log.predictions, identity, n)
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {f"obj-burst-{i}" for i in range(n)}
    for i, value in enumerate(values):
        line = by_id[f"obj-burst-{i}"]
        check_common(line, obj_log)
        assert line["outcome"] == "ok" and "error" not in line
        assert (line["offset"], line["count"], line["total"]) == (0, 1, 1)
        assert line["input"] == [value] and line["output"] == [value]
        assert line["client"] == identity.hex()
    assert len({line["req_id"] for line in lines}) == n


def test_batch_sizes_and_workers_are_the_real_ones(obj_log, tmp_path):
    """Both workers held by a gate while 8 requests queue: once released, the 8 items go
    in two batches of 4, and the 8 lines say so; each gate ran alone on its worker."""
    identity = b"predlog-obj-batches"
    release = str(tmp_path / "release")
    gates = [Gate(tmp_path, f"gate{i}", release) for i in range(2)]
    with connect(obj_log, identity=identity) as client, connect(obj_log) as watcher:
        try:
            held = []
            for i, gate in enumerate(gates):  # one at a time: each to its own worker
                held.append(client.encode(gate.item(i), blocking=False,
                                          request_id=f"gate-{i}"))
                gate.wait_started()
            ids = [client.encode(f"queued-{i}", blocking=False, request_id=f"queued-{i}")
                   for i in range(8)]
            wait_until(lambda: watcher.server_status["queue_items"] == 8, LIMIT_S,
                       "8 items queued")
        finally:
            gates[0].open()
        results = client.fetch_all(return_id=True)
        assert [r[0] for r in results] == held + ids
    lines = wait_lines(obj_log.predictions, identity, 10)
    queued = [line for line in lines if line["request_id"].startswith("queued-")]
    gated = [line for line in lines if line["request_id"].startswith("gate-")]
    assert len(queued) == 8 and len(gated) == 2
    assert all(line["batch_size"] == 4 for line in queued)
    # Two batches of 4 (the worker released first may take both).
    per_worker = [sum(line["worker"] == w for line in queued) for w in (0, 1)]
    assert sorted(per_worker) in ([0, 8], [4, 4])
    assert sorted(line["worker"] for line in gated) == [0, 1]
    assert all(line["batch_size"] == 1 for line in gated)
    for line in lines:
        check_common(line, obj_log)


def test_numpy_burst_logs_arrays_as_lists(numpy_log):
    n = 40
    identity = b"predlog-numpy-burst"
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(n)]
    with connect(numpy_log, identity=identity) as client:
        for i, arr in enumerate(arrays):
            client.encode(arr, blocking=False, request_id=f"np-{i}")
        results = client.fetch_all()
    for arr, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result, arr)
    lines = wait_lines(numpy_log.predictions, identity, n)
    by_id = {line["request_id"]: line for line in lines}
    for i, arr in enumerate(arrays):
        line = by_id[f"np-{i}"]
        check_common(line, numpy_log)
        assert line["worker"] == 0 and line["outcome"] == "ok"
        assert line["input"] == [arr.tolist()] and line["output"] == [arr.tolist()]
    assert all(1 <= line["batch_size"] <= 4 for line in lines)


def test_numpy_big_array_is_truncated_with_a_marker(numpy_log):
    identity = b"predlog-numpy-big"
    big = np.arange(3 * 1000, dtype=np.int64).reshape(3, 1000)
    with connect(numpy_log, identity=identity) as client:
        np.testing.assert_array_equal(client.encode(big), big)
    (line,) = wait_lines(numpy_log.predictions, identity, 1)
    for logged in (line["input"][0], line["output"][0]):
        assert logged["truncated"] is True
        assert logged["dtype"] == "<i8" and logged["shape"] == [3, 1000]
        assert logged["head"] == list(range(MAX_ELEMENTS))
    assert len(json.dumps(line)) < 40 * MAX_ELEMENTS


# -- options ---------------------------------------------------------------------------------


def test_suppressed_input_keeps_the_output(obj_log, numpy_log):
    identity = b"predlog-suppress"
    secret = {"password": "hunter2"}
    with connect(obj_log, identity=identity) as client:
        assert client.encode(secret, suppress_log_input=True, request_id="sup-1") == secret
        assert client.encode_batch(["a", "b"], suppress_log_input=True) == ["a", "b"]
        assert client.encode("visible", request_id="sup-3") == "visible"
    lines = wait_lines(obj_log.predictions, identity, 3)
    by_output = {json.dumps(line["output"]): line for line in lines}
    first = by_output[json.dumps([secret])]
    assert first["request_id"] == "sup-1"
    assert first["input"] is None and first["input_suppressed"] is True
    assert "hunter2" not in json.dumps([r["input"] for r in read_lines(obj_log.predictions)])
    second = by_output[json.dumps(["a", "b"])]
    assert second["input"] is None
    assert second["request_id"] == f"{identity.hex()}:{second['req_id']}"  # no id given
    third = by_output[json.dumps(["visible"])]
    assert third["input"] == ["visible"] and "input_suppressed" not in third
    with connect(numpy_log, identity=identity) as client:
        client.encode(np.ones(3, np.float32), suppress_log_input=True)
    (line,) = wait_lines(numpy_log.predictions, identity, 1)
    assert line["input"] is None and line["output"] == [[1.0, 1.0, 1.0]]


def test_failed_requests_are_logged_with_their_error_code(obj_log):
    identity = b"predlog-errors"
    with connect(obj_log, identity=identity) as client:
        with pytest.raises(ModelError, match="boom-for-the-log"):
            client.encode({"cmd": "raise", "message": "boom-for-the-log"}, request_id="err-1")
        assert client.encode("fine", request_id="ok-after") == "fine"
    lines = wait_lines(obj_log.predictions, identity, 2)
    by_id = {line["request_id"]: line for line in lines}
    failed = by_id["err-1"]
    check_common(failed, obj_log)
    assert failed["outcome"] == "model_error"
    assert "boom-for-the-log" in failed["error"]
    assert failed["input"] == [{"cmd": "raise", "message": "boom-for-the-log"}]
    assert failed["output"] is None
    assert by_id["ok-after"]["outcome"] == "ok"


def test_item_refused_by_the_worker_is_logged_as_bad_input(obj_log):
    """A raw REQUEST with options on the wire, whose item is not msgpack: the worker
    refuses it (bad_input) and logs it under the caller's request id."""
    identity = b"predlog-raw-bad"
    raw = RawClient(obj_log, identity)
    try:
        raw.send([P.pack([V, P.REQUEST, 41, 0, [0], {"request_id": "raw-bad",
                                                      "future_option": "ignored"}]), b"\xc1"])
        header = raw.recv()
        assert header[1] == P.ERROR and header[2] == 41
        assert isinstance(error_from_wire(header[3]), BadInput)
    finally:
        raw.close()
    (line,) = wait_lines(obj_log.predictions, identity, 1)
    assert line["request_id"] == "raw-bad" and line["req_id"] == 41
    assert line["outcome"] == "bad_input" and line["output"] is None
    assert "unreadable" in line["input"][0]


def test_split_request_has_one_line_per_part(obj_log):
    identity = b"predlog-split"
    items = [f"item-{i}" for i in range(10)]
    with connect(obj_log, identity=identity) as client:
        assert client.encode_batch(items, request_id="split-1") == items

    def every_part() -> list[dict[str, Any]] | None:
        found = lines_of(obj_log.predictions, identity)
        return found if sum(line["count"] for line in found) >= 10 else None

    lines = sorted(wait_until(every_part, LIMIT_S, "every part of the split request"),
                   key=lambda line: line["offset"])
    assert sum(line["count"] for line in lines) == 10
    assert all(line["request_id"] == "split-1" and line["total"] == 10 for line in lines)
    assert len(lines) >= 3  # batch_size 4: at least 3 batches
    for line in lines:
        start, count = line["offset"], line["count"]
        assert line["input"] == items[start:start + count] == line["output"]
        assert line["batch_size"] >= count
    assert [line["offset"] for line in lines] == [
        sum(prev["count"] for prev in lines[:k]) for k in range(len(lines))]


def test_client_refuses_a_bad_request_id(obj_log):
    with connect(obj_log) as client:
        with pytest.raises(ClientUsageError, match="request_id"):
            client.encode("x", request_id="y" * (P.MAX_OPTION_CHARS + 1))
        with pytest.raises(ClientUsageError, match="request_id"):
            client.encode("x", request_id=12)  # type: ignore[arg-type]
        assert client.encode("x", request_id="z" * P.MAX_OPTION_CHARS) == "x"


def test_options_on_a_server_without_the_log(obj_server, obj_client):
    """A server without -log_predictions accepts the options and ignores them."""
    assert obj_server.config.log_predictions is False
    assert obj_client.encode("plain", suppress_log_input=True, request_id="r-1") == "plain"
    assert obj_client.encode_batch([1, 2], request_id="r-2") == [1, 2]


def test_header_with_options_roundtrips():
    header = [V, P.REQUEST, 5, 0, [0], {"request_id": "a"}]
    assert P.unpack_header(P.pack(header), expect=P.REQUEST) == header
    with pytest.raises(P.ProtocolError, match="or one more"):
        P.unpack_header(P.pack([V, P.REQUEST, 5, 0, [0], None, None]))
    with pytest.raises(P.ProtocolError, match="fields"):
        P.unpack_header(P.pack([V, P.HELLO, 5, {"request_id": "a"}]))


def test_log_predictions_needs_a_log_dir(tmp_path):
    with pytest.raises(ConfigError, match="log_dir"):
        ServerConfig(log_predictions=True)
    config = ServerConfig(log_predictions=True, log_dir=str(tmp_path))
    assert config.log_predictions and config.as_dict()["log_predictions"] is True


# -- the HTTP bridge -----------------------------------------------------------------------


def test_http_encode_passes_request_id_and_suppress(obj_log):
    status, headers, body = http_call(obj_log, "/encode", {
        "data": {"http": "hidden"}, "suppress_log_input": True},
        {"X-Request-ID": "http-req-suppressed"})
    assert status == 200 and body["data"] == {"http": "hidden"}
    assert headers["X-Request-ID"] == "http-req-suppressed"
    status, _, body = http_call(obj_log, "/encode", {"batch": ["h1", "h2"]},
                                {"X-Request-ID": "http-req-plain"})
    assert status == 200 and body["data"] == ["h1", "h2"]
    status, _, body = http_call(obj_log, "/encode", {"data": 1, "suppress_log_input": "yes"})
    assert status == 400 and "suppress_log_input" in body["error_message"]
    # An id longer than the option allows is cut, not refused.
    status, _, _ = http_call(obj_log, "/encode", {"data": "long"}, {"X-Request-ID": "L" * 300})
    assert status == 200

    def find(request_id: str) -> Any:
        return [r for r in read_lines(obj_log.predictions) if r["request_id"] == request_id]

    (hidden,) = wait_until(lambda: find("http-req-suppressed"), LIMIT_S, "the HTTP line")
    assert hidden["input"] is None and hidden["output"] == [{"http": "hidden"}]
    check_common(hidden, obj_log)
    (plain,) = wait_until(lambda: find("http-req-plain"), LIMIT_S, "the second HTTP line")
    assert plain["input"] == ["h1", "h2"] and plain["output"] == ["h1", "h2"]
    wait_until(lambda: find("L" * P.MAX_OPTION_CHARS), LIMIT_S, "the cut request id")


# -- lines lost ------------------------------------------------------------------------------


def test_lost_lines_are_reported_in_status(tmp_path):
    """The log file is /dev/full: every write fails. Requests are still served, and the
    lost lines are counted in server_status['statistic']['prediction_log_dropped']."""
    if not os.path.exists("/dev/full"):  # Linux-only device; the suite runs on Linux
        pytest.fail("/dev/full is needed for this test")
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink("/dev/full", log_path(str(logs), None))
    args = server_args(tmp_path, "-num_worker", "1", "-cpu", "-log_dir", str(logs),
                       "-log_predictions", "-graceful_timeout", "3")
    with running_server(args, EchoWorker) as server, connect(server) as client:
        for i in range(5):
            assert client.encode(i) == i

        def reported() -> int:
            client.encode("carry the report")  # losses travel with the next batch
            stat = client.server_status["statistic"].get("prediction_log_dropped", {})
            return stat.get("count", 0) >= 5

        wait_until(reported, LIMIT_S, "the lost lines in server_status", interval=0.05)
        status = wait_idle(client)
        assert status["num_results"] >= 6
    err = (logs / "WKRServer.err").read_text()
    assert "prediction log: cannot write" in err


# -- units: the writer -----------------------------------------------------------------------


def entry(i: int = 0, **changes: Any) -> Entry:
    base = Entry(time=1_700_000_000.25, latency_s=0.0123, client=b"\x01ab", req_id=i,
                 request_id=None, offset=0, n_items=1, total=1, batch_size=3, worker=2,
                 error=None, inputs=[Item(0, msgpack.packb(i), 1)],
                 outputs=[Item(0, msgpack.packb(i), 1)])
    return base._replace(**changes)


def test_queue_full_drops_and_counts_without_blocking(tmp_path):
    path = str(tmp_path / "p.jsonl")
    log = PredictionLog(path, max_lines=3, start=False)  # the writer is not running
    try:
        accepted = [log.put(entry(i)) for i in range(5)]
        assert accepted == [True, True, True, False, False]
        assert log.dropped == 2 and log.pending == 3
        assert log.take_lost() == 2 and log.take_lost() == 0
        log.start()
        assert log.flush(LIMIT_S)
        assert [line["req_id"] for line in read_lines(path)] == [0, 1, 2]
        assert log.written == 3 and log.pending == 0
        assert log.put(entry(9)) and log.flush(LIMIT_S)  # room again once written
        assert [line["req_id"] for line in read_lines(path)] == [0, 1, 2, 9]
    finally:
        log.close()
    assert not log.put(entry(10)) and log.dropped == 3  # closed: dropped, not blocked


def test_queue_is_bounded_in_bytes(tmp_path):
    log = PredictionLog(str(tmp_path / "p.jsonl"), max_bytes=1000, start=False)
    try:
        assert log.put(entry(0), size=600)
        assert not log.put(entry(1), size=600)  # would hold 1200 bytes
        assert log.put(entry(2), size=400)
        assert log.dropped == 1
    finally:
        log.close()


def test_failed_writes_are_counted(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is needed for this test")
    log = PredictionLog("/dev/full")
    try:
        for i in range(3):
            assert log.put(entry(i))
        assert log.flush(LIMIT_S)
        assert log.failed == 3 and log.written == 0 and log.take_lost() == 3
    finally:
        log.close()


def test_lines_of_concurrent_writers_never_interleave(tmp_path):
    """Two logs (as two workers) append big lines to one file at the same time."""
    path = str(tmp_path / "shared.jsonl")
    blob = msgpack.packb("x" * 50_000)
    logs = [PredictionLog(path, start=False) for _ in range(2)]
    for w, log in enumerate(logs):
        for i in range(100):
            assert log.put(entry(i, worker=w, inputs=[Item(0, blob, len(blob))]))
    for log in logs:
        log.start()
    try:
        assert all(log.flush(LIMIT_S * 3) for log in logs)
    finally:
        for log in logs:
            log.close()
    lines = read_lines(path)  # every line parses: none was cut by another
    assert len(lines) == 200
    assert sorted((line["worker"], line["req_id"]) for line in lines) == sorted(
        (w, i) for w in range(2) for i in range(100))
    assert all(line["input"] == ["x" * 50_000] for line in lines)


def test_close_writes_what_is_queued(tmp_path):
    path = str(tmp_path / "p.jsonl")
    log = PredictionLog(path, start=False)
    for i in range(20):
        log.put(entry(i))
    log.start()
    log.close(LIMIT_S)
    assert len(read_lines(path)) == 20


# -- units: formatting -----------------------------------------------------------------------


def parse(e: Entry) -> dict[str, Any]:
    line = format_entry(e)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")
    return json.loads(line)


def test_format_fields():
    record = parse(entry(7))
    assert record["time"] == "2023-11-14T22:13:20.250000Z"
    assert record["request_id"] == "016162:7" == f"{record['client']}:{record['req_id']}"
    assert record["latency_ms"] == 12.3
    assert (record["batch_size"], record["worker"], record["outcome"]) == (3, 2, "ok")
    assert record["input"] == [7] and record["output"] == [7]
    named = parse(entry(7, request_id="caller-id"))
    assert named["request_id"] == "caller-id"
    failed = parse(entry(7, error=["deadline_exceeded", "too late " * 500, ""], outputs=None))
    assert failed["outcome"] == "deadline_exceeded" and failed["output"] is None
    assert failed["error"].startswith("too late") and len(failed["error"]) == 2000
    hidden = parse(entry(7, inputs=None))
    assert hidden["input"] is None and hidden["input_suppressed"] is True


def test_format_values():
    values = {"bytes": b"\x00\xff", "nan": float("nan"), "inf": float("-inf"),
              "array": np.arange(4, dtype=np.int16), "text": "é\u2028",
              "deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
              "long": list(range(MAX_ELEMENTS + 5)), 3: "int key"}
    item = capture(0, P.pack(values))
    (logged,) = parse(entry(0, inputs=[item]))["input"]
    assert logged["bytes"] == "AP8="
    assert logged["nan"] == "nan" and logged["inf"] == "-inf"
    assert logged["array"] == [0, 1, 2, 3] and logged["text"] == "é\u2028"
    assert logged["long"]["truncated"] and logged["long"]["length"] == MAX_ELEMENTS + 5
    assert logged["long"]["head"] == list(range(MAX_ELEMENTS))
    assert logged["3"] == "int key"
    assert "truncated" in json.dumps(logged["deep"])


def test_format_raw_arrays_and_markers():
    small = np.array([[1.5, np.nan]], dtype=np.float32)
    raw = capture([small.dtype.str, list(small.shape)], small.reshape(-1).view(np.uint8))
    assert parse(entry(0, outputs=[raw]))["output"] == [[[1.5, "nan"]]]
    words = np.array([b"ab", b"c"], dtype="S2")
    raw = capture([words.dtype.str, [2]], words.view(np.uint8))
    assert parse(entry(0, outputs=[raw]))["output"] == [["YWI=", "Yw=="]]
    big = np.arange(5000, dtype=np.float64)
    raw = capture(["<f8", [5000]], big.view(np.uint8))
    assert len(raw.data) == MAX_ELEMENTS * 8 and raw.nbytes == 5000 * 8  # only the head
    logged = parse(entry(0, inputs=[raw]))["input"][0]
    assert logged["truncated"] and logged["shape"] == [5000] and len(logged["head"]) == 1000
    huge = P.pack("y" * (MAX_VALUE_BYTES + 1))
    logged = parse(entry(0, inputs=[capture(0, huge)]))["input"][0]
    assert logged["truncated"] and logged["nbytes"] == len(huge)
    pickled = parse(entry(0, inputs=[capture(1, b"\x80\x04K\x01.")]))["input"][0]
    assert pickled == {"pickled": True, "nbytes": 5}
    broken = parse(entry(0, inputs=[capture(["<f4", [3]], b"\x00" * 5)]))["input"][0]
    assert "unreadable" in broken


def test_capture_does_not_see_later_changes():
    """A model may reuse its output buffer for the next batch: the log keeps the values
    of this batch."""
    out = np.arange(4, dtype=np.int32)
    item = capture(["<i4", [4]], out.view(np.uint8))
    out[:] = -1
    assert parse(entry(0, outputs=[item]))["output"] == [[0, 1, 2, 3]]


def test_log_path_default_name(tmp_path: Path):
    assert log_path(str(tmp_path), None) == str(tmp_path / "WKRServer.predictions.jsonl")
    assert log_path(str(tmp_path), "m") == str(tmp_path / "m.predictions.jsonl")


def test_put_is_safe_from_many_threads(tmp_path):
    path = str(tmp_path / "p.jsonl")
    log = PredictionLog(path, max_lines=50)
    results: list[bool] = []
    lock = threading.Lock()

    def produce(base: int) -> None:
        for i in range(100):
            ok = log.put(entry(base + i))
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LIMIT_S)
    try:
        assert log.flush(LIMIT_S)
    finally:
        log.close()
    assert len(results) == 400
    assert results.count(True) + log.dropped == 400
    assert len(read_lines(path)) == results.count(True)
