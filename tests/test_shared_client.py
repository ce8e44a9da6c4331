"""One WKRClient shared by many threads: combined sends, targeted wake-ups, handoffs.

A thread that waits while another reads the reply socket is parked on a lock of its
own; the reading thread wakes exactly the threads whose replies it read, and hands the
reading over when its own reply is in. Requests queued while one thread is sending
leave with that thread's send.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import CALL_TIMEOUT_MS, Gate, connect, wait_until
from wkr_serving.client import ClientUsageError, WKRTimeoutError

THREAD_LIMIT_S = 60


def test_requests_queued_while_a_thread_sends_leave_in_its_send(obj_server):
    """While one thread holds the send lock, sixteen threads' requests wait in the queue
    (none of them sends); one flush by the holder sends them all, and each thread gets
    its own result."""
    n = 16
    with connect(obj_server) as client:
        assert client.encode("warm") == "warm"
        client._send_lock.acquire()
        try:
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = [pool.submit(client.encode, f"queued-{i}") for i in range(n)]
                wait_until(lambda: len(client._outbox) == n, 20, "16 queued requests")
                assert client.status["num_pending_request"] == n
                client._send_lock.release()
                client._flush()  # what the sending thread does once it lets go of the lock
                assert not client._outbox
                results = [f.result(timeout=THREAD_LIMIT_S) for f in futures]
        finally:
            if client._send_lock.locked():
                client._send_lock.release()
        assert results == [f"queued-{i}" for i in range(n)]
        assert client.status["num_pending_request"] == 0


def test_a_waiting_thread_gets_its_reply_while_the_reader_waits_on(obj_server, tmp_path):
    """Thread A reads the reply socket for a request a worker holds; thread B's request
    is answered by the other worker meanwhile: A wakes B with it and reads on."""
    gate = Gate(tmp_path, "slow")
    with connect(obj_server) as client:
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                slow = pool.submit(client.encode, gate.item("slow"))
                gate.wait_started()
                started = time.monotonic()
                for i in range(20):  # each waits while A (or the reader) reads
                    assert client.encode(f"fast-{i}") == f"fast-{i}"
                assert time.monotonic() - started < 20
                assert not slow.done()
                gate.open()
                assert slow.result(timeout=THREAD_LIMIT_S)["value"] == "slow"
        finally:
            gate.open()


def test_reading_passes_to_a_waiting_thread_when_the_readers_reply_is_in(obj_server,
                                                                          tmp_path):
    """The reading thread's own reply comes first: another waiting thread reads next, so
    a reply that arrives later still reaches its thread."""
    gate = Gate(tmp_path, "late")
    with connect(obj_server) as client:
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                late = pool.submit(client.encode, gate.item("late"))
                gate.wait_started()
                for i in range(10):  # this thread reads and leaves, again and again
                    assert client.encode(i) == i
                gate.open()
                assert late.result(timeout=THREAD_LIMIT_S)["value"] == "late"
        finally:
            gate.open()


def test_a_parked_thread_times_out_on_its_own_deadline(obj_server, tmp_path):
    """A waiting thread with a short timeout fails at its own deadline, not the reading
    thread's; the reader still gets its reply."""
    reader_gate = Gate(tmp_path, "reader")
    short_gate = Gate(tmp_path, "short", release=reader_gate.release)
    with connect(obj_server) as client:
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                reader = pool.submit(client.encode, reader_gate.item("reader"))
                reader_gate.wait_started()
                wait_until(lambda: client._reading, 20, "a thread reading replies")
                started = time.monotonic()
                with pytest.raises(WKRTimeoutError):
                    client.encode(short_gate.item("short"), timeout=500)
                assert time.monotonic() - started < 10
                assert not reader.done()
                reader_gate.open()
                assert reader.result(timeout=THREAD_LIMIT_S)["value"] == "reader"
        finally:
            reader_gate.open()


def test_close_wakes_every_waiting_thread(obj_server, tmp_path):
    """Threads waiting (reading or parked) on a client that is closed fail at once with
    ClientUsageError instead of waiting out their timeouts."""
    gate = Gate(tmp_path, "held")
    client = connect(obj_server, timeout=CALL_TIMEOUT_MS)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            client.encode(gate.item(i) if i == 0 else {"cmd": "block", "started":
                                                       f"{gate.started}-{i}",
                                                       "release": gate.release, "value": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(4)]
    try:
        for t in threads:
            t.start()
        gate.wait_started()
        wait_until(lambda: len(client._parked) >= 1, 20, "threads parked")
        started = time.monotonic()
        client.close()
        for t in threads:
            t.join(THREAD_LIMIT_S)
        assert time.monotonic() - started < 10
        assert not any(t.is_alive() for t in threads)
        assert len(errors) == 4
        assert all(isinstance(e, ClientUsageError) for e in errors), errors
    finally:
        gate.open()
        client.close()
