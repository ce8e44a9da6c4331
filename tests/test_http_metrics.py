"""``GET /metrics`` of the HTTP bridge against a real server: the page parses with
prometheus-client's parser, every required family is there with its type, and the
numbers move as they should after requests, errors of each kind, a busy worker, an input
that kills its worker (restarts, retry, quarantine) and a ventilator restart. The bridge
runs two processes (-http_workers 2), so the exact deltas of the ``wkr_http_*`` counters
also check that a scrape sums every process's counts. The bearer token guards
``/metrics`` like every route but health."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import Gate, bridge_connections, connect, http_call, http_send, serve, wait_until
from prometheus_client.parser import text_string_to_metric_families
from wkr_serving.server import WKRServer
from workers import ControlledWorker

LIMIT_S = 30
TOKEN = "m3trics"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: -max_queue_size of the test server: a batch larger than this is BadInput.
QUEUE = 8


class Scrape:
    """One parsed /metrics page: ``families[name]`` and ``value(sample, **labels)``."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels`` (0 if
        there is none: a labelled counter appears on its first increment)."""
        return sum(s.value for s in self.samples if s.name == sample
                   and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(server: WKRServer) -> Scrape:
    status, headers, body = http_call(server, "/metrics", headers=AUTH, raw=True)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(body.decode())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WKRServer]:
    """ControlledWorker (obj protocol), 1 worker, batch_size 4, a small queue, a token."""
    yield from serve(tmp_path_factory, "http_metrics", ControlledWorker, "-http_port", "0", "-cpu",
                     "-num_worker", "1", "-batch_size", "4", "-max_queue_size", str(QUEUE),
                     "-http_token", TOKEN, "-http_workers", "2")


def test_metrics_needs_the_token(server):
    status, _, body = http_call(server, "/metrics", raw=True)
    assert status == 401 and json.loads(body)["error_type"] == "unauthorized"
    status, _, _ = http_call(server, "/metrics", headers={"Authorization": "Bearer wrong"},
                             raw=True)
    assert status == 401
    status, _, body = http_call(server, "/metrics", headers=AUTH, raw=True)
    assert status == 200 and b"wkr_up 1.0" in body


REQUIRED = {
    "wkr_up": "gauge", "wkr_ready": "gauge", "wkr_server_info": "gauge",
    "wkr_requests": "counter", "wkr_items": "counter", "wkr_replies": "counter",
    "wkr_errors": "counter", "wkr_refused_requests": "counter",
    "wkr_request_latency_seconds": "histogram", "wkr_request_latency_recent_seconds": "gauge",
    "wkr_batches": "counter", "wkr_batch_size": "histogram",
    "wkr_queue_items": "gauge", "wkr_queue_capacity_items": "gauge",
    "wkr_in_flight_items": "gauge", "wkr_busy_workers": "gauge",
    "wkr_worker_state": "gauge", "wkr_worker_info": "gauge", "wkr_worker_restarts": "counter",
    "wkr_worker_busy_seconds": "counter", "wkr_worker_batches": "counter",
    "wkr_throughput_replies_per_second": "gauge",
    "wkr_http_requests": "counter", "wkr_http_request_duration_seconds": "histogram",
    "wkr_http_jobs": "gauge",
    "wkr_retried_items": "counter", "wkr_poisoned_requests": "counter",
    "wkr_quarantined_inputs": "gauge", "wkr_ventilator_restarts": "counter",
}


def test_required_families_are_there_with_their_types(server):
    # labelled HTTP counters appear on first use
    http_call(server, "/encode", {"data": 1}, AUTH, raw=True)
    page = scrape(server)
    missing = sorted(set(REQUIRED) - set(page.families))
    assert not missing, f"missing families: {missing}"
    wrong = {n: page.families[n].type for n, t in REQUIRED.items() if page.families[n].type != t}
    assert not wrong, f"wrong types: {wrong}"
    assert all(n.startswith("wkr_") for n in page.families)
    assert page.value("wkr_up") == 1 and page.value("wkr_ready") == 1
    assert page.value("wkr_queue_capacity_items") == QUEUE
    assert page.value("wkr_server_info", protocol="obj") == 1
    # one worker, idle, with its pid and device
    assert page.value("wkr_worker_state", worker="0", state="idle") == 1
    assert page.value("wkr_worker_state", worker="0") == 1
    (info,) = [s for s in page.samples if s.name == "wkr_worker_info"]
    assert info.labels["device"] == "cpu" and int(info.labels["pid"]) > 0
    # histograms are consistent: cumulative buckets ending in +Inf == _count
    for name in ("wkr_request_latency_seconds", "wkr_batch_size"):
        buckets = [s.value for s in page.samples if s.name == f"{name}_bucket"]
        assert buckets == sorted(buckets) and buckets[-1] == page.value(f"{name}_count")
        assert [s.labels["le"] for s in page.samples if s.name == f"{name}_bucket"][-1] == "+Inf"


def test_counters_and_histograms_move_after_encode_requests(server):
    before = scrape(server)
    n = 6
    for i in range(n):
        status, _, body = http_call(server, "/encode", {"batch": [i, "x", [i]]}, AUTH, raw=True)
        assert status == 200 and json.loads(body)["data"] == [i, "x", [i]]
    after = scrape(server)

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    # server-wide, from server_status
    assert delta("wkr_requests_total") == n
    assert delta("wkr_items_total") == 3 * n
    assert delta("wkr_replies_total", outcome="ok") == n
    assert delta("wkr_replies_total", outcome="error") == 0
    assert delta("wkr_request_latency_seconds_count") == n
    assert delta("wkr_request_latency_seconds_bucket", le="+Inf") == n
    assert delta("wkr_request_latency_seconds_sum") > 0
    batches = delta("wkr_batches_total")
    assert batches >= n  # one request at a time: none were batched together
    assert delta("wkr_batch_size_count") == batches
    assert delta("wkr_batch_size_sum") == 3 * n
    assert delta("wkr_batch_size_bucket", le="4.0") == batches  # 3 items fit in 4
    assert delta("wkr_worker_batches_total", worker="0") == batches
    assert delta("wkr_worker_busy_seconds_total", worker="0") > 0
    p50 = after.value("wkr_request_latency_recent_seconds", quantile="0.5")
    assert 0 < p50 <= after.value("wkr_request_latency_recent_seconds", quantile="0.99") < 30
    # bridge-level, summed over the bridge's processes (each call is a new connection)
    assert delta("wkr_http_requests_total", route="/encode", method="POST", status="200") == n
    assert delta("wkr_http_request_duration_seconds_count", route="/encode") == n
    assert delta("wkr_http_request_duration_seconds_bucket", route="/encode", le="+Inf") == n
    assert delta("wkr_http_request_duration_seconds_sum", route="/encode") > 0
    # the first scrape was counted once it was answered
    assert delta("wkr_http_requests_total", route="/metrics", status="200") >= 1


def test_http_counts_are_summed_over_the_bridge_processes(server):
    """Requests answered by each of the two processes; a scrape through either one
    reports them all."""
    first, second = bridge_connections(server, AUTH)
    try:
        def page(conn: http.client.HTTPConnection) -> Scrape:
            status, body = http_send(conn, "GET", "/metrics", headers=AUTH)
            assert status == 200
            return Scrape(body.decode())

        def encodes(p: Scrape) -> float:
            return p.value("wkr_http_requests_total", route="/encode", status="200")

        before = page(first)
        for conn, count in ((first, 3), (second, 4)):
            for i in range(count):
                status, body = http_send(conn, "POST", "/encode", {"data": i}, AUTH)
                assert status == 200 and json.loads(body)["data"] == i
        assert encodes(page(first)) - encodes(before) == 7
        assert encodes(page(second)) - encodes(before) == 7
    finally:
        first.close()
        second.close()


def test_errors_by_kind_move_after_bad_input_and_model_error(server):
    before = scrape(server)
    status, _, body = http_call(server, "/encode", {"batch": list(range(QUEUE + 1))}, AUTH,
                                raw=True)
    assert status == 400 and json.loads(body)["error_type"] == "bad_input"
    status, _, body = http_call(server, "/encode",
                                {"data": {"cmd": "raise", "message": "boom"}}, AUTH, raw=True)
    assert status == 500 and json.loads(body)["error_type"] == "model_error"
    # refused by the bridge
    status, _, _ = http_call(server, "/encode", {"nothing": 1}, AUTH, raw=True)
    assert status == 400
    status, _, _ = http_call(server, "/no/such/route", headers=AUTH, raw=True)
    assert status == 404
    after = scrape(server)

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    assert delta("wkr_errors_total", kind="bad_input") == 1
    assert delta("wkr_errors_total", kind="model_error") == 1
    assert delta("wkr_errors_total") == 2
    assert delta("wkr_replies_total", outcome="error") == 2
    assert delta("wkr_replies_total", outcome="ok") == 0
    assert delta("wkr_refused_requests_total", reason="invalid") == 1  # the oversize one
    assert delta("wkr_refused_requests_total", reason="overloaded") == 0
    assert delta("wkr_http_requests_total", route="/encode", status="400") == 2
    assert delta("wkr_http_requests_total", route="/encode", status="500") == 1
    assert delta("wkr_http_errors_total", route="/encode", type="bad_input") == 2
    assert delta("wkr_http_errors_total", route="/encode", type="model_error") == 1
    assert delta("wkr_http_requests_total", route="<unmatched>", status="404") == 1
    assert delta("wkr_http_errors_total", route="<unmatched>", type="not_found") == 1


def test_queue_depth_in_flight_and_busy_worker_gauges(server, tmp_path):
    gate = Gate(tmp_path, "metrics-busy")
    with ThreadPoolExecutor(2) as pool:
        try:
            blocked = pool.submit(http_call, server, "/encode", {"data": gate.item("held")}, AUTH,
                                  raw=True)
            gate.wait_started()
            queued = pool.submit(http_call, server, "/encode", {"batch": [1, 2, 3]}, AUTH,
                                 raw=True)
            page = wait_until(lambda: (lambda p: p if p.value("wkr_queue_items") == 3 else None)(
                scrape(server)), LIMIT_S, "the second request to be queued")
            assert page.value("wkr_in_flight_items") == 1
            assert page.value("wkr_busy_workers") == 1
            assert page.value("wkr_worker_state", worker="0", state="busy") == 1
            assert page.value("wkr_worker_state", worker="0", state="idle") == 0
        finally:
            gate.open()
        assert blocked.result(LIMIT_S)[0] == 200 and queued.result(LIMIT_S)[0] == 200
    page = wait_until(lambda: (lambda p: p if p.value("wkr_in_flight_items") == 0 else None)(
        scrape(server)), LIMIT_S, "the server to be idle")
    assert page.value("wkr_queue_items") == 0
    assert page.value("wkr_worker_state", worker="0", state="idle") == 1


def scrape_until(server: WKRServer, ok: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrape until ``ok(page)`` holds (bounded); return that page."""
    return wait_until(lambda: (lambda p: p if ok(p) else None)(scrape(server)), 60, what)


def test_an_input_that_kills_its_worker_is_counted(server):
    """Second to last in this file: the worker dies on an input and comes back; the input,
    retried alone, kills the replacement too, and is quarantined (PoisonInput, 422)."""
    before = scrape(server)

    def delta(page: Scrape, sample: str, **labels: str) -> float:
        return page.value(sample, **labels) - before.value(sample, **labels)

    status, _, body = http_call(server, "/encode", {"data": {"cmd": "die"}}, AUTH, raw=True)
    assert status == 422 and json.loads(body)["error_type"] == "poison_input"
    after = scrape_until(server, lambda p: p.value("wkr_ready") == 1 and p.value(
        "wkr_worker_state", worker="0", state="idle") == 1, "the worker to be back")
    assert delta(after, "wkr_worker_restarts_total", worker="0") == 2
    assert delta(after, "wkr_errors_total", kind="poison_input") == 1
    assert delta(after, "wkr_retried_items_total") == 1
    assert delta(after, "wkr_poisoned_requests_total") == 1
    assert delta(after, "wkr_quarantined_inputs") == 1
    assert delta(after, "wkr_ventilator_restarts_total") == 0
    (info,) = [s for s in after.samples if s.name == "wkr_worker_info"]
    (old,) = [s for s in before.samples if s.name == "wkr_worker_info"]
    assert info.labels["pid"] != old.labels["pid"]
    # counters keyed by the worker's index survive its restart
    assert after.value("wkr_worker_batches_total", worker="0") >= before.value(
        "wkr_worker_batches_total", worker="0")
    # the same input again is refused on arrival: no worker dies of it
    status, _, body = http_call(server, "/encode", {"data": {"cmd": "die"}}, AUTH, raw=True)
    assert status == 422 and json.loads(body)["error_type"] == "poison_input"
    status, _, body = http_call(server, "/encode", {"data": "alive"}, AUTH, raw=True)
    assert status == 200 and json.loads(body)["data"] == "alive"
    last = scrape(server)
    assert delta(last, "wkr_poisoned_requests_total") == 2
    assert delta(last, "wkr_worker_restarts_total", worker="0") == 2
    assert delta(last, "wkr_retried_items_total") == 1
    assert delta(last, "wkr_quarantined_inputs") == 1


def test_a_ventilator_restart_is_counted(server):
    """Last in this file: kill -9 of the ventilator, which the supervisor restarts on the
    same ports; its counters restart from zero, its restarts are counted."""
    with connect(server) as client:
        pid = client.server_status["ventilator_pid"]
    before = scrape(server)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    after = scrape_until(server, lambda p: p.value("wkr_up") == 1 and p.value(
        "wkr_ventilator_restarts_total") == before.value("wkr_ventilator_restarts_total") + 1
        and p.value("wkr_ready") == 1, "the ventilator to be back")
    assert after.value("wkr_quarantined_inputs") == 0  # the new one quarantines nothing yet
    status, _, body = http_call(server, "/encode", {"data": "alive"}, AUTH, raw=True)
    assert status == 200 and json.loads(body)["data"] == "alive"
