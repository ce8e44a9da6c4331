"""The worker used by ``benchmarks/faults.py``: echo, or hold a batch until released.

An item ``{"hold": DIR}`` makes ``predict`` write ``DIR/started`` (holding its pid and
``time.monotonic()``, a clock every process of the host shares) and then wait, with a
deadline, until ``DIR/release`` exists. It lives in its own module because the server
starts its workers with the *spawn* method, which re-imports the class by module name.
"""

from __future__ import annotations

import os
import threading
import time

from wkr_serving.server import WKRHardWorker

#: Longest a held batch waits for its release file.
HOLD_LIMIT_S = 60.0


class Worker(WKRHardWorker):
    def predict(self, model, input):
        for item in input:
            if isinstance(item, dict) and "hold" in item:
                _hold(item["hold"])
        return input


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
