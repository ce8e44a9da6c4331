"""The seed's Getting Started page, verbatim: ``-protocol npy`` (its name of numpy),
and a model that fails to load under ``-log_dir`` says so on the console.

Servers are real ``wkr-serving-start`` subprocesses on free loopback ports.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_DIR, TESTS_DIR
from wkr_serving.client import AsyncWKRClient, WKRClient
from wkr_serving.client.errors import ClientUsageError, ConnectionLost, ShuttingDown
from wkr_serving.client.protocol import PROTOCOLS, normalize_protocol
from wkr_serving.server.config import ConfigError, ServerConfig, load_config

# -- npy: another name of numpy --------------------------------------------------------


def test_normalize_protocol_maps_npy_to_numpy_and_nothing_else():
    assert normalize_protocol("npy") == "numpy"
    for name in PROTOCOLS:
        assert normalize_protocol(name) == name
    for bad in ("pickle", "NPY", "", None, 1):
        with pytest.raises(ValueError, match="npy"):
            normalize_protocol(bad)


def test_server_config_takes_npy_from_the_command_line_yaml_and_env(tmp_path):
    config, _ = load_config(["w.W", "-protocol", "npy"], environ={})
    assert config.protocol == "numpy"
    yaml_file = tmp_path / "server.yaml"
    yaml_file.write_text("protocol: npy\n")
    config, _ = load_config(["w.W", "-config", str(yaml_file)], environ={})
    assert config.protocol == "numpy"
    config, _ = load_config(["w.W"], environ={"WKR_PROTOCOL": "npy"})
    assert config.protocol == "numpy"
    assert ServerConfig(protocol="npy").protocol == "numpy"
    assert ServerConfig(protocol="npy") == ServerConfig(protocol="numpy")
    with pytest.raises(ConfigError, match="protocol"):
        ServerConfig(protocol="pickle")


def test_client_refuses_an_unknown_protocol_before_connecting():
    with pytest.raises(ClientUsageError, match="npy"):
        WKRClient("127.0.0.1", 1, 2, protocol="pickle")


def test_npy_server_serves_numpy_and_npy_clients(cli_server):
    """``-protocol npy`` as the page writes it: status says numpy; a numpy client, an
    npy client and an asyncio npy client all get their arrays back."""
    server = cli_server(["example/noop_worker.Worker", "-protocol", "npy", "-cpu"],
                        cwd=REPO_DIR)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with server.client(protocol="numpy") as client:
        status = client.server_status
        assert status["protocol"] == "numpy" and status["config"]["protocol"] == "numpy"
        np.testing.assert_array_equal(client.encode(x), x)
    with WKRClient("127.0.0.1", server.port, server.port_out, protocol="npy",
                   timeout=10_000, connect_timeout=10_000) as client:
        assert client.protocol == "numpy"
        got = client.encode(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)

    async def use_async() -> np.ndarray:
        client = AsyncWKRClient("127.0.0.1", server.port, server.port_out, protocol="npy",
                                timeout=10_000, connect_timeout=10_000)
        async with client:
            return await client.encode(x)

    np.testing.assert_array_equal(asyncio.run(asyncio.wait_for(use_async(), 30)), x)


# -- a model that fails to load, with -log_dir ------------------------------------------

FAILING_SERVER = '''\
from wkr_serving.server import WKRHardWorker


class Worker(WKRHardWorker):
    def get_model(self, envs, model_dir, model_name, tmp_dir):
        raise ValueError("no such model")

    def predict(self, model, input):
        return input
'''


def err_file(log_dir: Path, log_name: str = "WKRServer") -> str:
    return os.path.abspath(os.path.join(log_dir, f"{log_name}.err"))


def test_boot_failure_with_log_dir_is_told_on_the_console(cli_server, tmp_path):
    """The page's server.py whose get_model raises, started with -log_dir: exit 1, and
    stderr names the error and the file that holds its traceback."""
    (tmp_path / "server.py").write_text(FAILING_SERVER)
    log_dir = tmp_path / "log_dir"
    server = cli_server(["server.Worker", "-num_worker", "2", "-cpu", "-log_dir",
                         str(log_dir)], cwd=str(tmp_path))
    assert server.wait_exit() == 1
    err = server.stderr()
    assert "ValueError: no such model" in err, err
    assert err_file(log_dir) in err, err
    assert "Traceback" not in err, "the traceback belongs in the log file"
    traceback = Path(err_file(log_dir)).read_text()
    assert "Traceback (most recent call last)" in traceback
    assert "ValueError: no such model" in traceback


def test_boot_failure_of_a_restarted_worker_is_told_on_the_console(cli_server, tmp_path):
    """A worker that crashed is restarted and then cannot load its model, three times in
    a row: the server stops with exit 1 and says why on stderr, with the path of the
    traceback. The request that crashed it (waiting for its retry) is answered."""
    log_dir = tmp_path / "logs here"
    server = cli_server(["workers.BootOnceWorker", "-num_worker", "1", "-cpu",
                         "-graceful_timeout", "3", "-log_dir", str(log_dir), "-log_name",
                         "svc"], cwd=TESTS_DIR)
    with server.client() as client, pytest.raises((ShuttingDown, ConnectionLost)):
        client.encode({"cmd": "die"})
    assert server.wait_exit() == 1
    err = server.stderr()
    assert "RuntimeError: boot-again: this model can only be loaded once" in err, err
    assert "worker-0 failed to start 3 times in a row after a restart" in err, err
    assert err_file(log_dir, "svc") in err, err
    assert "Traceback (most recent call last)" in Path(err_file(log_dir, "svc")).read_text()
