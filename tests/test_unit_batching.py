"""Unit tests of the pure batching core (server/batching.py): no sockets, no clock."""

from __future__ import annotations

import pytest
from wkr_serving.server.batching import (
    PREFETCH_LATE_S,
    PREFETCH_LEAD_S,
    PREFETCH_MAX_SERVICE_S,
    SERVICE_EWMA,
    BatchQueue,
    Request,
    dispatch_wait,
    prefetch_wait,
    service_average,
    should_dispatch,
    should_prefetch,
)


def make_request(client: bytes, req_id: int, n: int, t: float = 0.0) -> Request:
    return Request(client, req_id, t, 0.0, [0] * n, [f"{client!r}-{req_id}-{i}" for i in range(n)])


def flatten(segments) -> list:
    """The item frames a batch made of ``segments`` carries, in order."""
    out = []
    for req, offset, count in segments:
        out.extend(req.frames[offset:offset + count])
    return out


def test_empty_queue():
    q = BatchQueue()
    assert len(q) == 0
    assert q.oldest() is None
    assert q.take(5) == []
    assert len(q) == 0


def test_push_counts_items_and_rejects_empty_request():
    q = BatchQueue()
    q.push(make_request(b"a", 1, 3))
    q.push(make_request(b"b", 1, 2))
    assert len(q) == 5 and q.items == 5
    with pytest.raises(ValueError):
        q.push(make_request(b"c", 1, 0))
    assert len(q) == 5


def test_take_spans_requests_oldest_first():
    q = BatchQueue()
    a = make_request(b"a", 1, 2, t=1.0)
    b = make_request(b"b", 7, 2, t=2.0)
    c = make_request(b"c", 3, 1, t=3.0)
    for r in (a, b, c):
        q.push(r)
    segments = q.take(4)
    assert [(r.client, off, n) for r, off, n in segments] == [(b"a", 0, 2), (b"b", 0, 2)]
    assert flatten(segments) == a.frames + b.frames
    assert len(q) == 1
    assert q.oldest() == c.t_recv
    assert [(r.client, off, n) for r, off, n in q.take(4)] == [(b"c", 0, 1)]
    assert len(q) == 0 and q.oldest() is None


def test_take_splits_a_large_request_into_consecutive_segments():
    q = BatchQueue()
    big = make_request(b"big", 1, 10)
    q.push(big)
    batches = []
    for _ in range(10):  # bounded: 10 items need at most 10 takes
        if not len(q):
            break
        batches.append(q.take(4))
    assert [[(off, n) for _, off, n in segs] for segs in batches] == [[(0, 4)], [(4, 4)], [(8, 2)]]
    assert [f for segs in batches for f in flatten(segs)] == big.frames
    assert len(q) == 0


def test_split_request_shares_a_batch_with_the_next_request():
    q = BatchQueue()
    first = make_request(b"x", 1, 3, t=1.0)
    second = make_request(b"y", 2, 3, t=2.0)
    q.push(first)
    q.push(second)
    one = q.take(4)
    assert [(r.client, off, n) for r, off, n in one] == [(b"x", 0, 3), (b"y", 0, 1)]
    # The partly taken request is now the oldest and still counts only what is left.
    assert q.oldest() == second.t_recv
    assert len(q) == 2
    two = q.take(4)
    assert [(r.client, off, n) for r, off, n in two] == [(b"y", 1, 2)]
    assert flatten(one) + flatten(two) == first.frames + second.frames


def test_take_limit_of_one():
    q = BatchQueue()
    r = make_request(b"a", 1, 3)
    q.push(r)
    got = [q.take(1) for _ in range(3)]
    assert [segs[0][1:] for segs in got] == [(0, 1), (1, 1), (2, 1)]
    assert len(q) == 0


def test_should_dispatch_rules():
    # Nothing queued: never.
    assert not should_dispatch(0, 10.0, 0, 8, 0.005)
    # Idle server: a lone item goes at once, whatever the group timeout.
    assert should_dispatch(1, 0.0, 0, 8, 5.0)
    # Full batch: at once even while other workers are busy.
    assert should_dispatch(8, 0.0, 3, 8, 5.0)
    assert should_dispatch(9, 0.0, 3, 8, 5.0)
    # Busy server, partial batch: wait until the oldest item waited group_timeout.
    assert not should_dispatch(3, 0.001, 1, 8, 0.005)
    assert should_dispatch(3, 0.005, 1, 8, 0.005)
    assert should_dispatch(3, 0.5, 1, 8, 0.005)
    # A zero group timeout never holds items back.
    assert should_dispatch(1, 0.0, 2, 8, 0.0)


def test_dispatch_wait():
    assert dispatch_wait(0.0, 0.25) == pytest.approx(0.25)
    assert dispatch_wait(0.1, 0.25) == pytest.approx(0.15)
    assert dispatch_wait(0.25, 0.25) == 0.0
    assert dispatch_wait(3.0, 0.25) == 0.0


# -- BatchQueue.expire --------------------------------------------------------------------


def deadline_request(req_id: int, n: int, deadline: float) -> Request:
    """A request of ``n`` items due at ``deadline`` (0.0: none), for the expiry tests."""
    return Request(b"c", req_id, 0.0, deadline, [0] * n, [b"x"] * n)


def test_expire_removes_only_overdue_requests_at_the_front():
    q = BatchQueue()
    q.push(deadline_request(1, 2, deadline=5.0))
    q.push(deadline_request(2, 3, deadline=6.0))
    q.push(deadline_request(3, 1, deadline=0.0))  # no deadline
    q.push(deadline_request(4, 1, deadline=5.5))  # overdue, but behind a live request
    expired = q.expire(now=6.0)
    assert [(r.req_id, off, n) for r, off, n in expired] == [(1, 0, 2), (2, 0, 3)]
    assert len(q) == 2
    assert [r.req_id for r, _, _ in q.take(10)] == [3, 4]


def test_expire_returns_the_untaken_rest_of_a_split_request():
    q = BatchQueue()
    q.push(deadline_request(1, 5, deadline=1.0))
    assert [(off, n) for _, off, n in q.take(2)] == [(0, 2)]
    expired = q.expire(now=2.0)
    assert [(r.req_id, off, n) for r, off, n in expired] == [(1, 2, 3)]
    assert len(q) == 0 and q.take(5) == []


def test_expire_keeps_requests_whose_deadline_is_ahead():
    q = BatchQueue()
    q.push(deadline_request(1, 1, deadline=10.0))
    assert q.expire(now=9.999) == []
    assert len(q) == 1


# -- the next batch of a busy worker (credit of two) -------------------------------------

SERVICE = 0.002  # a worker whose batches take 2 ms on average


def prefetch(queued: int, now: float, *, retries: int = 0, started: float = 10.0,
             service: float = SERVICE, batch_size: int = 8) -> bool:
    return should_prefetch(queued, retries, now, started, service, batch_size)


def test_prefetch_a_full_batch_or_a_retry_at_once():
    assert prefetch(8, now=10.0)
    assert prefetch(9, now=10.0)
    assert prefetch(1, now=10.0, retries=1)
    assert not prefetch(7, now=10.0)  # a partial batch waits to be formed late
    assert not prefetch(0, now=10.0 + SERVICE)


def test_prefetch_a_partial_batch_from_just_before_the_expected_end():
    due = 10.0 + SERVICE - PREFETCH_LEAD_S
    assert not prefetch(3, now=due - 1e-6)
    assert prefetch(3, now=due)
    assert prefetch(3, now=10.0 + SERVICE)
    assert prefetch_wait(10.0, 10.0, SERVICE) == pytest.approx(SERVICE - PREFETCH_LEAD_S)
    assert prefetch_wait(due, 10.0, SERVICE) is None  # due now: nothing left to wait for
    assert prefetch_wait(due + 1.0, 10.0, SERVICE) is None


def test_no_prefetch_for_an_overdue_batch_even_when_full():
    """A batch that runs well past its expected end may be stuck: what is queued waits
    for whichever worker is free first."""
    overdue = 10.0 + SERVICE + PREFETCH_LATE_S
    assert prefetch(3, now=overdue)
    assert not prefetch(3, now=overdue + 1e-6)
    assert not prefetch(8, now=overdue + 1e-6)
    assert not prefetch(1, now=overdue + 1.0, retries=1)


def test_no_prefetch_before_the_worker_was_timed_or_when_its_batches_are_long():
    for service in (0.0, PREFETCH_MAX_SERVICE_S * 1.01, 1.0):
        assert not prefetch(8, now=10.0, service=service)
        assert not prefetch(3, now=10.0 + service, service=service)
        assert prefetch_wait(10.0, 10.0, service) is None
    assert prefetch(8, now=10.0, service=PREFETCH_MAX_SERVICE_S)


def test_service_average_starts_at_the_first_sample_and_damps_slow_ones():
    assert service_average(0.0, 0.003) == 0.003
    assert service_average(0.002, 0.002) == pytest.approx(0.002)
    assert service_average(0.002, 0.001) == pytest.approx(0.002 - SERVICE_EWMA * 0.001)
    # One batch stuck for a minute counts as twice the average, no more.
    assert service_average(0.002, 60.0) == pytest.approx(0.002 * (1 + SERVICE_EWMA))
    average = 0.002
    for _ in range(100):  # bounded: a worker that really got slower is followed
        average = service_average(average, 0.010)
    assert average == pytest.approx(0.010)
