"""Production run scripts: ``wkr-serving-make`` and ``wkr-serving-terminate``.

``wkr-serving-make <wkr-serving-start args...> -name NAME [-dir DIR]`` prints a POSIX sh
script (``sh run_script.sh start|stop|stopf|restart|status``, dash or bash alike) for one
service. The script stays thin: every step that must wait (until the server is ready,
until a process has exited) or must find processes (the service's whole tree) runs in
the helper of this module, ``python -m wkr_serving.server.runscript``, with the
interpreter that generated the script.

The generator and the helper serve more than one kind of service: what is particular to
a kind (the module it runs as, how its arguments are parsed and which ports it needs,
how readiness and status are probed) is one :class:`ServiceKind`, registered with
:func:`register_kind`. The server is the kind ``"server"``; a ``*-make`` command for
another kind is ``main_make(argv, kind=...)``.

``wkr-serving-terminate`` sends the ``terminate`` command to a running server and waits
until it has really stopped: its supervisor process has exited (when it runs on this
host) and its ports no longer accept connections.

Waiting never sleeps blindly: a process exit is awaited on a pidfd (it becomes readable
when the process ends), readiness by connecting a client, each with a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import importlib
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from wkr_serving.client import WKRClient
from wkr_serving.client.cli_common import add_connection_args, connect_any
from wkr_serving.client.errors import (
    ConnectionLost,
    ConnectTimeout,
    ServerError,
    ShuttingDown,
    Unauthorized,
    WKRError,
    WKRTimeoutError,
)
from wkr_serving.client.version import __version__

from .config import ConfigError, ServerConfig, load_config
from .status import ServerStatus
from .supervisor import STOP_GRACE

__all__ = ["SERVER_KIND", "ServiceKind", "build_make_parser", "build_terminate_parser",
           "get_kind", "main_helper", "main_make", "main_terminate", "make_script",
           "register_kind", "wait_pid_exit"]

#: The module the generated scripts call (``python -m ...``) and the command they run.
HELPER_MODULE = "wkr_serving.server.runscript"
SERVER_MODULE = "wkr_serving.server.cli"
#: Where a generated script sends the service's stdout and stderr (under its base dir),
#: as the seed's Getting Started page says: ``./logs/std.log``.
STD_LOG = os.path.join("logs", "std.log")
#: Seconds added to the server's own -startup_timeout / -graceful_timeout (+ the role
#: stop grace) before the scripts give up waiting.
MARGIN_S = 30.0
#: Seconds ``stopf`` waits for killed processes to disappear.
KILL_WAIT_S = 15.0
#: Lines of the log shown when a start fails.
LOG_TAIL_LINES = 40
#: Exit status of ``status`` for a service that is not running (LSB).
STATUS_NOT_RUNNING = 3

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


# -- processes ----------------------------------------------------------------------------


def is_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def wait_pid_exit(pid: int, timeout: float, proc: psutil.Process | None = None) -> bool:
    """Wait up to ``timeout`` seconds for process ``pid`` to end; return whether it did.

    Uses a pidfd (readable once the process has ended, zombie or reaped), so the wait is
    woken by the exit itself; ``proc`` (a psutil handle taken earlier) guards against
    the pid having been reused by another process meanwhile.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            if proc is not None and not proc.is_running():  # the pid now names another one
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        finally:
            os.close(fd)
    # No pidfd (old kernel): poll the process table, bounded.
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (is_gone(pid) or (proc is not None and not proc.is_running())):
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.05)
    return True


def wait_all_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait (bounded) for every pid to end; return those still running."""
    deadline = time.monotonic() + timeout
    left = []
    for pid in pids:
        if not wait_pid_exit(pid, max(0.0, deadline - time.monotonic())):
            left.append(pid)
    return left


def session_members(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``.

    A pid stays reserved while any process uses it as its session id, so when the
    session leader is gone the remaining members can only be its own leftovers."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def is_service_process(pid: int, kind: ServiceKind | None = None) -> psutil.Process | None:
    """The process ``pid`` if it is a running service started by a generated script (a
    session leader running the module or start command of ``kind``, or of any
    registered kind when None), else None (a stale pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or os.getsid(pid) != pid:
            return None
        cmdline = proc.cmdline()
    except (OSError, psutil.Error):
        return None
    kinds = [kind] if kind is not None else list(KINDS.values())
    marks = [m for k in kinds for m in (k.module, k.start_command)]
    if any(mark in part for part in cmdline for mark in marks):
        return proc
    return None


def service_tree(pid: int, kind: ServiceKind | None = None) -> list[psutil.Process]:
    """The service leader ``pid`` (if it is one), its descendants and every live member
    of its session; empty when ``pid`` is some other live process (stale pid file)."""
    leader = is_service_process(pid, kind)
    found: dict[int, psutil.Process] = {}
    if leader is not None:
        found[pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                found[child.pid] = child
    elif psutil.pid_exists(pid) and not is_gone(pid):
        return []  # the pid was reused by an unrelated process: touch nothing
    for member in session_members(pid):
        found.setdefault(member.pid, member)
    return list(found.values())


def kill_tree(pid: int, timeout: float = KILL_WAIT_S, kind: ServiceKind | None = None,
              ) -> tuple[list[int], list[int]]:
    """SIGKILL the service tree of ``pid``; return ``(killed, still_running)`` pids."""
    procs = service_tree(pid, kind)
    killed = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the process is still the one we listed
            killed.append(proc.pid)
    left = wait_all_gone(killed, timeout)
    # A child forked while we were killing: one more sweep of the session.
    extra = [p for p in session_members(pid) if p.pid not in killed]
    for proc in extra:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            killed.append(proc.pid)
    left += wait_all_gone([p.pid for p in extra], timeout)
    return killed, left


# -- probing a server ---------------------------------------------------------------------


def probe_address(bind: str) -> str:
    """Where a client on this host reaches a server bound to ``bind``."""
    if bind in ("0.0.0.0", "*", ""):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "::1"
    return bind.strip("[]")


def client_for(config: ServerConfig, client_key: str | None, connect_ms: int,
               timeout_ms: int) -> WKRClient:
    """A client of the server ``config`` describes, from this host (raises on failure)."""
    curve: dict[str, Any] = {}
    if config.curve_secret_key:
        curve["server_public_key"] = config.curve_secret_key  # holds the public key too
        if client_key:
            curve["client_key"] = client_key
    return WKRClient(probe_address(config.bind), config.port, config.port_out,
                     protocol=config.protocol, check_version=False,
                     connect_timeout=max(1, connect_ms), timeout=max(1, timeout_ms), **curve)


def summarize(status: ServerStatus) -> str:
    """One line about a running server, for ``status`` and ``start``.

    Tolerant (``.get``) where a plain reader would index: after an upgrade, the scripts
    probe a server still running the older version until its ``restart``, and its
    status may lack keys added since; a missing one shows as ``None`` instead of failing
    the command."""
    workers = status.get("workers") or []
    states: dict[str, int] = {}
    restarts = 0
    for row in workers:
        states[str(row.get("state"))] = states.get(str(row.get("state")), 0) + 1
        restarts += int(row.get("restarts") or 0)
    config = status.get("config") or {}
    return (f"{'ready' if status.get('ready') else 'NOT ready'}"
            f"{', draining' if status.get('draining') else ''}; "
            f"ports {config.get('port')}/{config.get('port_out')}, protocol "
            f"{status.get('protocol')}, version {status.get('server_version')}; "
            f"{len(workers)} worker(s) "
            f"({', '.join(f'{n} {s}' for s, n in sorted(states.items())) or 'none'}), "
            f"{restarts} restart(s); {status.get('queue_items')} queued, "
            f"{status.get('in_flight_items')} in flight; {status.get('num_requests')} "
            f"request(s) served; up {float(status.get('uptime_s') or 0):.0f}s")


# -- kinds of service ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceKind:
    """What the run scripts and their helper need to know about one kind of service.

    Everything else (the script, pid file, std log, locking, starting in a new session,
    stopping, killing the tree, waiting) is shared by every kind. A config is whatever
    ``parse`` returns; the other callables get it back. A probe is whatever ``connect``
    returns (closed with ``.close()``)."""

    #: The key of :data:`KINDS`, given to the helper as ``--kind``.
    name: str
    #: The service runs as ``python -m MODULE <arguments>``.
    module: str
    #: Its console command (for messages); the module or this name in a session
    #: leader's command line marks a process of this kind.
    start_command: str
    #: The command that prints its run scripts (for messages and ``--help``).
    make_command: str
    #: ``arguments -> config``; raises :class:`ValueError` (ConfigError) with the reason,
    #: or ``SystemExit`` after argparse printed it.
    parse: Callable[[Sequence[str]], Any]
    #: ``config -> {flag: port}``: the ports a script needs fixed (not 0) to find it.
    ports: Callable[[Any], dict[str, int | None]]
    #: ``(config, client_key) -> why no script can run it, or None`` (beyond the ports).
    check: Callable[[Any, str | None], str | None]
    #: ``config -> seconds`` to wait for readiness / for a graceful stop.
    start_timeout: Callable[[Any], float]
    stop_timeout: Callable[[Any], float]
    #: ``(config, client_key, connect_ms, timeout_ms) -> probe``; raises
    #: :class:`WKRTimeoutError` while nothing answers, another :class:`WKRError` when
    #: probing cannot work.
    connect: Callable[[Any, str | None, int, int], Any]
    #: ``probe -> status``, the kind's own structure (a :class:`ServerStatus` for the
    #: server); raises WKRTimeoutError or ConnectionLost to retry.
    status: Callable[[Any], Any]
    #: ``status -> whether it is ready`` and ``status -> one line for the user``.
    ready: Callable[[Any], bool]
    summarize: Callable[[Any], str]
    #: The config used when the arguments do not parse (for the stop/status timeouts).
    fallback: Callable[[], Any]
    #: The module that registers this kind: the helper imports it to find the kind.
    registered_in: str = HELPER_MODULE
    #: How messages call one service of this kind.
    title: str = "service"


#: Every kind the generator and the helper know, by name (see :func:`register_kind`).
KINDS: dict[str, ServiceKind] = {}


def register_kind(kind: ServiceKind) -> ServiceKind:
    """Add (or replace) a kind of service; returns it."""
    KINDS[kind.name] = kind
    return kind


def get_kind(kind: str | ServiceKind, module: str | None = None) -> ServiceKind:
    """The kind named ``kind``, importing ``module`` first when it is not registered yet
    (the module that calls :func:`register_kind` for it)."""
    if isinstance(kind, ServiceKind):
        return kind
    if kind not in KINDS and module:
        importlib.import_module(module)
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind of service {kind!r} (known: "
                         f"{', '.join(sorted(KINDS))})") from None


def _parse_server(args: Sequence[str]) -> ServerConfig:
    config, spec = load_config(args)
    if not spec:
        raise ConfigError("the worker class (<file>.<Class>) is required")
    return config


def _server_ready(status: ServerStatus) -> bool:
    # .get: the server probed may be an older version (see summarize)
    return bool(status.get("ready"))


def _check_server(config: ServerConfig, client_key: str | None) -> str | None:
    if config.curve_client_keys and not client_key:
        return ("with -curve_client_keys the readiness probe needs -client_key (a "
                ".key_secret whose .key is in that directory)")
    return None


#: The WKR server (``wkr-serving-start`` / ``wkr-serving-make``).
SERVER_KIND = register_kind(ServiceKind(
    name="server", module=SERVER_MODULE, start_command="wkr-serving-start",
    make_command="wkr-serving-make", parse=_parse_server,
    ports=lambda c: {"-port": c.port, "-port_out": c.port_out},
    check=_check_server,
    start_timeout=lambda c: c.startup_timeout + MARGIN_S,
    stop_timeout=lambda c: c.graceful_timeout + 2 * STOP_GRACE + MARGIN_S,
    connect=client_for, status=lambda client: client.server_status,
    ready=_server_ready, summarize=summarize,
    fallback=ServerConfig, title="wkr-serving service"))


def service_problem(kind: ServiceKind, config: Any, client_key: str | None) -> str | None:
    """Why a run script could not run this service (a port left to chance...), or None."""
    loose = [flag for flag, port in kind.ports(config).items() if not port]
    if loose:
        return (f"give fixed {' and '.join(kind.ports(config))} ({', '.join(loose)} 0 or "
                "unset would pick a random port nobody could find)")
    return kind.check(config, client_key)


# -- the helper the generated scripts call -----------------------------------------------


class HelperError(Exception):
    """A step of a script command failed; the message says why (exit status 1)."""


def _log_tail(path: str, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(the log is empty)"


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 0 else None


def _write_pid(path: str, pid: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{pid}\n")
    os.replace(tmp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _service_lock(pid_file: str, name: str) -> Any:
    """Only one start/stop/stopf of a service at a time (refuse, do not queue)."""
    lock_path = os.path.join(os.path.dirname(pid_file) or ".", f".{name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # no directory, so no pid file either: nothing to guard
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HelperError(f"another start/stop of {name} is in progress "
                              f"(lock {lock_path})") from None
        yield
    finally:
        os.close(fd)


class Service:
    """One service of a generated script: its kind, files, command line and config."""

    def __init__(self, args: argparse.Namespace, kind: ServiceKind = SERVER_KIND) -> None:
        self.kind = kind
        self.name: str = args.name
        self.pid_file: str = os.path.abspath(args.pid_file)
        self.log_file: str = os.path.abspath(args.log_file)
        self.client_key: str | None = args.client_key
        self.server_args: list[str] = list(args.server_args)
        try:
            os.chdir(args.cwd)  # the worker class and relative paths resolve from here
        except OSError as exc:
            raise HelperError(f"{self.name}: cannot enter the work directory: {exc}") from None
        self.config_error: str | None = None
        try:
            self.config = kind.parse(self.server_args)
        except (ValueError, SystemExit) as exc:  # argparse exits on bad flags
            self.config = kind.fallback()
            self.config_error = str(exc) if isinstance(exc, ValueError) else \
                f"invalid {kind.start_command} arguments"

    @property
    def start_wait(self) -> float:
        return float(self.kind.start_timeout(self.config))

    @property
    def stop_wait(self) -> float:
        return float(self.kind.stop_timeout(self.config))

    def running(self) -> psutil.Process | None:
        pid = read_pid(self.pid_file)
        return None if pid is None else is_service_process(pid, self.kind)

    # -- commands -------------------------------------------------------------------------

    def start(self) -> int:
        problem = self.config_error or service_problem(self.kind, self.config,
                                                        self.client_key)
        if problem:
            raise HelperError(f"cannot start {self.name}: {problem}")
        with _service_lock(self.pid_file, self.name):
            pid = read_pid(self.pid_file)
            if pid is not None:
                if is_service_process(pid, self.kind) is not None:
                    print(f"{self.name} is already running (pid {pid}); not starting it "
                          "again", file=sys.stderr)
                    return 1
                leftovers = [p.pid for p in session_members(pid)] if is_gone(pid) else []
                if leftovers:
                    raise HelperError(f"{self.name}: pid {pid} is gone but processes of its "
                                      f"session are left: {leftovers}; use stopf first")
                print(f"{self.name}: removing stale pid file {self.pid_file} (pid {pid} is "
                      "not running)")
                _remove(self.pid_file)
            return self._launch()

    def _launch(self) -> int:
        os.makedirs(os.path.dirname(self.log_file), exist_ok=True)
        command = [sys.executable, "-m", self.kind.module, *self.server_args]
        with open(self.log_file, "ab") as log:
            offset = log.tell()
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"===== {stamp} start {self.name}: {shlex.join(command)} (in "
                      f"{os.getcwd()}) =====\n".encode())
            log.flush()
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _write_pid(self.pid_file, proc.pid)
        print(f"{self.name}: started pid {proc.pid}, logging to {self.log_file}; waiting up "
              f"to {self.start_wait:.0f}s for it to be ready")
        try:
            status = self._wait_ready(proc)
        except HelperError as exc:
            if proc.poll() is None or session_members(proc.pid):
                kill_tree(proc.pid, kind=self.kind)
            proc.poll()
            _remove(self.pid_file)
            print(f"{self.name}: start FAILED: {exc}\n--- last lines of {self.log_file} ---\n"
                  f"{_log_tail(self.log_file, offset)}", file=sys.stderr)
            return 1
        print(f"{self.name} is running (pid {proc.pid}): {self.kind.summarize(status)}")
        return 0

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        deadline = time.monotonic() + self.start_wait
        client: Any = None
        kind = self.kind

        def check_alive() -> None:
            code = proc.poll()
            if code is not None:
                raise HelperError(f"the {kind.title} exited with code {code} before it was "
                                  "ready")

        try:
            while True:
                check_alive()
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    raise HelperError(f"not ready within {self.start_wait:.0f}s")
                if client is None:
                    try:  # the handshake waits for the ports to open (bounded)
                        client = kind.connect(self.config, self.client_key, min(500, left_ms),
                                              min(5000, left_ms))
                    except WKRTimeoutError:
                        continue
                    except WKRError as exc:
                        raise HelperError(f"cannot query the {kind.title}: {exc}") from None
                try:
                    status = kind.status(client)
                except (WKRTimeoutError, ConnectionLost):
                    client.close()
                    client = None
                    continue
                if kind.ready(status):
                    return status
                # Not ready yet: pause, but wake at once if the server dies.
                wait_pid_exit(proc.pid, min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            if client is not None:
                client.close()

    def stop(self) -> int:
        with _service_lock(self.pid_file, self.name):
            pid = read_pid(self.pid_file)
            if pid is None:
                print(f"{self.name} is not running (no pid file {self.pid_file})")
                return 0
            leader = is_service_process(pid, self.kind)
            if leader is None:
                leftovers = [p.pid for p in session_members(pid)] if is_gone(pid) else []
                if leftovers:
                    raise HelperError(f"{self.name}: pid {pid} is gone but processes of its "
                                      f"session are left: {leftovers}; use stopf")
                _remove(self.pid_file)
                print(f"{self.name} was not running (stale pid file for pid {pid} removed)")
                return 0
            tree = [p.pid for p in service_tree(pid, self.kind)]
            print(f"{self.name}: sending SIGTERM to pid {pid}; waiting up to "
                  f"{self.stop_wait:.0f}s for it to stop")
            deadline = time.monotonic() + self.stop_wait
            with contextlib.suppress(psutil.NoSuchProcess):
                leader.send_signal(signal.SIGTERM)
            if not wait_pid_exit(pid, self.stop_wait, leader):
                raise HelperError(f"{self.name} (pid {pid}) did not stop within "
                                  f"{self.stop_wait:.0f}s; use stopf to kill it")
            left = wait_all_gone(tree, max(0.0, deadline - time.monotonic()))
            left += [p.pid for p in session_members(pid) if p.pid not in left]
            if left:
                raise HelperError(f"{self.name}: pid {pid} exited but processes {left} of its "
                                  "tree are still running; use stopf")
            _remove(self.pid_file)
            print(f"{self.name} stopped (pid {pid})")
            return 0

    def kill(self) -> int:
        with _service_lock(self.pid_file, self.name):
            pid = read_pid(self.pid_file)
            if pid is None:
                print(f"{self.name} is not running (no pid file {self.pid_file})")
                return 0
            killed, left = kill_tree(pid, kind=self.kind)
            if left:
                raise HelperError(f"{self.name}: processes {left} survived SIGKILL")
            _remove(self.pid_file)
            print(f"{self.name}: killed {len(killed)} process(es) of pid {pid}'s tree "
                  f"{sorted(killed)}" if killed else
                  f"{self.name} was not running (stale pid file for pid {pid} removed)")
            return 0

    def status(self) -> int:
        pid = read_pid(self.pid_file)
        if pid is None:
            print(f"{self.name} is not running")
            return STATUS_NOT_RUNNING
        if self.running() is None:
            print(f"{self.name} is not running (stale pid file {self.pid_file}: pid {pid})")
            return STATUS_NOT_RUNNING
        probe = None
        try:
            probe = self.kind.connect(self.config, self.client_key, 2000, 5000)
            summary = self.kind.summarize(self.kind.status(probe))
        except WKRError as exc:
            summary = f"not answering: {type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            if probe is not None:
                probe.close()
        print(f"{self.name} is running (pid {pid}): {summary}")
        return 0


def main_helper(argv: Sequence[str] | None = None) -> int:
    """``python -m wkr_serving.server.runscript COMMAND ...``: what generated scripts run."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {HELPER_MODULE}",
        description="Steps of the scripts made by wkr-serving-make (not meant to be typed).",
        usage=f"python -m {HELPER_MODULE} COMMAND [--kind KIND [--kind-module MODULE]] "
        "--name NAME --pid-file FILE --log-file FILE --cwd DIR [--client-key FILE] -- "
        "<arguments of the service>")
    parser.add_argument("command", choices=("start", "stop", "stopf", "status"))
    parser.add_argument("--kind", default=SERVER_KIND.name,
                        help="the kind of service (default: %(default)s)")
    parser.add_argument("--kind-module", default=None,
                        help="the module that registers --kind, imported when it is unknown")
    parser.add_argument("--name", required=True)
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--client-key", default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.server_args = argv[split + 1:]  # verbatim, whatever they look like
    try:
        kind = get_kind(args.kind, args.kind_module)
    except (ValueError, ImportError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        service = Service(args, kind)
        return {"start": service.start, "stop": service.stop, "stopf": service.kill,
                "status": service.status}[args.command]()
    except HelperError as exc:
        print(str(exc), file=sys.stderr)
        return 1


# -- wkr-serving-make ------------------------------------------------------------------------

_SCRIPT = """\
#!/bin/sh
# Run script of the {title} "{name}", made by {make_command} {version}.
#
#   sh THIS_SCRIPT start    start it in the background (its output goes to logs/std.log),
#                           wait until it is ready (exit 1 with the log's tail if it fails)
#   sh THIS_SCRIPT stop     graceful stop: SIGTERM, wait for the drain and the exit
#   sh THIS_SCRIPT stopf    kill the service's whole process tree at once
#   sh THIS_SCRIPT restart  stop, then start
#   sh THIS_SCRIPT status   running or not (exit 0 if running, 3 if not)
#
# POSIX sh: dash, bash or any sh runs it. The waiting and the process handling happen
# in python -m {helper} (the interpreter that made this script).
set -eu

NAME={q_name}
PYTHON={q_python}
# The worker class and relative paths in the arguments resolve from this directory.
WORKDIR={q_workdir}
# NAME.pid (the service's process id) and logs/std.log (its output) live here.
{base_dir_line}
PID_FILE="$BASE_DIR/$NAME.pid"
LOG_FILE="$BASE_DIR/{std_log}"

# helper STEP: run one step of the helper with the arguments of {start_command}.
helper() {{
  step=$1
  # The arguments of {start_command}, one flag a line, each one quoted.
  {set_args}
  "$PYTHON" -m {helper} "$step" \\
    --kind {q_kind} --kind-module {q_kind_module} \\
    --name "$NAME" --pid-file "$PID_FILE" --log-file "$LOG_FILE" --cwd "$WORKDIR" \\
    {client_key}-- "$@"
}}

case "${{1:-}}" in
  start)
    mkdir -p "$BASE_DIR/logs"
    helper start
    ;;
  stop) helper stop ;;
  stopf) helper stopf ;;
  restart)
    helper stop
    mkdir -p "$BASE_DIR/logs"
    helper start
    ;;
  status) helper status ;;
  *)
    echo "usage: sh $0 {{start|stop|stopf|restart|status}}" >&2
    exit 2
    ;;
esac
"""

#: The script's own directory (``sh run_script.sh`` gives ``$0`` = ``run_script.sh``).
_SCRIPT_DIR = 'BASE_DIR=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)'


def _set_args(args: Sequence[str]) -> str:
    """``set -- ...`` with one line per flag and its values, every argument quoted."""
    lines: list[list[str]] = []
    for arg in args:
        if not lines or re.match(r"^-[A-Za-z_]", arg):
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n    ".join(["set --", *(" ".join(line) for line in lines)])


def make_script(server_args: Sequence[str], name: str, base_dir: str | None = None,
                workdir: str | None = None, python: str | None = None,
                client_key: str | None = None,
                kind: str | ServiceKind = SERVER_KIND) -> str:
    """The text of the run script (see :func:`main_make`); every value is shell-quoted."""
    kind = get_kind(kind)
    if not _NAME_RE.match(name):
        raise ValueError(f"-name must be letters, digits, '.', '_' or '-' (not starting "
                         f"with '.' or '-'), got {name!r}")
    if base_dir is None:
        base_dir_line = _SCRIPT_DIR
    else:
        base_dir_line = f"BASE_DIR={shlex.quote(os.path.abspath(base_dir))}"
    return _SCRIPT.format(
        name=name, version=__version__, helper=HELPER_MODULE, title=kind.title,
        make_command=kind.make_command, start_command=kind.start_command,
        q_kind=shlex.quote(kind.name), q_kind_module=shlex.quote(kind.registered_in),
        q_name=shlex.quote(name), q_python=shlex.quote(python or sys.executable),
        q_workdir=shlex.quote(workdir or os.getcwd()), base_dir_line=base_dir_line,
        std_log=STD_LOG, set_args=_set_args(server_args),
        client_key=("--client-key " + shlex.quote(os.path.abspath(client_key)) + " ")
        if client_key else "")


def _split_make_args(argv: Sequence[str], parser: argparse.ArgumentParser,
                     ) -> tuple[list[str], list[str]]:
    """``(the make command's own arguments, the service's arguments)``, the latter in
    their order and unchanged. Only the make command's exact flags (``-name X`` or
    ``-name=X``, ``--help``) are taken; argparse is never asked to guess what a service
    flag is (it would read ``-http_port`` as ``-h ttp_port``)."""
    takes_value = {opt: action.nargs != 0 for action in parser._actions
                   for opt in action.option_strings}
    own: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if arg == "--":  # what follows is the service's, whatever it looks like
            rest += args[i:]
            break
        if arg in takes_value:
            own.append(arg)
            if takes_value[arg] and i + 1 < len(args):
                own.append(args[i + 1])
                i += 1
        elif "=" in arg and takes_value.get(flag):
            own.append(arg)
        else:
            rest.append(arg)
        i += 1
    return own, rest


def build_make_parser(kind: str | ServiceKind = "server") -> argparse.ArgumentParser:
    """The parser of the make command of ``kind`` (``wkr-serving-make`` for a server):
    its own flags only; every other argument goes to the service unchanged."""
    kind = get_kind(kind)
    prog = kind.make_command
    parser = argparse.ArgumentParser(
        prog=prog, add_help=False, allow_abbrev=False,
        usage=f"{prog} <{kind.start_command} arguments> -name NAME [-dir DIR] "
        "[-client_key FILE] > run_script.sh",
        description=f"Print a POSIX sh run script (sh run_script.sh start|stop|stopf|"
        f"restart|status) for a {kind.title}. Every other argument is passed to "
        f"{kind.start_command} unchanged; the worker class and relative paths are resolved "
        "from the current directory.")
    parser.add_argument("--help", action="help", help="show this help message and exit")
    parser.add_argument("-name", required=True,
                        help="service name: NAME.pid next to logs/std.log")
    parser.add_argument("-dir", default=None,
                        help="where NAME.pid and logs/ go (default: the script's directory)")
    parser.add_argument("-client_key", default=None,
                        help="a client .key_secret the script's readiness probe uses, for a "
                        "service started with -curve_client_keys")
    return parser


def main_make(argv: Sequence[str] | None = None, kind: str | ServiceKind = "server") -> int:
    """``wkr-serving-make <wkr-serving-start args> -name NAME [-dir DIR]``: print the run
    script of a service of ``kind`` (a ``*-make`` command of another kind is this call
    with its kind)."""
    kind = get_kind(kind)
    prog = kind.make_command
    parser = build_make_parser(kind)
    own, server_args = _split_make_args(sys.argv[1:] if argv is None else argv, parser)
    try:
        args = parser.parse_args(own)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the script: keep it clean
            config = kind.parse(server_args)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit:  # argparse printed what is wrong (or -h / -version output)
        print(f"{prog}: error: no script made: check the {kind.start_command} arguments "
              "(above)", file=sys.stderr)
        return 2
    problem = service_problem(kind, config, args.client_key)
    if problem is None:
        try:
            script = make_script(server_args, args.name, args.dir, client_key=args.client_key,
                                 kind=kind)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(script)
    return 0


# -- wkr-serving-terminate -------------------------------------------------------------------


def port_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (bounded)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_server(status: ServerStatus, ports: tuple[int, int]) -> list[psutil.Process]:
    """The server's processes when it runs on this host: its supervisor (the
    ventilator's parent) and the supervisor's descendants; empty when the pids in the
    status are not a local process listening on the server's ports (or, from an older
    server, missing: KeyError)."""
    with contextlib.suppress(psutil.Error, KeyError, TypeError, ValueError):
        vent = psutil.Process(int(status["ventilator_pid"]))
        supervisor = psutil.Process(int(status["supervisor_pid"]))
        if vent.ppid() != supervisor.pid:
            return []
        listening = {c.laddr.port for c in vent.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        if not listening & set(ports):
            return []
        return [supervisor, *supervisor.children(recursive=True)]
    return []


def build_terminate_parser() -> argparse.ArgumentParser:
    """The ``wkr-serving-terminate`` parser."""
    parser = argparse.ArgumentParser(
        prog="wkr-serving-terminate", allow_abbrev=False,
        description="Send the terminate command to a WKR server (it drains in-flight work "
        "and exits), then wait until it has stopped: its processes have exited when it "
        "runs on this host, and its ports no longer accept connections. Exit status: 0 "
        "stopped, 1 still running after -timeout, 2 usage error, refused or unreachable.")
    add_connection_args(parser)
    parser.add_argument("-timeout", type=float, default=60.0,
                        help="seconds to wait for the server to confirm it stopped")
    parser.add_argument("-token", default=os.environ.get("WKR_AUTH_TOKEN"),
                        help="the server's -auth_token (default: $WKR_AUTH_TOKEN); without "
                        "one, only a server on this host accepts the command")
    return parser


def main_terminate(argv: Sequence[str] | None = None) -> int:
    """``wkr-serving-terminate``: stop a server and wait until it has stopped.

    Exit status: 0 stopped, 1 still running at the deadline, 2 usage error, refused
    (unauthorized) or no server answering."""
    args = build_terminate_parser().parse_args(argv)

    def fail(message: str, code: int = 2) -> int:
        print(f"wkr-serving-terminate: {'error: ' if code == 2 else ''}{message}",
              file=sys.stderr)
        return code

    if args.timeout <= 0:
        return fail("-timeout must be > 0 seconds")
    where = f"{args.ip}:{args.port}/{args.port_out}"
    deadline = time.monotonic() + args.timeout
    connect_ms = max(1, int(min(args.timeout, 10.0) * 1000))
    host = args.ip.strip("[]")
    if not port_answers(host, args.port, min(args.timeout, 2.0)):
        return fail(f"no server is listening at {host}:{args.port}")
    hint = "" if args.server_public_key else (
        " (a server started with -curve_secret_key also needs -server_public_key)")
    try:
        client = connect_any(args, connect_ms)
    except ConnectTimeout:
        return fail(f"no WKR server answered at {where} within {connect_ms / 1000:g}s{hint}")
    except (WKRError, ValueError, OSError) as exc:
        return fail(f"cannot connect to {where}: {str(exc).splitlines()[0]}{hint}")
    local: list[psutil.Process] = []
    pid: int | None = None
    try:
        with contextlib.suppress(ServerError, WKRTimeoutError):
            status: ServerStatus = client.server_status
            local = _local_server(status, (args.port, args.port_out))
            # .get: any server may be asked to stop, an older version's included
            pid = status.get("supervisor_pid")
        try:
            reply = client.terminate(args.token)
            pid = reply.get("supervisor_pid", pid) if isinstance(reply, dict) else pid
            print(f"terminate accepted by the server at {where} (supervisor pid {pid})")
        except Unauthorized as exc:
            return fail(f"the server at {where} refused: {exc.message}")
        except ShuttingDown:
            print(f"the server at {where} is already stopping (supervisor pid {pid})")
        except ConnectionLost:
            print(f"the server at {where} dropped the connection (stopping)")
        except WKRTimeoutError as exc:
            return fail(f"no answer to terminate from {where}: {exc}", 1)
    finally:
        client.close()

    if local:
        print(f"waiting up to {args.timeout:g}s for its {len(local)} process(es) on this "
              f"host to exit")
        left = [p.pid for p in local
                if not wait_pid_exit(p.pid, max(0.0, deadline - time.monotonic()), p)]
        if left:
            return fail(f"still running after {args.timeout:g}s: processes {left} of the "
                        f"server at {where}", 1)
    else:
        print(f"waiting up to {args.timeout:g}s for {where} to stop accepting connections")
    pause = threading.Event()
    while True:
        open_ports = [p for p in (args.port, args.port_out)
                      if port_answers(host, p, min(1.0, max(0.05, deadline -
                                                            time.monotonic())))]
        if not open_ports:
            break
        if time.monotonic() >= deadline:
            return fail(f"still running after {args.timeout:g}s: {host} port(s) "
                        f"{open_ports} still accept connections", 1)
        pause.wait(0.05)
    print(f"the server at {where} has stopped"
          + (f" (supervisor pid {pid} exited)" if local else ""))
    return 0


if __name__ == "__main__":
    # Run the imported module's helper, not this __main__ copy's: kinds registered by
    # other modules (register_kind) land in the imported module's KINDS.
    from wkr_serving.server import runscript

    sys.exit(runscript.main_helper())
