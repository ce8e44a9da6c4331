"""wkr-serving-terminate against real wkr-serving-start processes on 127.0.0.1.

It must stop a server only with the right token, return only once the server has
really stopped (its process exited, its ports closed), say so with its exit status
(0 stopped, 1 still running at the deadline, 2 refused/unreachable/usage), and find
the server's protocol by itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import CLIServer, Gate, reserved_ports
from wkr_serving.server.runscript import port_answers

EXIT_LIMIT_S = 30
#: Seconds one wkr-serving-terminate run may take in these tests (its own -timeout
#: is smaller).
CLI_LIMIT_S = 90


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("wkr-serving-terminate")
    assert exe, "the wkr-serving-terminate entry point is not installed"
    environ = {k: v for k, v in os.environ.items() if k != "WKR_AUTH_TOKEN"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=CLI_LIMIT_S,
                          stdin=subprocess.DEVNULL, env={**environ, **(env or {})})


def explain(out: subprocess.CompletedProcess[str]) -> str:
    return f"rc={out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"


def terminate_cli(server: CLIServer, *args: str, env: dict[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    """wkr-serving-terminate aimed at ``server``'s ports, with ``args``."""
    return run_cli("-ip", "127.0.0.1", "-port", str(server.port), "-port_out",
                   str(server.port_out), *args, env=env)


@pytest.fixture
def start(cli_server) -> Callable[..., CLIServer]:
    """Start a wkr-serving-start process with ``-cpu`` (stopped after the test)."""

    def make(args: list[str], env: dict[str, str] | None = None) -> CLIServer:
        return cli_server([*args, "-cpu"], env=env)

    return make


def assert_stopped_cleanly(server: CLIServer, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, explain(out) + server.stderr()[-3000:]
    assert "has stopped" in out.stdout
    # The CLI returned only after the server had exited: no waiting needed here.
    assert server.proc.poll() is not None, "wkr-serving-terminate returned too early"
    assert server.proc.returncode == 0, server.stderr()[-3000:]
    assert not port_answers("127.0.0.1", server.port)
    assert not port_answers("127.0.0.1", server.port_out)
    assert "terminate command" in server.stderr()


def test_wrong_token_is_refused_and_the_right_one_stops_the_server(start):
    server = start(["workers.EchoWorker", "-auth_token", "s3cret token"])
    with server.client() as client:
        assert client.encode("up") == "up"
        out = terminate_cli(server, "-token", "wrong", "-timeout", "20")
        assert out.returncode == 2, explain(out)
        assert "refused" in out.stderr and "auth_token" in out.stderr
        assert server.proc.poll() is None
        assert client.encode("still up") == "still up"
        missing = terminate_cli(server, "-timeout", "20")  # no token at all
        assert missing.returncode == 2, explain(missing)
        assert client.encode("still up") == "still up"

    out = terminate_cli(server, "-token", "s3cret token", "-timeout", "30")
    assert_stopped_cleanly(server, out)
    assert f"supervisor pid {server.proc.pid}" in out.stdout


def test_token_from_the_environment_and_the_protocol_is_detected(start):
    """The server speaks numpy; the CLI, not told, must find that out; both read the
    token from WKR_AUTH_TOKEN."""
    server = start(["workers.EchoWorker", "-protocol", "numpy"],
                   env={"WKR_AUTH_TOKEN": "from-env"})
    with server.client(protocol="numpy") as client:
        assert client.server_status["config"]["auth_token"] == "<redacted>"
    out = terminate_cli(server, "-timeout", "30", env={"WKR_AUTH_TOKEN": "from-env"})
    assert_stopped_cleanly(server, out)


def test_server_still_draining_at_the_deadline_exits_1(start, tmp_path):
    """A request holds a worker; the server drains it before exiting (graceful_timeout
    30 s), so a 2-second -timeout must report "still running" (exit 1), and the server
    stops by itself once the request is done."""
    server = start(["workers.ControlledWorker", "-graceful_timeout", "30"])
    gate = Gate(tmp_path, "held")
    with server.client(timeout=60_000) as client:
        req = client.encode(gate.item(7), blocking=False)
        gate.wait_started(30)
        began = time.monotonic()
        out = terminate_cli(server, "-timeout", "2")  # loopback: no token needed
        assert out.returncode == 1, explain(out)
        assert "accepted" in out.stdout and "still running" in out.stderr
        assert time.monotonic() - began >= 2.0
        assert server.proc.poll() is None, "the server must still be draining"
        gate.open()
        (reply,) = list(client.fetch())
        assert reply.id == req and reply.error_code == 0
        assert reply.embedding == {"pid": reply.embedding["pid"], "value": 7,
                                   "released": True}
    assert server.proc.wait(EXIT_LIMIT_S) == 0, server.stderr()[-3000:]


def test_no_server_listening_exits_2_within_the_timeout():
    with reserved_ports(2) as (port, port_out):
        began = time.monotonic()
        out = run_cli("-ip", "127.0.0.1", "-port", str(port), "-port_out", str(port_out),
                      "-timeout", "10")
    assert out.returncode == 2, explain(out)
    assert "no server" in out.stderr
    assert time.monotonic() - began < 10, "it must give up within its -timeout"


@pytest.mark.parametrize("args", [["-timeout", "0"], ["-port", "not-a-port"],
                                  ["-protocol", "pickle"]])
def test_usage_errors_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2, explain(out)
    assert "error" in out.stderr
