"""Faults: malformed requests and crashing workers. Each test gets a fresh server, so a
crash here can never disturb the servers other tests share."""

from __future__ import annotations

import pytest
from helpers import RawClient, connect, running_server, server_args, wait_idle, wait_until
from wkr_serving.client import BadInput, PoisonInput, WKRTimeoutError
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import error_from_wire
from workers import ControlledWorker


@pytest.fixture
def fresh_server(tmp_path):
    args = server_args(tmp_path, "-num_worker", "2", "-batch_size", "4", "-cpu",
                       "-graceful_timeout", "3")
    with running_server(args, ControlledWorker) as server:
        yield server


@pytest.mark.parametrize("meta", [[["<i4"], [1]], [{"dtype": "<i4"}, [1]], [7, [1]],
                                  ["<i4", [[1]]]], ids=["list", "map", "int", "nested"])
def test_malformed_item_meta_is_bad_input_and_no_process_dies(fresh_server, meta):
    """A client chooses item metas: garbage where the dtype or shape belongs must be
    answered with BadInput, without crashing the worker that decodes it."""
    raw = RawClient(fresh_server, b"raw-fault-client")
    try:
        with connect(fresh_server) as client:
            before = wait_idle(client)
            pids = sorted(w["pid"] for w in before["workers"])
            raw.send([P.pack([P.PROTOCOL_VERSION, P.REQUEST, 21, 5000, [meta]]),
                      b"\x00" * 4])
            header = raw.recv()
            assert header[1] == P.ERROR and header[2] == 21
            assert isinstance(error_from_wire(header[3]), BadInput), header[3]
            assert client.encode_batch(list(range(8))) == list(range(8))
            after = client.server_status
            assert sorted(w["pid"] for w in after["workers"]) == pids, "a worker restarted"
            assert after["ventilator_pid"] == before["ventilator_pid"]
    finally:
        raw.close()


def test_crashing_inputs_get_one_reply_each_and_workers_are_replaced(fresh_server):
    """Every accepted request gets exactly one reply, also one whose input kills its
    worker: five such inputs in quick succession each kill the worker that takes them and
    the one their lone retry goes to, and each gets PoisonInput at once (never a
    timeout); every death starts a new worker process, and serving goes on between and
    after."""
    with connect(fresh_server, timeout=10_000) as client:
        seen_pids = {w["pid"] for w in wait_idle(client)["workers"]}
        for i in range(5):
            try:
                client.encode({"cmd": "die", "n": i}, timeout=5000)
            except PoisonInput as exc:
                assert "quarantined" in str(exc)
            except WKRTimeoutError:
                status = client.server_status
                pytest.fail(f"crash #{i + 1}: the request of a dead worker got no reply; "
                            f"workers: {[(w['pid'], w['state']) for w in status['workers']]}")
            else:
                pytest.fail("a request that kills its worker cannot succeed")
            assert client.encode(f"after-{i}") == f"after-{i}"

            def replaced():
                status = client.server_status
                rows = status["workers"]
                return (status["ready"] and len(rows) == 2
                        and all(w["pid"] is not None for w in rows) and status)

            status = wait_until(replaced, 20, "the dead workers to be replaced")
            seen_pids |= {w["pid"] for w in status["workers"]}
        assert len(seen_pids) == 2 + 2 * 5, "every crash must start a new worker process"
        assert client.encode_batch(list(range(10))) == list(range(10))
        final = wait_idle(client)
        assert final["num_errors"].get("poison_input") == 5
        assert not final["num_errors"].get("worker_died"), final["num_errors"]
        assert final["quarantined_inputs"] == 5 and final["num_retried_items"] == 5
