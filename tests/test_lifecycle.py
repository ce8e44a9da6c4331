"""Starting and stopping servers from Python: readiness, clean exit, startup failures."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from helpers import STOP_LIMIT_S, connect, gone, server_args, wait_until
from wkr_serving.server import ServerConfig, StartupError, WKRServer
from workers import EchoWorker, FailingLoadWorker


def test_context_manager_ready_on_enter_and_clean_exit(tmp_path):
    args = server_args(tmp_path, "-num_worker", "2")
    with WKRServer(args, EchoWorker) as server:
        assert server.is_ready.is_set()
        assert isinstance(server.port, int) and server.port > 0
        assert isinstance(server.port_out, int) and server.port_out > 0
        with connect(server) as client:
            status = client.server_status
            assert client.encode("hi") == "hi"
        assert status["ready"] is True
        workers = status["workers"]
        assert [w["index"] for w in workers] == [0, 1]
        for w in workers:
            assert isinstance(w["pid"], int) and w["pid"] > 0
            # no GPU on this machine: the automatic device choice is the CPU
            assert w["device"] == "cpu"
        pids = [w["pid"] for w in workers] + [status["ventilator_pid"]]
        assert len(set(pids)) == 3
        assert not any(gone(p) for p in pids)
    assert not server.is_alive()
    assert server.exit_code == 0
    wait_until(lambda: all(gone(p) for p in pids), STOP_LIMIT_S, "server processes to exit")


def test_seed_style_start_join_with_server_config(tmp_path):
    config = ServerConfig(port=0, port_out=0, bind="127.0.0.1", model_dir=str(tmp_path),
                          cpu=True, protocol="numpy")
    server = WKRServer(config, EchoWorker)
    server.start()
    try:
        server.wait_ready(60)
        with connect(server) as client:
            status = client.server_status
        assert status["protocol"] == "numpy"
        assert [w["device"] for w in status["workers"]] == ["cpu"]
    finally:
        server.close(STOP_LIMIT_S)
    assert not server.is_alive() and server.exit_code == 0


def test_model_that_fails_to_load_raises_startup_error(tmp_path):
    args = server_args(tmp_path, "-num_worker", "1")
    server = WKRServer(args, FailingLoadWorker)
    with pytest.raises(StartupError, match="boom-load"), server:
        pytest.fail("the server must not become ready")
    server.close(STOP_LIMIT_S)
    assert not server.is_alive()
    assert server.exit_code not in (None, 0)


def test_missing_gpu_is_a_startup_error(tmp_path):
    args = server_args(tmp_path, "-device_map", "0")
    server = WKRServer(args, EchoWorker)
    with pytest.raises(StartupError, match="GPU") as info, server:
        pytest.fail("the server must not start on a GPU that does not exist")
    assert "0" in str(info.value)
    server.close(STOP_LIMIT_S)
    assert not server.is_alive()


def test_worker_class_must_subclass_wkrhardworker(tmp_path):
    with pytest.raises(TypeError):
        WKRServer(server_args(tmp_path), object)


def settled_fds(proc: Any, limit: float = 10.0) -> int:
    """The process's open file descriptors once the count holds still: garbage collected,
    then the same in five looks 50 ms apart (bounded by ``limit`` seconds). A client of an
    earlier test, unreferenced, closes its sockets from its own thread when it notices."""
    gc.collect()
    seen: list[int] = []

    def steady() -> bool:
        seen.append(proc.num_fds())
        return len(seen) >= 5 and len(set(seen[-5:])) == 1

    wait_until(steady, limit, "the file descriptor count to settle", interval=0.05)
    return seen[-1]


def test_a_server_closed_without_starting_releases_its_file_descriptors(tmp_path):
    import psutil
    from wkr_serving.server import WKRHardWorker, WKRServer

    me = psutil.Process()
    before = settled_fds(me)  # earlier tests' clients may still be closing theirs
    for _ in range(5):
        WKRServer(server_args(tmp_path), WKRHardWorker).close()
    assert settled_fds(me) == before
