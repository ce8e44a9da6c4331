"""Drive QueueWorker units in tests without the pool CLI: in threads, or in processes of
their own (spawned; this module is imported by name there). Every loop is bounded in
iterations and time."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from typing import Any

from wkr_serving.client.queueworker import QueueWorker

#: Longest a unit loop runs in a test (s) and most iterations it makes.
UNIT_LIMIT_S = 120.0
UNIT_MAX_ITERATIONS = 200_000


def unit_options(redis_url: str, queue: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    QueueWorker.add_arguments(parser)
    return parser.parse_args(["-redis_url", redis_url, "-queue", queue, *extra])


def server_tuple(server: Any) -> tuple[str, int, int]:
    return ("127.0.0.1", server.port, server.port_out)


class UnitThread(threading.Thread):
    """A QueueWorker running its lifecycle in a thread until :meth:`stop`."""

    def __init__(self, server: tuple[str, int, int], options: argparse.Namespace,
                 index: int = 0) -> None:
        super().__init__(daemon=True, name=f"unit-{index}")
        self.unit = QueueWorker(index, server, options)
        self.model: Any = None
        self.error: BaseException | None = None
        self.iterations = 0
        self.ready = threading.Event()

    def run(self) -> None:
        logger = logging.getLogger(f"test.unit.{self.unit.index}")
        try:
            self.model = self.unit.get_model(*self.unit.server)
            self.ready.set()
            deadline = time.monotonic() + UNIT_LIMIT_S
            while (not self.unit.stopping.is_set() and self.iterations < UNIT_MAX_ITERATIONS
                   and time.monotonic() < deadline):
                self.unit.do_work(self.model, logger)
                self.iterations += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self.ready.set()
            if self.model is not None:
                self.unit.off_model(self.model)

    def stop(self, limit: float = 30.0) -> None:
        self.unit.stopping.set()
        self.join(limit)
        assert not self.is_alive(), "unit thread did not stop in time"
        if self.error is not None:
            raise AssertionError(f"unit failed: {self.error!r}") from self.error


def unit_process(server: tuple[str, int, int], argv: list[str], ready_path: str,
                 stop_path: str, index: int = 0) -> None:
    """A unit in its own process: runs until ``stop_path`` exists (checked every
    iteration), touches ``ready_path`` once it has a model."""
    parser = argparse.ArgumentParser()
    QueueWorker.add_arguments(parser)
    unit = QueueWorker(index, server, parser.parse_args(argv))
    logger = logging.getLogger(f"unit.{index}")
    model = unit.get_model(*server)
    with open(ready_path, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + UNIT_LIMIT_S
    try:
        for _ in range(UNIT_MAX_ITERATIONS):
            if os.path.exists(stop_path) or time.monotonic() > deadline:
                break
            unit.do_work(model, logger)
    finally:
        unit.off_model(model)
