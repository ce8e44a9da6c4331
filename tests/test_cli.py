"""The wkr-serving-start command, run as a real subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
from helpers import REPO_DIR, TESTS_DIR, CLIServer, gone, start_command, wait_until

EXIT_LIMIT_S = 30


def check_sigterm_stops_everything(server: CLIServer) -> None:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the roles run as child processes"
    server.proc.send_signal(signal.SIGTERM)
    code = server.wait_exit()
    assert code == 0, server.stderr()[-4000:]
    wait_until(lambda: all(gone(c.pid) for c in children), EXIT_LIMIT_S,
               "the server's child processes to exit")


def test_cli_serves_a_worker_from_the_current_directory_and_stops_on_sigterm(cli_server):
    server = cli_server(["workers.EchoWorker", "-num_worker", "2", "-batch_size", "3"])
    with server.client() as client:
        status = client.server_status
        assert status["ready"] is True
        assert status["config"]["num_worker"] == 2 and status["config"]["batch_size"] == 3
        assert [w["device"] for w in status["workers"]] == ["cpu", "cpu"]
        worker_pids = {w["pid"] for w in status["workers"]} | {status["ventilator_pid"]}
        children = {c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)}
        assert worker_pids <= children
        assert client.encode({"via": "cli"}) == {"via": "cli"}
        assert client.encode_batch(list(range(10))) == list(range(10))
    check_sigterm_stops_everything(server)
    assert "worker_class" in server.stderr()  # the options are printed at start


def test_cli_dir_file_class_form_from_repo_root(cli_server):
    server = cli_server(["example/noop_worker.Worker", "-protocol", "numpy", "-cpu"], cwd=REPO_DIR)
    with server.client(protocol="numpy") as client:
        x = np.linspace(0, 1, 7, dtype=np.float32)
        got = client.encode(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)
        assert client.server_status["protocol"] == "numpy"
    check_sigterm_stops_everything(server)


def test_cli_sigint_also_stops_cleanly(cli_server):
    server = cli_server(["workers.EchoWorker"])
    with server.client() as client:
        assert client.encode(1) == 1
    server.proc.send_signal(signal.SIGINT)
    assert server.wait_exit() == 0


def test_cli_model_load_failure_exits_non_zero(cli_server):
    server = cli_server(["workers.FailingLoadWorker"])
    code = server.wait_exit()
    assert code != 0
    assert "boom-load" in server.stderr()


def test_cli_missing_gpu_exits_non_zero(cli_server):
    server = cli_server(["workers.EchoWorker", "-device_map", "0"])
    code = server.wait_exit()
    assert code != 0
    err = server.stderr()
    assert "GPU" in err and "device_map" in err


@pytest.mark.parametrize("args,needle", [
    (["workers.NoSuchWorker"], "NoSuchWorker"),
    (["no_such_module.Worker"], "no_such_module"),
    (["workers.EchoWorker", "-batch_size", "0"], "batch_size"),
    (["workers.EchoWorker", "-protocol", "pickle"], "protocol"),
])
def test_cli_usage_errors_exit_non_zero(cli_server, args, needle):
    server = cli_server(args)
    assert server.wait_exit() != 0
    assert needle in server.stderr()


def test_cli_version():
    out = subprocess.run([*start_command(), "-version"], capture_output=True, text=True,
                         timeout=EXIT_LIMIT_S, cwd=TESTS_DIR)
    from wkr_serving.client import __version__

    assert out.returncode == 0
    assert __version__ in out.stdout + out.stderr


def test_cli_env_and_yaml_config(cli_server, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("num_worker: 2\nbatch_size: 5\nprotocol: numpy\n")
    server = cli_server(["workers.EchoWorker", "-config", str(config), "-batch_size", "6"],
                        env={"WKR_BATCH_SIZE": "7", "WKR_NUM_WORKER": "1"})
    with server.client(protocol="numpy") as client:
        cfg = client.server_status["config"]
        assert cfg["protocol"] == "numpy"  # from the YAML file
        assert cfg["num_worker"] == 1  # env beats YAML
        assert cfg["batch_size"] == 6  # command line beats env
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_python_m_entry_point_matches(tmp_path):
    """``python -m wkr_serving.server.cli`` is the same program (usage error path)."""
    out = subprocess.run([sys.executable, "-m", "wkr_serving.server.cli"], capture_output=True,
                         text=True, timeout=EXIT_LIMIT_S, cwd=str(tmp_path))
    assert out.returncode != 0
    assert "worker" in out.stderr
