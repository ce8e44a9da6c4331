"""Unit tests of the sink's reassembly core (server/jobs.py)."""

from __future__ import annotations

import itertools

import pytest
from wkr_serving.server.jobs import Reassembler


def parts_of(total: int, sizes: list[int]):
    """Split ``total`` items into parts of ``sizes``: (offset, count, metas, frames)."""
    assert sum(sizes) == total
    out, offset = [], 0
    for n in sizes:
        out.append((offset, n, [f"m{i}" for i in range(offset, offset + n)],
                    [f"f{i}" for i in range(offset, offset + n)]))
        offset += n
    return out


def test_whole_request_in_one_part_is_answered_at_once():
    r = Reassembler()
    done = r.add(b"c", 1, 0, 3, 3, ["a", "b", "c"], [1, 2, 3])
    assert done is not None and done.error is None
    assert done.metas == ["a", "b", "c"] and done.frames == [1, 2, 3]
    assert len(r) == 0


def test_whole_request_error_is_answered_at_once():
    r = Reassembler()
    done = r.add(b"c", 1, 0, 2, 2, None, [], error=["model_error", "x", ""])
    assert done is not None and done.error == ["model_error", "x", ""]
    assert done.metas is None and done.frames is None
    assert len(r) == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_out_of_order_parts_are_reassembled_in_order(order):
    r = Reassembler()
    parts = parts_of(7, [3, 2, 2])
    results = []
    for i in order:
        offset, count, metas, frames = parts[i]
        results.append(r.add(b"client", 5, offset, 7, count, metas, frames))
    assert results[:-1] == [None, None]
    done = results[-1]
    assert done is not None and done.error is None
    assert done.metas == [f"m{i}" for i in range(7)]
    assert done.frames == [f"f{i}" for i in range(7)]
    assert len(r) == 0


def test_requests_of_different_clients_and_ids_do_not_mix():
    r = Reassembler()
    a0, a1 = parts_of(2, [1, 1])
    assert r.add(b"abc", 1, a0[0], 2, a0[1], a0[2], ["A0"]) is None
    assert r.add(b"abcdef", 1, a0[0], 2, a0[1], a0[2], ["B0"]) is None
    assert r.add(b"abc", 2, a0[0], 2, a0[1], a0[2], ["C0"]) is None
    assert len(r) == 3
    done = r.add(b"abcdef", 1, a1[0], 2, a1[1], a1[2], ["B1"])
    assert done.frames == ["B0", "B1"]
    done = r.add(b"abc", 1, a1[0], 2, a1[1], a1[2], ["A1"])
    assert done.frames == ["A0", "A1"]
    done = r.add(b"abc", 2, a1[0], 2, a1[1], a1[2], ["C1"])
    assert done.frames == ["C0", "C1"]
    assert len(r) == 0


@pytest.mark.parametrize("error_index", [0, 1, 2])
def test_error_in_one_part_fails_once_and_later_parts_are_dropped(error_index):
    r = Reassembler()
    parts = parts_of(6, [2, 2, 2])
    error = ["model_error", "boom", "tb"]
    answers = []
    for i, (offset, count, metas, frames) in enumerate(parts):
        if i == error_index:
            answers.append(r.add(b"c", 9, offset, 6, count, None, [], error=error))
        else:
            answers.append(r.add(b"c", 9, offset, 6, count, metas, frames))
    decided = [a for a in answers if a is not None]
    assert len(decided) == 1, "the request must be answered exactly once"
    assert decided[0].error == error
    assert answers[error_index] is decided[0], "the error is answered when it arrives"
    assert len(r) == 0, "the entry must be removed once every part came back"


def test_second_error_of_a_failed_request_is_not_answered_again():
    r = Reassembler()
    first = r.add(b"c", 1, 0, 3, 1, None, [], error=["model_error", "one", ""])
    second = r.add(b"c", 1, 1, 3, 1, None, [], error=["model_error", "two", ""])
    third = r.add(b"c", 1, 2, 3, 1, ["m"], ["f"])
    assert first is not None and first.error[1] == "one"
    assert second is None and third is None
    assert len(r) == 0
    # The same (client, id) may be used again afterwards, as a fresh request.
    assert r.add(b"c", 1, 0, 2, 1, ["x"], ["X"]) is None
    assert r.add(b"c", 1, 1, 2, 1, ["y"], ["Y"]).frames == ["X", "Y"]
