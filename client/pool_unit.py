"""The process of one pool unit: build the user's ``WKRWorker``, loop ``do_work``, report.

The central starts :func:`run_unit` with the spawn method. The unit reports to the
central over a ZeroMQ PUSH (its state, and its counters at most every
``REPORT_EVERY_S``); the central's own view of the process (its sentinel) stays the
authority on whether it is alive. Exit codes: 0 after a clean stop,
:data:`EXIT_BOOT_FAILED` when ``get_model`` raised.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import zmq

from .logs import LogThrottle, set_logger
from .process import die_with_parent
from .unit import WKRWorker

__all__ = ["EXIT_BOOT_FAILED", "UnitSpec", "run_unit"]

EXIT_BOOT_FAILED = 3
#: Seconds between two counter reports of a busy unit.
REPORT_EVERY_S = 0.5
#: Pause after a failed ``do_work``: doubles per consecutive failure up to the maximum,
#: back to none after a success, and cut short by a stop.
ERROR_PAUSE_S = 0.05
MAX_ERROR_PAUSE_S = 1.0
#: Failures logged with their traceback per minute (then one line counting the rest).
LOGGED_FAILURES_PER_MIN = 100


@dataclass(frozen=True)
class UnitSpec:
    """Everything a unit process needs, as plain picklable data."""

    unit_class: type[WKRWorker]
    index: int
    generation: int
    server: tuple[str, int, int]
    options: dict[str, Any]
    report_endpoint: str
    log_dir: str | None
    log_name: str
    verbose: bool


class _Reporter:
    """Sends state and counters to the central; never blocks the unit."""

    def __init__(self, spec: UnitSpec) -> None:
        self.spec = spec
        self.context = zmq.Context(1)
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.connect(spec.report_endpoint)
        self.last = 0.0

    def send(self, state: str, unit: WKRWorker | None, **extra: Any) -> None:
        report = {"unit": self.spec.index, "gen": self.spec.generation, "state": state,
                  "pid": os.getpid(), **extra}
        if unit is not None:
            report["counters"] = dict(unit.counters)
        with contextlib.suppress(zmq.Again):  # central busy or gone: catch up next time
            self.socket.send_json(report, zmq.NOBLOCK)
        self.last = time.monotonic()

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def run_unit(spec: UnitSpec, stop: Any) -> None:
    """Process entry of a unit (module level, for the spawn method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: central decides
    die_with_parent()
    name = f"unit-{spec.index}"
    logger = set_logger(name, spec.log_dir, spec.log_name, spec.verbose, "cyan")
    unit = spec.unit_class(spec.index, spec.server, argparse.Namespace(**spec.options))
    signal.signal(signal.SIGTERM, lambda *_: unit.stopping.set())
    _watch_stop(stop, unit)
    reporter = _Reporter(spec)
    ip, port, port_out = spec.server
    reporter.send("starting", None)
    try:
        model = unit.get_model(ip, port, port_out)
    except BaseException as exc:
        text = traceback.format_exc()
        logger.error("get_model failed for %s:%d/%d: %s\n%s", ip, port, port_out, exc, text)
        reporter.send("boot_failed", None, last_error=_one_line(exc))
        reporter.close()
        sys.exit(EXIT_BOOT_FAILED)
    logger.info("ready, serving %s:%d/%d", ip, port, port_out)
    try:
        _loop(unit, model, logger, reporter)
    finally:
        reporter.send("stopping", unit)
        try:
            unit.off_model(model)
        except Exception as exc:
            logger.error("off_model failed: %s\n%s", exc, traceback.format_exc())
        reporter.send("stopped", unit)
        reporter.close()
        logger.info("stopped")


def _loop(unit: WKRWorker, model: Any, logger: logging.Logger, reporter: _Reporter) -> None:
    iterations = errors = failures_in_row = 0
    last_error: str | None = None
    throttle = LogThrottle(logger, logging.ERROR, burst=LOGGED_FAILURES_PER_MIN)
    reporter.send("running", unit, iterations=0, errors=0)
    while not unit.stopping.is_set():
        try:
            unit.do_work(model, logger)
            failures_in_row = 0
        except Exception as exc:
            errors += 1
            failures_in_row += 1
            last_error = _one_line(exc)
            throttle.log("do_work failed (%d in a row): %s\n%s", failures_in_row, exc,
                         traceback.format_exc())
            pause = min(MAX_ERROR_PAUSE_S, ERROR_PAUSE_S * 2 ** min(failures_in_row - 1, 16))
            unit.stopping.wait(pause)  # woken at once by a stop
        iterations += 1
        if failures_in_row == 1 or time.monotonic() - reporter.last >= REPORT_EVERY_S:
            reporter.send("running", unit, iterations=iterations, errors=errors,
                          last_error=last_error)
    reporter.send("running", unit, iterations=iterations, errors=errors,
                  last_error=last_error)


def _watch_stop(stop: Any, unit: WKRWorker) -> None:
    """Turn the central's stop event (a multiprocessing Event) into ``unit.stopping``."""

    def watch() -> None:
        stop.wait()
        unit.stopping.set()

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:500] if text else type(exc).__name__
