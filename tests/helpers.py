"""Test helpers: real servers on 127.0.0.1, bounded waits, clean stops."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import zmq
from requests.structures import CaseInsensitiveDict
from wkr_serving.client import ConnectTimeout, WKRClient
from wkr_serving.client import protocol as P
from wkr_serving.client.logs import DEFAULT_LOG_NAME, log_base
from wkr_serving.server import WKRServer
from wkr_serving.server.helper import get_args_parser
from workers import touch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

#: Default call timeout (ms) of test clients: generous, but every call is bounded.
CALL_TIMEOUT_MS = 20_000
#: Seconds a server gets to become ready / to stop.
START_LIMIT_S = 60.0
STOP_LIMIT_S = 30.0


# -- ports ---------------------------------------------------------------------------------
#
# A port number picked free and handed to a program later can be taken by another process
# in between (another test suite on the same machine). So, in order of preference:
# the program binds port 0 and says which port it got (``server_args``, ``CLIServer``,
# ``poolhelp.CLIPool``); a port that nothing must listen on is held by ``reserved_ports``;
# a program that must be given a number is started by ``start_on_free_ports``, which
# starts it again on new ports when it finds one taken.

#: Most starts, each on new ports, of a program that must be given port numbers
#: (``start_on_free_ports``). One collision is rare; five in a row mean something else
#: is wrong, and the test says so rather than retrying for ever.
PORT_ATTEMPTS = 5
#: How a program reports a port it could not bind (EADDRINUSE): wkr-serving-start and
#: wkr-decentral-start say "is already in use", redis-server "Address already in use".
PORT_IN_USE = re.compile(r"already in use", re.IGNORECASE)

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (racy: see the comment above;
    prefer port 0, ``reserved_ports`` or ``start_on_free_ports``)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago: all are held
    at once while picked, so no two are the same (racy once released, like free_port)."""
    with reserved_ports(count) as ports:
        return ports


@contextlib.contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    """``count`` ports on 127.0.0.1 that nothing listens on, nor can, inside the block:
    each is bound by a socket of ours that never listens, so a connection to it is
    refused, and no other process can bind it (our socket sets neither SO_REUSEADDR nor
    SO_REUSEPORT). For tests of an unreachable server or pool, where a ``free_port``
    number might meanwhile belong to someone else's server."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        yield [s.getsockname()[1] for s in socks]


class PortInUse(Exception):
    """Raised by a ``start`` given to ``start_on_free_ports``: the program could not bind
    one of the ports it was given (another process took it after it was picked)."""


def start_on_free_ports(count: int, start: Callable[[list[int]], T],
                        attempts: int = PORT_ATTEMPTS) -> T:
    """``start(ports)`` with ``count`` distinct ports that were free a moment ago; when it
    raises PortInUse, again with new ports, at most ``attempts`` times in all.

    For programs that must be given port numbers: redis-server (its port 0 means no TCP
    at all), a run script (its readiness probe dials the configured port). Another
    process may take a picked port before the program binds it, and no pick can prevent
    that, but the program then fails to bind and says so: ``start`` must detect that
    (``PORT_IN_USE`` in its output) and raise PortInUse, having stopped what it started.
    Restarting something on the port it had is outside this (the port is part of what
    the test checks) and keeps its one small window."""
    failures: list[str] = []
    for _ in range(attempts):
        try:
            return start(free_ports(count))
        except PortInUse as exc:
            failures.append(str(exc))
    raise AssertionError(f"{attempts} starts in a row found a port taken: {failures}")


def wait_until(predicate: Callable[[], Any], limit: float, what: str,
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a truthy value, at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        pause.wait(interval)


def server_args(model_dir: str, *extra: str):
    """Seed-style args: ``get_args_parser().parse_args([...])`` on loopback, any ports."""
    return get_args_parser().parse_args(
        ["-port", "0", "-port_out", "0", "-bind", "127.0.0.1", "-model_dir", str(model_dir),
         "-graceful_timeout", "10", "-startup_timeout", "60", *extra])


@contextlib.contextmanager
def running_server(args: Any, worker: type) -> Iterator[WKRServer]:
    """Start a WKRServer, yield it once ready, and always stop it (bounded)."""
    server = WKRServer(args, worker)
    server.start()
    try:
        server.wait_ready(START_LIMIT_S)
        yield server
    finally:
        server.close(STOP_LIMIT_S)
        assert not server.is_alive(), "WKRServer thread did not stop in time"


def connect(server: Any, **kwargs: Any) -> WKRClient:
    """A client of ``server`` (a WKRServer), with bounded call and connect timeouts."""
    kwargs.setdefault("protocol", server.config.protocol)
    kwargs.setdefault("timeout", CALL_TIMEOUT_MS)
    kwargs.setdefault("connect_timeout", 10_000)
    return WKRClient("127.0.0.1", server.port, server.port_out, **kwargs)


def wait_idle(client: WKRClient, limit: float = 20.0) -> dict[str, Any]:
    """Wait until the server has nothing queued or in flight; return that status."""
    last: dict[str, Any] = {}

    def idle():
        status = client.server_status
        last.update(status)
        return status if status["queue_items"] == 0 and status["in_flight_items"] == 0 else None

    try:
        return wait_until(idle, limit, "the server to become idle", interval=0.02)
    except AssertionError as exc:
        summary = {k: last.get(k) for k in ("queue_items", "in_flight_items", "busy_workers",
                                            "workers", "ready")}
        raise AssertionError(f"{exc}; last status: {summary}") from None


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie left to a non-reaping init counts)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


RAW_LIMIT_MS = 10_000


class RawClient:
    """A bare DEALER pair speaking the wire protocol, for frames the client never sends."""

    def __init__(self, server, identity: bytes):
        self.context = zmq.Context()
        self.to_vent = self._socket(identity, server.port)
        self.from_sink = self._socket(identity, server.port_out)
        self.from_sink.send(P.pack([P.PROTOCOL_VERSION, P.HELLO, 0]))
        _, _, req_id, hello = self.recv()
        assert req_id == 0 and hello["protocol"] == server.config.protocol

    def _socket(self, identity, port):
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, identity)
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    def send(self, frames):
        assert self.to_vent.poll(RAW_LIMIT_MS, zmq.POLLOUT)
        self.to_vent.send_multipart(frames, zmq.NOBLOCK)

    def recv_frames(self):
        assert self.from_sink.poll(RAW_LIMIT_MS), "no reply from the server"
        return self.from_sink.recv_multipart(zmq.NOBLOCK)

    def recv(self):
        return P.unpack_header(self.recv_frames()[0])

    def close(self):
        self.to_vent.close(0)
        self.from_sink.close(0)
        self.context.term()


def port_refused(port: int) -> bool:
    """Whether a fresh TCP connect to ``port`` on loopback is refused (nothing listens)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


class Gate:
    """A ControlledWorker ``block`` command: its worker creates ``started`` and waits
    until the test creates ``release`` (several gates may share one ``release`` file)."""

    def __init__(self, directory: Any, name: str, release: str | None = None) -> None:
        self.name = name
        self.started = os.path.join(str(directory), f"{name}.started")
        self.release = release or os.path.join(str(directory), f"{name}.release")

    def item(self, value: Any = None) -> dict[str, Any]:
        """The input that blocks a worker; once released, its result carries ``value``."""
        return {"cmd": "block", "started": self.started, "release": self.release,
                "value": value}

    def wait_started(self, limit: float = 60.0) -> None:
        """Wait until a worker is blocked in this gate's item."""
        wait_until(lambda: os.path.exists(self.started), limit, f"{self.name} to start")

    def open(self) -> None:
        """Release the blocked worker (idempotent: safe in ``finally`` blocks)."""
        if not os.path.exists(self.release):
            touch(self.release)


def start_command() -> list[str]:
    """The installed ``wkr-serving-start`` entry point, as a command line."""
    exe = shutil.which("wkr-serving-start")
    assert exe, "the wkr-serving-start entry point is not installed"
    return [exe]


def log_file(args: list[str], default_name: str) -> Path | None:
    """Where a server or pool started with ``args`` writes its log: the ``.log`` file
    under ``-log_dir`` (``-log_name``, else ``default_name``), or None: stderr. Only the
    command line is read (a ``-log_dir`` from YAML or the environment is not seen)."""
    def value(flag: str) -> str | None:  # the last one wins, as in argparse
        values = [args[i + 1] for i, word in enumerate(args[:-1]) if word == flag]
        return values[-1] if values else None

    log_dir = value("-log_dir")
    if log_dir is None:
        return None
    return Path(log_base(log_dir, value("-log_name") or default_name) + ".log")


class CLIServer:
    """A ``wkr-serving-start`` subprocess on 127.0.0.1 with ``-model_dir`` ``tmp_path``;
    its stdout and stderr go to files ``<name>.stdout.txt`` and ``<name>.stderr.txt`` in
    ``tmp_path`` (never an unread pipe).

    It binds ``-port 0 -port_out 0`` itself, so no other process can take a port between
    a pick and the bind; ``port`` and ``port_out`` are read back from the line its log
    prints once it is ready (``READY_LINE``), and wait for that line (bounded)."""

    #: The log line that names the ports once bound: the supervisor's, when the server
    #: is ready (server/supervisor.py).
    READY_LINE = re.compile(
        r"\bready: port (?P<port>\d+), port_out (?P<port_out>\d+)"
        r"(?:, \d+ worker\(s\), HTTP on port (?P<http_port>\d+))?")
    #: The base name of its log file under ``-log_dir`` when no ``-log_name`` is given.
    LOG_NAME = DEFAULT_LOG_NAME

    def __init__(self, args: list[str], tmp_path: Path, *, cwd: str = TESTS_DIR,
                 env: dict[str, str] | None = None, name: str = "server") -> None:
        self._open_outputs(tmp_path, name, args)
        self.proc = subprocess.Popen(
            [*start_command(), *args, "-port", "0", "-port_out", "0",
             "-bind", "127.0.0.1", "-model_dir", str(tmp_path)],
            cwd=cwd, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})})

    def _open_outputs(self, tmp_path: Path, name: str, args: list[str]) -> None:
        """Open the stdout/stderr files; note where the log goes (stderr or a file under
        ``-log_dir``, from its current end: an earlier run's lines do not count)."""
        self.stdout_path = tmp_path / f"{name}.stdout.txt"
        self.stderr_path = tmp_path / f"{name}.stderr.txt"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 (closed in close())
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.log_path = log_file(args, self.LOG_NAME)
        self._log_offset = (self.log_path.stat().st_size
                            if self.log_path is not None and self.log_path.exists() else 0)
        self._ports: dict[str, int | None] | None = None

    def _find_ports(self) -> dict[str, int | None] | None:
        """The ports named by ``READY_LINE`` if the log has it yet (kept once found);
        raises if the process exited without it."""
        if self._ports is None:
            exited = self.proc.poll() is not None
            log = self.stderr()
            if self.log_path is not None and self.log_path.exists():
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_offset)
                    log += f.read().decode(errors="replace")
            found = self.READY_LINE.search(log)
            if found:
                self._ports = {k: None if v is None else int(v)
                               for k, v in found.groupdict().items()}
            elif exited:
                raise AssertionError(f"{self.proc.args[0]} exited with {self.proc.returncode} "
                                     f"before it said its ports:\n{log[-4000:]}")
        return self._ports

    def ports(self, limit: float = START_LIMIT_S) -> dict[str, int | None]:
        """The ports it bound, by flag name, once its log says them (bounded wait)."""
        return wait_until(self._find_ports, limit, f"{self.proc.args[0]} to say its ports "
                          f"({self.log_path or 'stderr'})", 0.05)

    @property
    def port(self) -> int:
        port = self.ports()["port"]
        assert port is not None
        return port

    @property
    def port_out(self) -> int:
        port = self.ports()["port_out"]
        assert port is not None
        return port

    @property
    def http_port(self) -> int | None:
        """The HTTP port, None without ``-http_port``."""
        return self.ports()["http_port"]

    def stderr(self) -> str:
        """Everything the server has written to stderr so far (its log)."""
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self, limit: float = STOP_LIMIT_S) -> int:
        """Wait (bounded) for the process to exit; return its exit code."""
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"wkr-serving-start did not exit within {limit}s:\n"
                                 f"{self.stderr()[-4000:]}") from None

    def client(self, **kwargs: Any) -> WKRClient:
        """A client, once the server answers and all its workers are ready."""
        kwargs.setdefault("timeout", 10_000)
        holder: list[WKRClient] = []

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.stderr()[-4000:]}")
            if not self._find_ports():
                return False
            if not holder:
                try:
                    holder.append(WKRClient("127.0.0.1", self.port, self.port_out,
                                            connect_timeout=500, **kwargs))
                except ConnectTimeout:
                    return False
            return holder[0].server_status["ready"]

        try:
            wait_until(ready, START_LIMIT_S, "wkr-serving-start to be ready", 0.05)
        except BaseException:
            for c in holder:
                c.close()
            raise
        return holder[0]

    def close(self, grace: float = STOP_LIMIT_S) -> None:
        """Stop the process if it still runs: SIGTERM and up to ``grace`` seconds, then
        SIGKILL (at once when ``grace`` is 0); close the output files."""
        if self.proc.poll() is None:
            if grace > 0:
                self.proc.terminate()
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            else:
                self.proc.kill()
                self.proc.wait(30)
        self._out.close()
        self._err.close()


# -- HTTP bridge ---------------------------------------------------------------------------

#: Seconds any single HTTP request of a test may take (the box is slow and shared).
HTTP_LIMIT_S = 30.0


def serve(tmp_path_factory: Any, name: str, worker: type,
                  *flags: str) -> Iterator[WKRServer]:
    """The body of a module-scoped server fixture: ``server_args`` on a fresh directory
    ``name`` plus ``flags``, ``worker`` as the model; yields the ready server and stops it.
    Use as ``yield from serve(tmp_path_factory, "dir", Worker, "-cpu", ...)``."""
    args = server_args(tmp_path_factory.mktemp(name), *flags)
    with running_server(args, worker) as server:
        yield server


def http_request(url: str, body: Any = None, headers: dict[str, str] | None = None,
                 method: str | None = None, timeout: float = HTTP_LIMIT_S,
                 ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a new connection (bounded by ``timeout``): ``(status, headers,
    raw body)``; error statuses are returned, not raised. ``body``: bytes as they are,
    anything else JSON-encoded; ``headers`` are sent as given."""
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, CaseInsensitiveDict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, CaseInsensitiveDict(exc.headers), exc.read()


def http_call(server: Any, path: str, body: Any = None, headers: dict[str, str] | None = None,
              method: str | None = None, *, raw: bool = False, timeout: float = HTTP_LIMIT_S,
              ) -> tuple[int, dict[str, str], Any]:
    """One request to the HTTP bridge of ``server`` (a new connection, ``Content-Type:
    application/json`` plus ``headers``): ``(status, headers, decoded JSON body)`` (an
    empty body decodes to None), or the raw bytes of the body with ``raw``."""
    status, answer_headers, data = http_request(
        f"http://127.0.0.1:{server.http_port}{path}", body,
        {"Content-Type": "application/json", **(headers or {})}, method, timeout)
    return status, answer_headers, data if raw else json.loads(data or b"null")


def http_send(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request on a kept-alive connection (JSON ``body`` if any, ``Content-Type:
    application/json`` plus ``headers``): ``(status, raw body)``."""
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def bridge_connections(server: Any, headers: dict[str, str] | None = None,
                                ) -> list[http.client.HTTPConnection]:
    """Kept-alive connections, one to each bridge process, told apart by the identities
    (``/status/client`` names the process, asked with ``headers``). The kernel
    hands a new connection to whichever process accepts first, and a process may still be
    booting when the server is ready: try new connections until each process has answered
    one (bounded)."""
    processes = server.config.http_workers
    assert processes >= 2, "the test server must run several bridge processes"
    found: dict[str, http.client.HTTPConnection] = {}

    def another() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=HTTP_LIMIT_S)
        conn.request("GET", "/status/client", headers=headers or {})
        response = conn.getresponse()
        clients = json.loads(response.read())["clients"]
        assert response.status == 200 and clients
        key = str(clients[0]["pid"])
        if key in found:
            conn.close()
        found.setdefault(key, conn)
        return len(found) == processes

    try:
        wait_until(another, HTTP_LIMIT_S, f"connections to {processes} bridge processes")
    except BaseException:
        for conn in found.values():
            conn.close()
        raise
    return list(found.values())


def abstract_names_of(pid: int) -> list[str]:
    """The abstract unix socket names (``@wkr-<pid>-...``, in /proc/net/unix) bound by
    the server whose supervisor is ``pid``: its internal sockets, which have no files."""
    with open("/proc/net/unix", encoding="utf-8") as fh:
        return [line.split()[-1] for line in fh if f" @wkr-{pid}-" in line]


#: Seconds any one command of an example's README may take here.
README_COMMAND_LIMIT_S = 60


def readme_commands(readme: str) -> list[str]:
    """The commands of a README's ``code-block:: bash`` blocks, one string each, in
    order: continuation lines joined, comments (the outputs shown) left out."""
    lines = Path(readme).read_text().splitlines()
    commands: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != ".. code-block:: bash":
            i += 1
            continue
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
            block.append(lines[i].strip())
            i += 1
        pending = ""
        for line in block:
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            commands.append(pending + line)
            pending = ""
    return commands


def run(args: list[str], cwd: Path) -> str:
    """Run a README command in ``cwd`` (bounded); its stdout, once it exited with 0."""
    if args[0] == "python":
        args = [sys.executable, *args[1:]]
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          timeout=README_COMMAND_LIMIT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{args} exited with {done.returncode}:\n{done.stderr}"
    return done.stdout
