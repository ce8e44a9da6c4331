"""``wkr-decentral-make``: the pool's run script (issue 8, Part B point 2), made from the
Getting Started page's own command (unquoted ``-remote_servers``, ``-http_port``,
``-log_dir``) and run for real with dash (the page's ``sh``) and bash: start, status,
restart, stop, stopf, the pid file and ``logs/std.log``; the same generator and helper
as ``wkr-serving-make``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import (
    PORT_IN_USE,
    TESTS_DIR,
    PortInUse,
    gone,
    port_refused,
    start_on_free_ports,
    wait_until,
)
from wkr_serving.client.pool_control import PoolControl


def _make(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("wkr-decentral-make")
    assert exe, "wkr-decentral-make is not installed"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_the_pages_make_command_gives_a_posix_script_that_runs_the_pool(
        shell, tmp_path, numpy_server):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(TESTS_DIR, "pool_units.py"), work)
    servers = f"[[127.0.0.1, {numpy_server.port}, {numpy_server.port_out}], " \
              f"[localhost, {numpy_server.port}, {numpy_server.port_out}]]"
    script = work / "run_script.sh"
    log_dir = tmp_path / "log_dir"

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shell, str(script), command], cwd=work, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)

    def make_and_start(ports: list[int]) -> tuple[int, subprocess.CompletedProcess[str]]:
        """The page's make command on ``ports``, then its start. The script needs port
        numbers; a start that failed because one was taken meanwhile (said in its
        output or the pool's log) raises PortInUse: made again on new ports."""
        port, port_out, http_port = ports
        args = ["pool_units.Echo", "-port", str(port), "-port_out", str(port_out),
                "-http_port", str(http_port), "-num_client", "2", "-remote_servers",
                *servers.split(), "-log_dir", str(log_dir), "-bind", "127.0.0.1",
                "-name", "YOUR_DECENTRALIZE_SERVICE_NAME"]
        made = _make(args, work)
        assert made.returncode == 0, made.stderr
        script.write_text(made.stdout)
        assert subprocess.run([shell, "-n", str(script)], timeout=30).returncode == 0
        started = run("start")
        logs = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
        if started.returncode != 0 and PORT_IN_USE.search(started.stderr + logs):
            raise PortInUse(started.stderr)
        return port, started

    pid_file = work / "YOUR_DECENTRALIZE_SERVICE_NAME.pid"
    try:
        port, started = start_on_free_ports(3, make_and_start)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "is running" in started.stdout
        pid = int(pid_file.read_text())
        assert (work / "logs" / "std.log").exists()
        with PoolControl("127.0.0.1", port, 10.0) as control:
            wait_until(lambda: control.call("status")["units_running"] == 4, 60,
                       "4 units running")
        again = run("start")
        assert again.returncode == 1 and "already running" in again.stderr

        status = run("status")
        assert status.returncode == 0 and "4/4 unit(s) running" in status.stdout

        restarted = run("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        new_pid = int(pid_file.read_text())
        assert new_pid != pid and gone(pid)

        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert gone(new_pid) and not pid_file.exists() and port_refused(port)
        assert run("status").returncode == 3

        assert run("start").returncode == 0
        tree_pid = int(pid_file.read_text())
        with PoolControl("127.0.0.1", port, 10.0) as control:
            units = wait_until(lambda: [u["pid"] for u in control.call("status")["units"]
                                        if u["state"] == "running"] or None, 60,
                               "units running")
        killed = run("stopf")
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert gone(tree_pid) and all(gone(u) for u in units)
        assert not pid_file.exists()
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
