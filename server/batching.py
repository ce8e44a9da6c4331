"""Pure batching core: the ventilator's queue and its dispatch policy (no sockets, no clock).

Items from different clients share a batch. A worker holds up to ``WORKER_CREDIT``
batches: an idle worker is served by :func:`should_dispatch`; a worker computing a batch
gets its next one by :func:`should_prefetch`, as late as it can be sent and still be
there when the worker finishes, so that it holds as many items as possible.

A request of several items may be split across batches; :meth:`BatchQueue.take` hands
out ``(request, offset, count)`` slices. Items of a batch whose worker died are put back
as *retries*: one item each, served before the queue and each alone in its batch (so a
second death names its input).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PREFETCH_GAP_S", "PREFETCH_LATE_S", "PREFETCH_LEAD_S", "PREFETCH_MAX_SERVICE_S",
           "SERVICE_EWMA", "WORKER_CREDIT", "BatchQueue", "Request", "Slice", "dispatch_wait",
           "prefetch_wait", "service_average", "should_dispatch", "should_prefetch"]

#: Batches one worker may hold at once: the one it computes and the next, sent before
#: its READY for the first, so it never waits a READY -> BATCH round trip in between.
WORKER_CREDIT = 2
#: How long (s) before a busy worker is expected to finish its batch its next batch is
#: formed and sent, when no full batch is queued before: about the READY -> BATCH round
#: trip (0.2-0.3 ms on a 2-core VM) with a margin. Later would leave the worker waiting;
#: earlier would send a batch with fewer items than could have joined it.
PREFETCH_LEAD_S = 0.0005
#: Only a worker under steady load gets a batch ahead: one whose batch followed its
#: previous one at once (sent ahead; or sent as its READY was handled, or within this
#: many seconds of it). A batch sent to a worker that was idle longer (a lone request,
#: the first after a pause) gains nothing from one ahead: the next waits for its READY,
#: as with a credit of one.
PREFETCH_GAP_S = 0.001
#: A batch still running this long (s) after it was expected to end is overdue: when it
#: will end is anyone's guess (a slow input, a stuck model), so the next batch waits in
#: the queue for whichever worker is free first, as with a credit of one. About the
#: resolution of the ventilator's poll (1 ms), which may wake it that late.
PREFETCH_LATE_S = 0.001
#: Workers whose batches take longer than this on average (s) get no batch ahead: the
#: round trip it hides is then under ~1% of a batch, and a batch held behind a long one
#: could have gone to another worker that became free meanwhile.
PREFETCH_MAX_SERVICE_S = 0.025
#: Weight of the newest batch in a worker's moving average of its batch service time.
#: A batch that took over twice the average counts as twice the average, so one slow
#: batch (a stuck input, a paused process) does not make the worker look slow for long.
SERVICE_EWMA = 0.25


@dataclass(slots=True)
class Request:
    """One client request waiting for (part of) its items to be dispatched."""

    client: bytes
    req_id: int
    t_recv: float
    deadline: float  # absolute monotonic time; 0.0 means none
    metas: list[Any]
    frames: list[Any]
    taken: int = field(default=0)
    #: Unique per accepted request: the sink reassembles split requests by it, so a
    #: client reusing a request id cannot mix two requests' parts.
    serial: int = field(default=0)
    #: The request's options for the prediction log (None: none, or no log).
    options: dict[str, Any] | None = field(default=None)
    #: The model epoch of the worker that took its first items (-1: none yet). The rest
    #: of its items go only to workers of that epoch while one is left, so a request
    #: split over several batches during a model switch is answered by one model.
    epoch: int = field(default=-1)

    @property
    def total(self) -> int:
        return len(self.metas)


#: ``(request, offset, count)``: ``count`` items of ``request`` starting at ``offset``.
Slice = tuple[Request, int, int]


class BatchQueue:
    """FIFO of requests, measured in items, with a lane of retries served first."""

    __slots__ = ("_requests", "_retries", "items")

    def __init__(self) -> None:
        self._requests: deque[Request] = deque()
        self._retries: deque[Slice] = deque()
        self.items = 0

    def __len__(self) -> int:
        return self.items

    def push(self, request: Request) -> None:
        if request.total == 0:
            raise ValueError("a request needs at least one item")
        self._requests.append(request)
        self.items += request.total - request.taken

    def retry(self, item: Slice) -> None:
        """Queue one item again, ahead of the queue, to be dispatched alone."""
        self._retries.append(item)
        self.items += item[2]

    @property
    def retries(self) -> int:
        return len(self._retries)

    def oldest(self) -> float | None:
        """Arrival time of the oldest queued item, or None when empty."""
        oldest = self._requests[0].t_recv if self._requests else None
        if self._retries:  # rare: only after a worker died
            retry = self._retries[0][0].t_recv
            return retry if oldest is None or retry < oldest else oldest
        return oldest

    def take(self, limit: int, epoch: int = 0, live: Container[int] = (),
             pinned_only: bool = False) -> list[Slice]:
        """Remove up to ``limit`` items, oldest first, as slices, for a worker of model
        ``epoch``; a retry leaves alone. A request whose first items went to a worker of
        another epoch that is still in ``live`` is left for that epoch's workers (only a
        request being split can be, and those stay at the front). ``pinned_only``: take
        only such requests of ``epoch`` (a retiring worker finishing its model's share)."""
        if self._retries:
            for k, item in enumerate(self._retries):
                pin = item[0].epoch
                if pin == epoch or (not pinned_only and (pin < 0 or pin not in live)):
                    del self._retries[k]
                    self.items -= item[2]
                    item[0].epoch = epoch
                    return [item]
        segments: list[Slice] = []
        skipped: list[Request] = []
        requests = self._requests
        room = limit
        while room and requests:
            req = requests[0]
            if req.taken and req.epoch != epoch and req.epoch in live:
                skipped.append(requests.popleft())  # another model's share: left in place
                continue
            if pinned_only and (not req.taken or req.epoch != epoch):
                break
            if not req.taken:
                req.epoch = epoch
            count = min(room, req.total - req.taken)
            segments.append((req, req.taken, count))
            req.taken += count
            room -= count
            if req.taken == req.total:
                requests.popleft()
        for req in reversed(skipped):
            requests.appendleft(req)
        self.items -= limit - room
        return segments

    def pinned(self, epoch: int) -> bool:
        """Whether a request split by a worker of ``epoch`` still has items queued."""
        for req in self._requests:
            if not req.taken:
                return False  # the split requests are all at the front
            if req.epoch == epoch:
                return True
        return any(item[0].epoch == epoch for item in self._retries)

    def take_all(self) -> list[Slice]:
        """Remove everything queued, retries included (the server is stopping)."""
        slices = list(self._retries)
        self._retries.clear()
        self.items -= sum(item[2] for item in slices)
        return slices + self.take(self.items)

    def expire(self, now: float) -> list[Slice]:
        """Remove the requests whose deadline passed before ``now`` from the front of the
        queue (it stops at the first live request: a request deep
        in the queue is dropped when it reaches the front). Returns them as segments."""
        expired: list[Slice] = []
        while self._retries and 0 < self._retries[0][0].deadline <= now:
            item = self._retries.popleft()
            self.items -= item[2]
            expired.append(item)
        while self._requests:
            req = self._requests[0]
            if not req.deadline or req.deadline > now:
                break
            self._requests.popleft()
            count = req.total - req.taken
            expired.append((req, req.taken, count))
            req.taken = req.total
            self.items -= count
        return expired


def should_dispatch(queued: int, waited: float, busy_workers: int, batch_size: int,
                    group_timeout: float) -> bool:
    """Whether to hand a batch to an idle worker now.

    Dispatch at once when the batch is full, when the server is otherwise idle (a lone
    request pays no batching delay), or when the oldest item has waited
    ``group_timeout`` seconds. Otherwise other workers are busy, more items are likely
    on their way, and waiting a little fills the batch.
    """
    if queued <= 0:
        return False
    return queued >= batch_size or busy_workers == 0 or waited >= group_timeout


def dispatch_wait(waited: float, group_timeout: float) -> float:
    """Seconds until a partly filled batch must go, given how long its oldest item waited."""
    return max(0.0, group_timeout - waited)


def service_average(average: float, sample: float) -> float:
    """A worker's moving average of batch service time after one more batch took
    ``sample`` seconds (``average`` 0: none yet)."""
    if average <= 0:
        return sample
    return average + SERVICE_EWMA * (min(sample, 2 * average) - average)


def should_prefetch(queued: int, retries: int, now: float, started: float, service: float,
                    batch_size: int) -> bool:
    """Whether to send a worker that computes a batch (begun at ``started``; its batches
    take ``service`` seconds on average, 0 if none was timed yet) its next one now.

    Only while that batch runs as expected: not before the worker was timed, not for a
    worker slower than ``PREFETCH_MAX_SERVICE_S``, not once the batch is overdue
    (``PREFETCH_LATE_S`` past its expected end). Then at once when a full batch (or an
    item to retry, which goes alone) is queued; else from ``PREFETCH_LEAD_S`` before
    the batch is expected to end, so the next one is there when it does and holds what
    came until then.
    """
    if queued <= 0 or not 0 < service <= PREFETCH_MAX_SERVICE_S:
        return False
    if now > started + service + PREFETCH_LATE_S:
        return False
    return queued >= batch_size or retries > 0 or now >= started + service - PREFETCH_LEAD_S


def prefetch_wait(now: float, started: float, service: float) -> float | None:
    """Seconds until :func:`should_prefetch` sends such a worker a partial batch, or None
    if it will not by time (not timed yet, too slow, or the time is past)."""
    if not 0 < service <= PREFETCH_MAX_SERVICE_S:
        return None
    wait = started + service - PREFETCH_LEAD_S - now
    return wait if wait > 0 else None
