"""Worker classes for tests/test_credit.py (the server's spawned children import them by
name, so they live outside the test module).

A paced batch stands for a model's compute: predict waits (on an Event, with the given
timeout) as long as the longest ``pace`` item of its batch asks. Nothing here waits to
synchronise with a test: that is what the ``block`` command (a file the test creates)
is for.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from workers import ControlledWorker, touch, wait_for_file


class PacedWorker(ControlledWorker):
    """ControlledWorker plus ``{"cmd": "pace", "seconds": s, "value": v}``: the batch
    computes for ``s`` seconds (the longest of its pace items, once per batch), and the
    item's result is ``{"pid": <worker pid>, "value": v}``. A pace item may also carry
    ``"started"`` and ``"release"`` paths, as a ``block`` item does: it then creates the
    first and waits (bounded) for the second before it computes."""

    def predict(self, model: Any, input: Any) -> Any:
        paces = [item for item in input if isinstance(item, dict) and item.get("cmd") == "pace"]
        for item in paces:
            if item.get("started"):
                touch(item["started"])
                wait_for_file(item["release"])
        if paces:
            threading.Event().wait(max(float(item["seconds"]) for item in paces))
        rest = [item for item in input
                if not (isinstance(item, dict) and item.get("cmd") == "pace")]
        computed = iter(super().predict(model, rest) if rest else [])
        return [{"pid": os.getpid(), "value": item.get("value")}
                if isinstance(item, dict) and item.get("cmd") == "pace" else next(computed)
                for item in input]
