"""The worker used by ``benchmarks/faults.py``: echo, except for a few dict commands.

- ``{"hold": DIR}`` makes ``predict`` write ``DIR/started`` (holding its pid and
  ``time.monotonic()``, a clock every process of the host shares) and then wait, with a
  deadline, until ``DIR/release`` exists; the whole batch waits with it.
- ``{"pid": v}`` is answered ``{"pid": <this worker's pid>, "value": v}``: which process
  computed a request (a replacement's pid differs from the killed worker's).
- ``{"exit": code, "token": t}`` calls ``sys.exit(code)`` inside ``predict``.
- ``{"segv": t}`` kills the worker with SIGSEGV, as a crash in native code would.

The token of a crashing input makes it distinct from earlier ones, which the server
would answer ``PoisonInput`` at once (quarantine). The class lives in its own module
because the server starts its workers with the *spawn* method, which re-imports it by
module name.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from wkr_serving.server import WKRHardWorker

#: Longest a held batch waits for its release file (a benchmark that fails half-way must
#: not leave a worker waiting for ever).
HOLD_LIMIT_S = 60.0


class Worker(WKRHardWorker):
    def predict(self, model: Any, input: list[Any]) -> list[Any]:
        out = []
        for item in input:
            if isinstance(item, dict):
                item = _command(item)
            out.append(item)
        return out


def _command(item: dict[str, Any]) -> Any:
    """Carry out the command of a dict input; return its result."""
    if "hold" in item:
        _hold(item["hold"])
    elif "pid" in item:
        return {"pid": os.getpid(), "value": item["pid"]}
    elif "exit" in item:
        sys.exit(item["exit"])
    elif "segv" in item:
        os.kill(os.getpid(), signal.SIGSEGV)
    return item


def _hold(directory: str) -> None:
    started = os.path.join(directory, "started")
    with open(started + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {time.monotonic()!r}")
    os.replace(started + ".tmp", started)  # readers never see a half-written file
    release = os.path.join(directory, "release")
    deadline = time.monotonic() + HOLD_LIMIT_S
    pause = threading.Event()
    while not os.path.exists(release) and time.monotonic() < deadline:
        pause.wait(0.002)
