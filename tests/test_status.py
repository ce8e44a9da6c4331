"""server_status: configuration, versions, workers, counters, distributions, statistics."""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import numpy as np
import pytest
import wkr_serving.client as client_pkg
from helpers import connect, wait_idle
from wkr_serving.client import ModelError
from wkr_serving.server.status import ServerStatus, WorkerRow


def test_status_contents(obj_server):
    with connect(obj_server) as client:
        first = wait_idle(client)
        n = 25
        for i in range(n):
            assert client.encode(i) == i
        with pytest.raises(ModelError):
            client.encode({"cmd": "raise", "message": "counted"})
        # Idle as seen by the ventilator: the last worker's READY may trail its result.
        status = wait_idle(client)

    # configuration and versions
    config = status["config"]
    assert config["protocol"] == "obj" == status["protocol"]
    assert config["num_worker"] == 2 and config["batch_size"] == 4 and config["cpu"] is True
    versions = status["versions"]
    assert versions["wkr_serving"] == client_pkg.__version__ == status["server_version"]
    for key in ("python", "pyzmq", "numpy", "msgpack"):
        assert isinstance(versions[key], str) and versions[key]
    # time and readiness
    assert status["ready"] is True
    assert status["uptime_s"] > first["uptime_s"] >= 0
    # workers
    workers = status["workers"]
    assert len(workers) == 2
    for w in workers:
        assert isinstance(w["pid"], int) and w["device"] == "cpu"
        assert w["state"] in ("idle", "busy")
        assert isinstance(w["batches"], int) and w["batches"] >= 0
    # (a restarted worker starts counting again, so the sum is at most the total)
    assert 0 < sum(w["batches"] for w in workers) <= status["num_batches"]
    # queue and counters (deltas: the server is shared by other tests)
    assert status["queue_items"] == 0 and status["in_flight_items"] == 0
    assert status["num_requests"] - first["num_requests"] == n + 1
    assert status["num_results"] - first["num_results"] == n
    errors_before = first["num_errors"].get("model_error", 0)
    assert status["num_errors"].get("model_error", 0) - errors_before == 1
    # batch sizes
    dist = status["batch_size"]
    counts = {int(k): v for k, v in dist["counts"].items()}
    assert all(1 <= k <= config["batch_size"] for k in counts)
    assert dist["mean"] == pytest.approx(
        sum(k * v for k, v in counts.items()) / sum(counts.values()))
    assert sum(counts.values()) == status["num_batches"]
    # latency percentiles (ms) and throughput
    latency = status["latency_ms"]
    for key in ("p50", "p90", "p99"):
        assert isinstance(latency[key], float) and not math.isnan(latency[key])
        assert latency[key] >= 0
    assert latency["p50"] <= latency["p90"] <= latency["p99"]
    throughput = status["throughput_per_s"]
    assert throughput["last_10s"] > 0 and throughput["last_60s"] > 0
    assert isinstance(status["statistic"], dict)


def test_status_is_a_read_only_command(obj_server):
    with connect(obj_server) as client:
        a = wait_idle(client)
        b = client.server_status
        assert b["num_requests"] == a["num_requests"]
        assert b["num_results"] == a["num_results"]


def test_record_statistic_appears_in_status(obj_server):
    rng = np.random.default_rng(7)
    values = [float(v) for v in rng.normal(10.0, 3.0, size=37)]
    other = [float(v) for v in rng.uniform(0, 1, size=5)]
    with connect(obj_server) as client:
        got = client.encode_batch([{"cmd": "stat", "values": {"stat_test_ms": v}}
                                   for v in values])
        assert got == [{"stat_test_ms": v} for v in values]
        for v in other:
            client.encode({"cmd": "stat", "values": {"stat_test_other": v,
                                                     "stat_test_ms": v}})
        stats = wait_idle(client)["statistic"]
    both = values + other
    summary = stats["stat_test_ms"]
    assert summary["count"] == len(both)
    assert summary["mean"] == pytest.approx(np.mean(both))
    assert summary["min"] == pytest.approx(min(both))
    assert summary["max"] == pytest.approx(max(both))
    assert summary["p50"] == pytest.approx(np.median(both))
    assert stats["stat_test_other"]["count"] == len(other)
    assert stats["stat_test_other"]["mean"] == pytest.approx(np.mean(other))


def test_client_status(obj_client):
    obj_client.encode("x")
    status = obj_client.status
    assert status["identity"] == obj_client.identity
    assert status["protocol"] == "obj"
    assert status["num_request"] >= 1 and status["num_pending_request"] == 0
    assert status["server_version"] == client_pkg.__version__


def mismatches(value: Any, hint: Any, path: str = "status") -> list[str]:
    """Where ``value`` differs from the type ``hint`` (a TypedDict checked key by key: no
    required key missing, no key it does not declare), as ``path: why`` lines."""
    if is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__}, not a {hint.__name__}"]
        keys, required = set(value), set(hint.__required_keys__)
        problems = [f"{path}: missing {key!r}" for key in sorted(required - keys)]
        problems += [f"{path}: extra {key!r}" for key in sorted(keys - required
                                                                 - hint.__optional_keys__)]
        hints = get_type_hints(hint)
        for key in sorted(keys & set(hints)):
            problems += mismatches(value[key], hints[key], f"{path}[{key!r}]")
        return problems
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return []
    if origin is Literal:
        return [] if value in args else [f"{path}: {value!r} is none of {args}"]
    if origin in (Union, types.UnionType):
        return [] if any(not mismatches(value, a, path) for a in args) else [
            f"{path}: {value!r} is no {hint}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [p for i, item in enumerate(value) for p in mismatches(item, args[0],
                                                                      f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a dict"]
        return [p for k, v in value.items() for p in mismatches(k, args[0], f"{path} key")
                + mismatches(v, args[1], f"{path}[{k!r}]")]
    kinds = {float: (int, float), type(None): (type(None),)}.get(hint, (hint,))
    if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
        return [f"{path}: {value!r} is not a {getattr(hint, '__name__', hint)}"]
    return []


def test_status_is_exactly_a_server_status(obj_server):
    """Every key the ventilator and the sink put in the status is declared in
    ``ServerStatus`` (and its nested types, the worker rows included) with its type, and
    every key declared there is in it: a key added or renamed on one side only fails here."""
    with connect(obj_server) as client:
        client.encode_batch([{"cmd": "stat", "values": {"status_types_ms": 1.5}}, 2, 3])
        status = wait_idle(client)
    assert status["statistic"]["status_types_ms"]["count"] >= 1
    assert any("batches_done" in row for row in status["workers"])  # the sink's keys too
    assert not mismatches(status, ServerStatus), "\n".join(mismatches(status, ServerStatus))
    for row in status["workers"]:
        assert set(WorkerRow.__required_keys__) <= set(row) <= (
            WorkerRow.__required_keys__ | WorkerRow.__optional_keys__), sorted(row)
