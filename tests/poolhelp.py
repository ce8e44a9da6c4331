"""Test helpers for the decentralized pool: a ``wkr-decentral-start`` subprocess on
loopback on ports it picks itself, its control client, bounded waits, a clean stop by
pid."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from helpers import START_LIMIT_S, TESTS_DIR, CLIServer, wait_until
from wkr_serving.client.pool_control import PoolControl, PoolTimeout


def pool_command(name: str = "start") -> list[str]:
    exe = shutil.which(f"wkr-decentral-{name}")
    assert exe, f"the wkr-decentral-{name} entry point is not installed"
    return [exe]


def servers_arg(*servers: Any) -> str:
    """``-remote_servers`` JSON for WKRServer / CLIServer objects."""
    return "[" + ", ".join(f'["127.0.0.1", {s.port}, {s.port_out}]' for s in servers) + "]"


class CLIPool(CLIServer):
    """``wkr-decentral-start UNIT ARGS`` on 127.0.0.1 with -port/-port_out (and
    -http_port) 0: it binds free ports itself, and ``port``, ``port_out`` and
    ``http_port`` are read back from its "pool ready" log line, printed as soon as it
    has bound them (before its units start); stdout/stderr go to files in ``tmp_path``
    (stopped like a CLIServer)."""

    #: The central process's line once its ports are bound (client/pool.py).
    READY_LINE = re.compile(r"pool ready: control port (?P<port>\d+), events port "
                            r"(?P<port_out>\d+)(?:, http port (?P<http_port>\d+))?")
    #: The pool's default ``-log_name`` (client/pool_config.py).
    LOG_NAME = "WKRDecentralize"

    def __init__(self, unit: str, args: list[str], tmp_path: Path, *, cwd: str = TESTS_DIR,
                 name: str = "pool", env: dict[str, str] | None = None,
                 http: bool = True) -> None:
        import os

        self._open_outputs(tmp_path, name, args)
        extra = ["-http_port", "0"] if http else []
        self.proc = subprocess.Popen(
            [*pool_command(), unit, *args, "-port", "0", "-port_out", "0",
             "-bind", "127.0.0.1", *extra],
            cwd=cwd, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})})

    def control(self, timeout: float = 10.0, token: str | None = None) -> PoolControl:
        return PoolControl("127.0.0.1", self.port, timeout, token)

    def status(self) -> dict[str, Any]:
        with self.control() as control:
            return control.call("status")

    def wait_status(self, predicate: Any, what: str, limit: float = START_LIMIT_S
                    ) -> dict[str, Any]:
        """Wait until ``predicate(status)`` holds; return that status."""
        def check() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"the pool exited with {self.proc.returncode}:\n"
                                     f"{self.stderr()[-4000:]}")
            try:
                with self.control(timeout=2.0) as control:
                    status = control.call("status")
            except PoolTimeout:
                return None
            return status if predicate(status) else None

        return wait_until(check, limit, what, interval=0.05)

    def wait_running(self, n: int, limit: float = START_LIMIT_S) -> dict[str, Any]:
        return self.wait_status(lambda s: s["units_running"] == n == s["units_wanted"],
                                f"{n} unit(s) running", limit)

    def cli(self, name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``wkr-decentral-NAME -ip 127.0.0.1 -port P -port_out Q ARGS``."""
        return subprocess.run(
            [*pool_command(name), "-ip", "127.0.0.1", "-port", str(self.port), "-port_out",
             str(self.port_out), *args], capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL)
