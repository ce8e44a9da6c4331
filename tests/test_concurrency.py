"""Many clients, shared clients and identities: every caller gets exactly its own results."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import CALL_TIMEOUT_MS, connect, wait_idle
from wkr_serving.client import ConcurrentWKRClient, WKRClient

THREAD_LIMIT_S = 90


def run_threads(n: int, target, *args) -> list:
    """Run ``target(i, *args)`` in ``n`` threads started together; return their results
    (re-raising the first failure)."""
    barrier = threading.Barrier(n)

    def body(i):
        barrier.wait(timeout=30)
        return target(i, *args)

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(body, i) for i in range(n)]
        return [f.result(timeout=THREAD_LIMIT_S) for f in futures]


def test_64_concurrent_clients_get_their_own_results_in_order(obj_server):
    n_clients, n_requests = 64, 30
    clients = [connect(obj_server, identity=f"client-{i:02d}".encode())
               for i in range(n_clients)]
    try:
        def work(i):
            client = clients[i]
            return [client.encode({"client": i, "seq": j, "id": client.identity.decode()})
                    for j in range(n_requests)]

        results = run_threads(n_clients, work)
    finally:
        for c in clients:
            c.close()
    for i, got in enumerate(results):
        assert got == [{"client": i, "seq": j, "id": f"client-{i:02d}"}
                       for j in range(n_requests)]


def test_prefix_identities_never_see_each_others_results(obj_server):
    identities = [b"abc", b"abcdef", b"ab", b"a", b"abcd"]
    clients = [connect(obj_server, identity=ident) for ident in identities]
    try:
        def work(i):
            client = clients[i]
            # pipelined, so many replies of every identity are in flight at once
            for j in range(200):
                client.encode({"who": identities[i], "seq": j}, blocking=False)
            return client.fetch_all()

        results = run_threads(len(clients), work)
    finally:
        for c in clients:
            c.close()
    for ident, got in zip(identities, results, strict=True):
        assert got == [{"who": ident, "seq": j} for j in range(200)]


def test_mean_batch_size_above_one_under_concurrent_load(obj_server):
    with connect(obj_server) as probe:
        wait_idle(probe)
        before = probe.server_status["batch_size"]["counts"]
    n_clients, n_requests = 8, 100
    clients = [connect(obj_server) for _ in range(n_clients)]
    try:
        def work(i):
            for j in range(n_requests):
                clients[i].encode((i, j), blocking=False)
            return clients[i].fetch_all()

        results = run_threads(n_clients, work)
        status = clients[0].server_status
    finally:
        for c in clients:
            c.close()
    for i, got in enumerate(results):
        assert got == [[i, j] for j in range(n_requests)]
    after = status["batch_size"]["counts"]
    delta = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    items = sum(size * count for size, count in delta.items())
    batches = sum(delta.values())
    assert items == n_clients * n_requests, f"histogram delta {delta} does not add up"
    assert max(delta) <= status["config"]["batch_size"]
    assert items / batches > 1.0, f"no batching under load: {delta}"
    assert status["batch_size"]["mean"] > 1.0


def test_shared_client_is_thread_safe(obj_server):
    n_threads, n_requests = 8, 50
    with connect(obj_server) as client:
        def work(i):
            return [client.encode(f"t{i}-r{j}") for j in range(n_requests)]

        results = run_threads(n_threads, work)
        assert client.status["num_pending_request"] == 0
        assert client.status["num_request"] >= n_threads * n_requests
    for i, got in enumerate(results):
        assert got == [f"t{i}-r{j}" for j in range(n_requests)]


def test_shared_client_threads_mixing_batches_and_pipelines(obj_server):
    with connect(obj_server) as client:
        def work(i):
            out = []
            for j in range(10):
                out.append(client.encode_batch([[i, j, k] for k in range(j % 6 + 1)]))
                out.append(client.encode({"single": [i, j]}))
            return out

        results = run_threads(6, work)
    for i, got in enumerate(results):
        want = []
        for j in range(10):
            want.append([[i, j, k] for k in range(j % 6 + 1)])
            want.append({"single": [i, j]})
        assert got == want


def test_concurrent_client_pool_from_threads(obj_server):
    with ConcurrentWKRClient(max_concurrency=4, ip="127.0.0.1", port=obj_server.port,
                             port_out=obj_server.port_out, protocol="obj",
                             timeout=CALL_TIMEOUT_MS) as pool:
        def work(i):
            return ([pool.encode({"t": i, "r": j}) for j in range(20)],
                    pool.encode_batch([i, i + 1, i + 2, i + 3, i + 4]))

        results = run_threads(10, work)
        status = pool.server_status
        assert status["ready"] is True
        assert len(pool.status) == 4
        identities = {s["identity"] for s in pool.status}
        assert len(identities) == 4
    for i, (singles, batch) in enumerate(results):
        assert singles == [{"t": i, "r": j} for j in range(20)]
        assert batch == [i, i + 1, i + 2, i + 3, i + 4]


def test_concurrent_client_refuses_non_blocking(obj_server):
    from wkr_serving.client import ClientUsageError

    with ConcurrentWKRClient(max_concurrency=1, ip="127.0.0.1", port=obj_server.port,
                             port_out=obj_server.port_out, timeout=CALL_TIMEOUT_MS) as pool:
        with pytest.raises(ClientUsageError):
            pool.encode(1, blocking=False)
        assert pool.encode(2) == 2


def test_two_clients_one_thread_interleaved(obj_server):
    with connect(obj_server) as a, connect(obj_server) as b:
        ids_a = [a.encode(("a", i), blocking=False) for i in range(30)]
        ids_b = [b.encode(("b", i), blocking=False) for i in range(30)]
        assert len(ids_a) == len(ids_b) == 30
        assert b.fetch_all() == [["b", i] for i in range(30)]
        assert a.fetch_all() == [["a", i] for i in range(30)]
        assert isinstance(a, WKRClient) and a.identity != b.identity
