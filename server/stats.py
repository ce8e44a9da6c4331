"""Pure statistics core: O(1) recording, work deferred to the (rare) status query."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from .status import BatchSizes, StatSummary

__all__ = ["Histogram", "RateMeter", "Summary", "Window", "percentile"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Window:
    """The most recent ``size`` samples."""

    __slots__ = ("_values",)

    def __init__(self, size: int = 4096) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: float) -> None:
        self._values.append(value)

    def extend(self, values: Iterable[float]) -> None:
        self._values.extend(values)

    def percentiles(self, qs: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
        ordered = sorted(self._values)
        return {f"p{q:g}": percentile(ordered, q) for q in qs}


class RateMeter:
    """Events per second over a sliding span, kept as one counter per whole second."""

    __slots__ = ("_buckets", "_horizon")

    def __init__(self, horizon: int = 60) -> None:
        self._horizon = horizon
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first

    def add(self, now: float, count: int = 1) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
            return
        self._buckets.append([second, count])
        while self._buckets and self._buckets[0][0] <= second - self._horizon:
            self._buckets.popleft()

    def rate(self, now: float, span: int = 10) -> float:
        """Mean events per second over the last ``span`` complete-or-current seconds."""
        span = max(1, min(span, self._horizon))
        first = int(now) - span + 1
        total = sum(c for s, c in self._buckets if s >= first)
        return total / span


class Summary:
    """count / mean / min / max, and p50 over recent values, of one named statistic."""

    __slots__ = ("count", "max", "min", "total", "window")

    def __init__(self, window: int = 1024) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.window = Window(window)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.window.add(value)

    def snapshot(self) -> StatSummary:
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "mean": self.total / self.count, "min": self.min,
                "max": self.max, "p50": self.window.percentiles((50,))["p50"]}


class Histogram:
    """Counts of integer values (batch sizes)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, value: int, count: int = 1) -> None:
        self.counts[value] = self.counts.get(value, 0) + count

    def mean(self) -> float:
        n = sum(self.counts.values())
        return sum(k * c for k, c in self.counts.items()) / n if n else 0.0

    def snapshot(self) -> BatchSizes:
        return {"counts": {str(k): v for k, v in sorted(self.counts.items())},
                "mean": self.mean()}

