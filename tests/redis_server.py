"""A real ``redis-server`` for tests: free port on 127.0.0.1, its own directory, bounded
start (waits for PING) and stop (by pid), and a restart on the same port and directory
for fault tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers import free_port, wait_until

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
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        import redis

        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (closed in stop)
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
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                     f"{(self.directory / 'redis.log').read_text()[-2000:]}")
            try:
                return bool(client.ping())
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
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
