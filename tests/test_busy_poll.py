"""-busy_poll_us: the sink spins before it blocks, and only while messages flow: an idle
server burns no CPU. The ventilator never spins."""

from __future__ import annotations

import threading

import numpy as np
import psutil
import pytest
from helpers import connect, running_server, server_args
from wkr_serving.server import ServerConfig
from wkr_serving.server.config import ConfigError
from workers import EchoWorker

#: Idle window (s) over which the spinning roles' CPU is measured.
IDLE_S = 1.0


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


@pytest.mark.parametrize("value", [-1, 1_000_001])
def test_busy_poll_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match="-busy_poll_us"):
        ServerConfig(busy_poll_us=value)


def test_spinning_server_answers_and_burns_nothing_once_idle(tmp_path):
    """With a 20 ms spin, requests are answered as usual; after the last one the sink
    spins at most 20 ms, then sleeps: over the next second the roles use a few percent
    of a core at most (a spinning role would use all of it)."""
    args = server_args(str(tmp_path), "-protocol", "numpy", "-busy_poll_us", "20000",
                       "-cpu")
    with running_server(args, EchoWorker) as server, connect(server) as client:
        for i in range(200):
            x = np.full(4, i, dtype=np.float32)
            assert np.array_equal(client.encode(x), x)
        status = client.server_status
        assert status["config"]["busy_poll_us"] == 20000
        pids = [status["ventilator_pid"], status["sink_pid"]]
        before = _cpu_seconds(pids)
        threading.Event().wait(IDLE_S)  # the measured idle window itself, not a sync
        used = _cpu_seconds(pids) - before
        assert used < 0.15 * IDLE_S, f"roles used {used:.3f} s of CPU in {IDLE_S} s idle"


def test_the_sink_spins_after_a_message_and_the_ventilator_does_not(tmp_path):
    """With a 300 ms spin, the sink keeps running after a request (the spin is what makes
    it pass the next result on without being woken): over the 200 ms after it, it uses
    a good share of a core, where the ventilator, which sleeps, uses almost none."""
    args = server_args(str(tmp_path), "-protocol", "numpy", "-busy_poll_us", "300000",
                       "-cpu")
    with running_server(args, EchoWorker) as server, connect(server) as client:
        status = client.server_status
        sink, ventilator = [status["sink_pid"]], [status["ventilator_pid"]]
        x = np.zeros(4, dtype=np.float32)
        sink_before, ventilator_before = _cpu_seconds(sink), _cpu_seconds(ventilator)
        assert np.array_equal(client.encode(x), x)
        threading.Event().wait(0.2)  # the measured window itself, not a sync
        sink_used = _cpu_seconds(sink) - sink_before
        ventilator_used = _cpu_seconds(ventilator) - ventilator_before
        assert sink_used > 0.1, f"the sink used only {sink_used:.3f} s of CPU in 0.2 s"
        assert ventilator_used < 0.05, (f"the ventilator used {ventilator_used:.3f} s of "
                                        "CPU in 0.2 s: it spins")
