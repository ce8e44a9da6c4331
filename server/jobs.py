"""Pure reassembly core for the sink: collect the parts of split requests (no sockets).

A request of ``total`` items may come back from several batches, in any order. Parts
are kept until every item arrived; an error in any part fails the whole request once,
and later parts of a failed request are dropped, the entry removed when all are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Completed", "Reassembler"]


@dataclass(slots=True)
class _Job:
    total: int
    received: int = 0
    failed: bool = False
    parts: dict[int, tuple[list[Any], list[Any]]] = field(default_factory=dict)


@dataclass(slots=True)
class Completed:
    """A request ready to be answered: either ``metas``/``frames`` or ``error``."""

    metas: list[Any] | None
    frames: list[Any] | None
    error: Any = None


class Reassembler:
    __slots__ = ("_jobs",)

    def __init__(self) -> None:
        self._jobs: dict[tuple[bytes, int], _Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def forget_below(self, serial: int) -> int:
        """Drop the requests numbered below ``serial``; return how many were dropped."""
        old = [key for key in self._jobs if key[1] < serial]
        for key in old:
            del self._jobs[key]
        return len(old)

    def add(self, client: bytes, request: int, offset: int, total: int, count: int,
            metas: list[Any] | None, frames: list[Any], error: Any = None) -> Completed | None:
        """Record one part; return the request's answer when it is decided, else None.

        ``request`` tells the requests of ``client`` apart; the sink gives the
        ventilator's serial number, not the client's request id, which a client could
        reuse while an earlier request with that id is still being assembled.

        An error is answered at once; a success only when the last item arrived.
        """
        if count == total and offset == 0:
            return Completed(None, None, error) if error is not None else Completed(metas, frames)
        key = (client, request)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(total)
        job.received += count
        done = job.received >= job.total
        if done:
            del self._jobs[key]
        if job.failed:
            return None
        if error is not None:
            job.failed = True
            job.parts.clear()
            return Completed(None, None, error)
        job.parts[offset] = (metas or [], frames)
        if not done:
            return None
        all_metas: list[Any] = []
        all_frames: list[Any] = []
        for off in sorted(job.parts):
            part_metas, part_frames = job.parts[off]
            all_metas.extend(part_metas)
            all_frames.extend(part_frames)
        return Completed(all_metas, all_frames)
