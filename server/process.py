"""Plumbing shared by the role processes: endpoints, the supervisor link, the child entry.

A role object is built in the supervisor with plain data only (config, endpoints,
indices); everything else (logger, ZeroMQ context, sockets, the model) is created in
:meth:`Role.run` inside the child, after spawn.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import zmq
from wkr_serving.client import protocol as P
from wkr_serving.client.process import bind_public, die_with_parent

from .config import ServerConfig
from .logs import route_other_logs, set_logger

__all__ = ["ABSTRACT_IPC", "EXIT_BOOT_FAILED", "BootError", "Endpoints", "Role", "bind_internal",
           "bind_port", "bind_public", "drain", "run_role"]

#: A role that cannot start (bad model, port in use) exits with this code; the
#: supervisor stops the server instead of restarting it.
EXIT_BOOT_FAILED = 3


#: Milliseconds a closing socket may spend flushing messages already queued.
LINGER_MS = 2000


class BootError(RuntimeError):
    """A role cannot start, for a reason its message says in full (a port in use...):
    reported without a traceback."""


#: Linux has an abstract namespace for unix sockets (``ipc://@name``): names, not files,
#: released by the kernel with the last socket, so a server killed by SIGKILL leaves
#: nothing behind. Elsewhere the sockets are files in a directory (:meth:`Endpoints.in_dir`).
ABSTRACT_IPC = sys.platform.startswith("linux")
#: The internal sockets, in the order of :class:`Endpoints`' fields.
ENDPOINT_NAMES = ("control", "workers", "sink", "feedback")
#: Longest abstract socket name: ``sun_path`` (108 bytes) less the leading NUL byte.
ABSTRACT_NAME_MAX = 107
#: Random bytes in each abstract name: others cannot guess (and take first) a name that
#: is not bound yet, and two servers of one pid (a container's pid 1...) never share one.
ABSTRACT_RANDOM_BYTES = 8


@dataclass(frozen=True)
class Endpoints:
    """Internal IPC addresses of one server instance."""

    control: str  # supervisor ROUTER; every role connects a DEALER named after itself
    workers: str  # ventilator ROUTER; workers connect DEALERs
    sink: str  # sink PULL; workers and the ventilator connect PUSHes
    feedback: str  # ventilator PULL; the sink connects a PUSH (congestion, dead batches)

    @classmethod
    def in_dir(cls, path: str) -> Endpoints:
        """Socket files in ``path`` (a private directory the caller removes at stop)."""
        return cls(*(f"ipc://{os.path.join(path, n)}" for n in ENDPOINT_NAMES))

    @classmethod
    def abstract(cls, pid: int | None = None) -> Endpoints:
        """New abstract-namespace endpoints (Linux): ``ipc://@wkr-<pid>-<random>-<name>``.

        Each socket gets its own random part, so seeing one bound name (in
        /proc/net/unix) tells nothing of the others, which are bound later."""
        pid = os.getpid() if pid is None else pid
        names = [f"wkr-{pid}-{secrets.token_hex(ABSTRACT_RANDOM_BYTES)}-{n}"
                 for n in ENDPOINT_NAMES]
        for name in names:
            if len(name.encode()) > ABSTRACT_NAME_MAX:  # cannot happen with a real pid
                raise ValueError(f"abstract socket name too long: {name}")
        return cls(*(f"ipc://@{name}" for name in names))


def bind_internal(socket: zmq.Socket, address: str) -> None:
    """Bind an internal endpoint so that only processes of this user can connect.

    A socket file lives in a directory of mode 0700; an abstract socket has no file and
    no permissions at all (any local user can read its name in /proc/net/unix and
    connect), so the kernel's peer credentials are checked instead (``IPC_FILTER_UID``):
    another user's connection is closed before any message is read."""
    if address.startswith("ipc://@"):
        socket.setsockopt(zmq.IPC_FILTER_UID, os.getuid())
    socket.bind(address)


class Role:
    """Base of the ventilator, sink and worker processes."""

    name = "role"
    color = "white"

    def __init__(self, config: ServerConfig, endpoints: Endpoints) -> None:
        self.config = config
        self.endpoints = endpoints
        self.logger: logging.Logger = logging.getLogger("wkr_serving")
        self.context: zmq.Context | None = None
        self.control: zmq.Socket | None = None
        self._authenticator: Any = None

    @property
    def identity(self) -> str:
        return self.name

    def run(self) -> int:
        """Child entry: connect to the supervisor, boot, serve; returns the exit code."""
        # Ctrl-C and SIGTERM reach the whole process group (or cgroup); stopping is the
        # supervisor's job, so roles ignore them and die only with it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        die_with_parent()
        self.logger = set_logger(self.identity, self.config.log_dir, self.config.log_name,
                                 self.config.verbose, self.color, self.config.log_format)
        if self.config.log_format == "json":  # libraries' records and warnings too
            route_other_logs(self.logger)
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, LINGER_MS)
        self.control.setsockopt(zmq.IDENTITY, self.identity.encode())
        self.control.connect(self.endpoints.control)
        try:
            try:
                info = self.boot()
            except Exception as exc:
                if isinstance(exc, BootError):  # its message says it all
                    text, error = "", str(exc)
                    self.logger.error("failed to start: %s", exc)
                else:
                    text, error = traceback.format_exc(), f"{type(exc).__name__}: {exc}"
                    self.logger.error("failed to start: %s\n%s", exc, text)
                self.event("boot_failed", {"error": error, "traceback": text,
                                           "pid": os.getpid()})
                return EXIT_BOOT_FAILED
            self.event("ready", {"pid": os.getpid(), **(info or {})})
            self.serve()
            return 0
        finally:
            self.shutdown()
            if self._authenticator is not None:
                self._authenticator.stop()
            # Each socket keeps its own LINGER: sockets towards the sink flush, the
            # others (to a ventilator that may be gone) do not hold the exit.
            self.context.destroy()

    def event(self, name: str, value: Any = None) -> None:
        """Tell the supervisor something (ready, boot_failed, drained...)."""
        assert self.control is not None
        self.control.send(P.pack([P.PROTOCOL_VERSION, P.EVENT, name, value]))

    def read_control(self) -> tuple[str, Any]:
        """Receive one CONTROL message from the supervisor as ``(name, value)``."""
        assert self.control is not None
        header = P.unpack_header(self.control.recv(), expect=P.CONTROL)
        return header[2], header[3]

    def secure_public(self, socket: zmq.Socket) -> None:
        """Apply the public-port protections to ``socket`` before it binds: the frame size
        limit and, with ``-curve_secret_key``, CurveZMQ encryption and authentication."""
        if self.config.max_msg_size > 0:
            socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_msg_size)
        if not self.config.curve_secret_key:
            return
        from .security import load_server_key, start_authenticator

        if self._authenticator is None:
            assert self.context is not None
            self._authenticator = start_authenticator(self.context, self.config, self.logger)
        public, secret = load_server_key(self.config.curve_secret_key)
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True

    def boot(self) -> dict[str, Any] | None:
        """Bind/connect sockets and load what is needed; return info for the ready event."""
        raise NotImplementedError

    def serve(self) -> None:
        """The main loop; returns when the supervisor says stop."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what :meth:`boot` acquired (sockets close with the context)."""


def bind_port(socket: zmq.Socket, host: str, port: int, flag: str) -> int:
    """:func:`bind_public`, with a port that cannot be bound reported as a
    :class:`BootError` naming ``flag`` (one line, no traceback)."""
    try:
        return bind_public(socket, host, port)
    except zmq.ZMQError as exc:
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc}"
        raise BootError(f"port {port} on {host} ({flag} {port}) {why}") from None


#: Most messages a role reads from one socket before it looks at its others, so a
#: flood on one cannot starve the rest.
MAX_DRAIN = 256
# Socket options and flags as plain ints: pyzmq's enum wrappers cost more than the
# call on the per-message path.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SNDMORE = int(zmq.SNDMORE)
#: ``send_frames`` flag: do not block (a full queue raises ``zmq.Again``).
NOBLOCK = int(zmq.NOBLOCK)


def readable(socket: zmq.Socket) -> bool:
    """Whether ``socket`` has a message waiting (``EVENTS`` as plain ints)."""
    return bool(socket.get(_EVENTS) & _POLLIN)  # type: ignore[operator]


def send_frames(socket: zmq.Socket, frames: list[Any], flags: int = 0,
                copy: bool = True) -> None:
    """Send ``frames`` as one message: ``send_multipart`` without its per-call type
    checks and enum arithmetic, which cost as much as the sends on the per-request path.
    Only the first frame can fail for a full queue or an unknown peer; once it is taken,
    libzmq takes the others."""
    last = len(frames) - 1
    for n in range(last):
        socket.send(frames[n], flags | _SNDMORE, copy=copy)
    socket.send(frames[last], flags, copy=copy)


def drain(socket: zmq.Socket, handler: Any, limit: int) -> int:
    """Handle up to ``limit`` waiting messages of ``socket``; return how many.

    Checks ``EVENTS`` between reads instead of ending on a raised ``zmq.Again``, which
    costs more than the read itself on the per-request path.
    """
    n = 0
    while n < limit and readable(socket):
        handler(socket.recv_multipart(copy=False))
        n += 1
    return n


def spin(sockets: tuple[zmq.Socket, ...], limit_us: int) -> bool:
    """Busy-poll (``-busy_poll_us``): look at ``sockets`` without blocking until one has
    a message (True) or ``limit_us`` microseconds passed (False). A role that spins
    before it blocks is running when the next message comes, instead of being woken by
    it: on virtual machines and power-saving hosts a wake-up costs tens of microseconds
    of latency. The price is the CPU it burns while it waits."""
    deadline = time.perf_counter() + limit_us / 1e6
    while True:
        for socket in sockets:
            if readable(socket):
                return True
        if time.perf_counter() >= deadline:
            return False


def run_role(role: Role) -> None:
    """Module-level process target, so roles can be started with the spawn method."""
    code = role.run()
    if code:
        sys.exit(code)
