"""The wkr-serving-start command, run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
from helpers import REPO_DIR, TESTS_DIR, free_port, gone, wait_until
from wkr_serving.client import ConnectTimeout, WKRClient

START_LIMIT_S = 60
EXIT_LIMIT_S = 30


def cli_command() -> list[str]:
    exe = shutil.which("wkr-serving-start")
    assert exe, "the wkr-serving-start entry point is not installed"
    return [exe]


class CLIServer:
    """A wkr-serving-start process whose output goes to files (never an unread pipe)."""

    def __init__(self, args: list[str], cwd: str, tmp_path, env=None):
        self.port, self.port_out = free_port(), free_port()
        while self.port_out == self.port:  # bounded in practice: ports are rarely reused
            self.port_out = free_port()
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 (closed in close())
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        full = [*cli_command(), *args, "-port", str(self.port), "-port_out", str(self.port_out),
                "-bind", "127.0.0.1", "-model_dir", str(tmp_path)]
        self.proc = subprocess.Popen(full, cwd=cwd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self, limit: float = EXIT_LIMIT_S) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"wkr-serving-start did not exit within {limit}s:\n"
                                 f"{self.stderr()[-4000:]}") from None

    def client(self, **kwargs) -> WKRClient:
        """Connect once the server answers and all its workers are ready."""
        kwargs.setdefault("timeout", 10_000)
        holder: list[WKRClient] = []

        def attempt():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.stderr()[-4000:]}")
            if not holder:
                try:
                    holder.append(WKRClient("127.0.0.1", self.port, self.port_out,
                                            connect_timeout=500, **kwargs))
                except ConnectTimeout:
                    return False
            return holder[0].server_status["ready"]

        try:
            wait_until(attempt, START_LIMIT_S, "wkr-serving-start to be ready", 0.05)
        except BaseException:
            for c in holder:
                c.close()
            raise
        return holder[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(EXIT_LIMIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture
def cli(tmp_path):
    started: list[CLIServer] = []

    def start(args, cwd=TESTS_DIR, env=None):
        server = CLIServer(args, cwd, tmp_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def check_sigterm_stops_everything(server: CLIServer) -> None:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the roles run as child processes"
    server.proc.send_signal(signal.SIGTERM)
    code = server.wait_exit()
    assert code == 0, server.stderr()[-4000:]
    wait_until(lambda: all(gone(c.pid) for c in children), EXIT_LIMIT_S,
               "the server's child processes to exit")


def test_cli_serves_a_worker_from_the_current_directory_and_stops_on_sigterm(cli):
    server = cli(["workers.EchoWorker", "-num_worker", "2", "-batch_size", "3"])
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


def test_cli_dir_file_class_form_from_repo_root(cli):
    server = cli(["example/noop_worker.Worker", "-protocol", "numpy", "-cpu"], cwd=REPO_DIR)
    with server.client(protocol="numpy") as client:
        x = np.linspace(0, 1, 7, dtype=np.float32)
        got = client.encode(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)
        assert client.server_status["protocol"] == "numpy"
    check_sigterm_stops_everything(server)


def test_cli_sigint_also_stops_cleanly(cli):
    server = cli(["workers.EchoWorker"])
    with server.client() as client:
        assert client.encode(1) == 1
    server.proc.send_signal(signal.SIGINT)
    assert server.wait_exit() == 0


def test_cli_model_load_failure_exits_non_zero(cli):
    server = cli(["workers.FailingLoadWorker"])
    code = server.wait_exit()
    assert code != 0
    assert "boom-load" in server.stderr()


def test_cli_missing_gpu_exits_non_zero(cli):
    server = cli(["workers.EchoWorker", "-device_map", "0"])
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
def test_cli_usage_errors_exit_non_zero(cli, args, needle):
    server = cli(args)
    assert server.wait_exit() != 0
    assert needle in server.stderr()


def test_cli_version():
    out = subprocess.run([*cli_command(), "-version"], capture_output=True, text=True,
                         timeout=EXIT_LIMIT_S, cwd=TESTS_DIR)
    from wkr_serving.client import __version__

    assert out.returncode == 0
    assert __version__ in out.stdout + out.stderr


def test_cli_env_and_yaml_config(cli, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("num_worker: 2\nbatch_size: 5\nprotocol: numpy\n")
    server = cli(["workers.EchoWorker", "-config", str(config), "-batch_size", "6"],
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
