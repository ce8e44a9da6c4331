"""Unit tests of the statistics core (server/stats.py); numpy is the reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from wkr_serving.server.stats import Histogram, RateMeter, Summary, Window, percentile


def test_percentile_matches_numpy_linear():
    rng = random.Random(1)
    values = sorted(rng.uniform(-50, 50) for _ in range(101))
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0


def test_window_percentiles_and_eviction():
    w = Window(size=100)
    rng = random.Random(2)
    values = [rng.expovariate(1.0) for _ in range(250)]
    for v in values[:50]:
        w.add(v)
    w.extend(values[50:])
    assert len(w) == 100
    recent = values[-100:]  # only the most recent `size` samples count
    got = w.percentiles((50, 90, 99))
    assert set(got) == {"p50", "p90", "p99"}
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(recent, q))
    assert got["p50"] <= got["p90"] <= got["p99"]


def test_empty_window_percentiles_are_nan():
    got = Window(8).percentiles()
    assert set(got) == {"p50", "p90", "p99"}
    assert all(math.isnan(v) for v in got.values())


def test_rate_meter_counts_per_second_over_span():
    m = RateMeter(horizon=60)
    base = 1_000_000.0
    # 10 events in each of seconds base..base+9, plus 5 more at base+9.5
    for s in range(10):
        for _ in range(10):
            m.add(base + s + 0.1)
    m.add(base + 9.5, count=5)
    now = base + 9.9
    assert m.rate(now, span=10) == pytest.approx(105 / 10)
    assert m.rate(now, span=1) == pytest.approx(15 / 1)
    assert m.rate(now, span=5) == pytest.approx(55 / 5)
    # Later, old seconds fall out of the span.
    assert m.rate(base + 30.0, span=10) == 0.0


def test_rate_meter_span_is_capped_at_the_horizon():
    m = RateMeter(horizon=5)
    m.add(100.0, count=7)
    m.add(104.0, count=3)
    assert m.rate(104.5, span=60) == pytest.approx(10 / 5)
    m.add(106.0, count=1)
    assert m.rate(106.5, span=60) == pytest.approx(4 / 5)


def test_summary_snapshot():
    s = Summary(window=1024)
    assert s.snapshot() == {"count": 0}
    values = [3.0, -1.5, 10.0, 2.25, 7.0]
    for v in values:
        s.add(v)
    snap = s.snapshot()
    assert snap["count"] == len(values)
    assert snap["mean"] == pytest.approx(np.mean(values))
    assert snap["min"] == min(values)
    assert snap["max"] == max(values)
    assert snap["p50"] == pytest.approx(np.median(values))


def test_histogram():
    h = Histogram()
    assert h.mean() == 0.0
    assert h.snapshot() == {"counts": {}, "mean": 0.0}
    sizes = [1, 4, 4, 2, 4, 1]
    for size in sizes:
        h.add(size)
    h.add(3, count=2)
    sizes += [3, 3]
    snap = h.snapshot()
    assert snap["counts"] == {str(k): sizes.count(k) for k in sorted(set(sizes))}
    assert list(snap["counts"]) == sorted(snap["counts"], key=int)
    assert snap["mean"] == pytest.approx(np.mean(sizes))
