"""Unit tests of the log throttle (client/logs.py ``LogThrottle``, re-exported by
server/logs.py, where the server's roles import it): a flood of one kind of event logs
a burst, then one summary line per period. The clock is passed in."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from wkr_serving.server.logs import LogThrottle


class ListHandler(logging.Handler):
    """Keeps every message it is given, so a test can compare what was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, ListHandler]]:
    """A logger of its own (not propagated) and the handler that records its lines."""
    logger = logging.getLogger("wkr_serving.test.throttle")
    logger.propagate = False
    handler = ListHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_log_throttle_logs_a_burst_then_summarises(captured):
    logger, handler = captured
    throttle = LogThrottle(logger, burst=3, period=10.0)
    logged = [throttle.log("bad message %d", i, now=100.0 + i * 0.1) for i in range(8)]
    assert logged == [True] * 3 + [False] * 5
    assert handler.lines == ["bad message 0", "bad message 1", "bad message 2"]
    assert throttle.log("bad message %d", 8, now=111.0)  # a new period
    assert handler.lines[3:] == ["... and 5 more like it in the last 10s", "bad message 8"]


def test_log_throttle_each_event_once_below_the_burst(captured):
    logger, handler = captured
    throttle = LogThrottle(logger, burst=10, period=60.0)
    for i in range(4):
        throttle.log("event %s", i, now=float(i))
    assert handler.lines == [f"event {i}" for i in range(4)]
