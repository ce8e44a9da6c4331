"""A real ``redis-server`` for tests: free port on 127.0.0.1, its own directory, bounded
start (waits for PING from this very process) and stop (by pid), and a restart on the
same port and directory for fault tests.

redis-server must be given a port number (its ``--port 0`` means no TCP at all), so the
first start goes through ``helpers.start_on_free_ports``: when another process took the
picked port first, redis-server exits with "Address already in use" and is started
again on another port."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers import PORT_IN_USE, PortInUse, start_on_free_ports, wait_until

#: Seconds redis-server gets to answer PING / to exit.
START_LIMIT_S = 20.0
STOP_LIMIT_S = 20.0


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """``redis-server --port P --bind 127.0.0.1 --dir D --save '' --appendonly yes|no``."""

    def __init__(self, directory: Path, appendonly: bool = True, port: int | None = None
                 ) -> None:
        exe = redis_server_path()
        assert exe, "redis-server is not installed (apt-get install redis-server)"
        self.exe = exe
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        if port:
            self.port = port
            self.start()
        else:
            start_on_free_ports(1, self._start_on)

    def _start_on(self, ports: list[int]) -> None:
        self.port = ports[0]
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING, and is the one that
        answers (its pid, not another redis-server's that holds the port); PortInUse if
        it could not bind the port."""
        import redis

        assert self.proc is None or self.proc.poll() is not None, "already running"
        log_path = self.directory / "redis.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no",
             "--protected-mode", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1.0,
                             socket_timeout=2.0)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                self.stop()  # closes the log
                said = log_path.read_bytes()[offset:].decode(errors="replace")
                if PORT_IN_USE.search(said):
                    raise PortInUse(f"redis-server on port {self.port}: {said[-500:]}")
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                     f"{said[-2000:]}")
            try:  # PING: loaded and serving; process_id: ours (until ours exits, a
                # foreign server may answer, or fail to, on the port it could not bind)
                return (bool(client.ping()) and self.proc is not None
                        and client.info("server")["process_id"] == self.proc.pid)
            except redis.exceptions.RedisError:
                return False

        try:
            wait_until(answers, START_LIMIT_S, "redis-server to answer PING", 0.01)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (redis-server then writes and syncs its append-only file and exits),
        then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_LIMIT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: what was not yet synced to the append-only file is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_LIMIT_S)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port and directory."""
        self.stop()
        self.start()

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db,
                           socket_connect_timeout=5.0, socket_timeout=10.0)


@contextlib.contextmanager
def running_redis(directory: Path, appendonly: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(directory, appendonly)
    try:
        yield server
    finally:
        server.stop()
