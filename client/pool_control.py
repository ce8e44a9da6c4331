"""The pool's control protocol, and the client the ``wkr-decentral-*`` commands use.

The central binds a ROUTER on ``-port``. A command is one frame, a msgpack map
``{"id": int, "cmd": str, "args": map}``; its reply is one frame ``{"id": same int,
"ok": bool, "value": any}`` or ``{"id", "ok": false, "error": kind, "message": str}``,
on the same connection, so every request gets its own reply. Commands: ``ping``,
``status`` (open to all), and ``switch``, ``idle``, ``restart``, ``terminate``, which
need the pool's ``-auth_token`` (``args["token"]``) or a peer on the pool's host.

The central also binds a PUB on ``-port_out`` that publishes every state change as a
JSON frame (``{"event": ..., ...}``), for monitoring.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

import msgpack
import zmq

__all__ = ["COMMANDS", "CONTROL_COMMANDS", "MAX_COMMAND_BYTES", "PoolControl",
           "PoolControlError", "PoolRefused", "PoolTimeout", "decode_command",
           "encode_reply", "port_open"]

COMMANDS = ("ping", "status", "switch", "idle", "restart", "terminate")
#: Commands that change or stop the pool: token or local peer only.
CONTROL_COMMANDS = frozenset({"switch", "idle", "restart", "terminate"})
#: Largest command frame the central accepts (enforced by ZeroMQ).
MAX_COMMAND_BYTES = 1 << 20


class PoolControlError(Exception):
    """A control command failed."""


class PoolTimeout(PoolControlError):
    """No reply from the pool within the timeout."""


class PoolRefused(PoolControlError):
    """The pool answered with an error (``kind`` says which: Unauthorized, BadRequest...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def decode_command(frame: bytes) -> tuple[Any, str, dict[str, Any]]:
    """``(id, cmd, args)`` of a command frame; raises ValueError saying what is wrong
    (the id, when readable, is in ``args`` of the error so the reply can carry it)."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=0,
                                  max_ext_len=0)
    except Exception as exc:
        raise ValueError(f"not a msgpack command: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ValueError("a command is a msgpack map")
    req_id = message.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ValueError("the command has no integer id")
    cmd, args = message.get("cmd"), message.get("args", {})
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise _Bad(req_id, f"unknown command {str(cmd)[:40]!r}; known: {', '.join(COMMANDS)}")
    if not isinstance(args, dict):
        raise _Bad(req_id, "the command's args must be a map")
    return req_id, cmd, args


class _Bad(ValueError):
    def __init__(self, req_id: int, message: str) -> None:
        super().__init__(message)
        self.req_id = req_id


def encode_reply(req_id: Any, value: Any = None, error: tuple[str, str] | None = None,
                 ) -> bytes:
    if error is not None:
        return msgpack.packb({"id": req_id, "ok": False, "error": error[0],
                              "message": error[1]})
    return msgpack.packb({"id": req_id, "ok": True, "value": value}, default=str)


class PoolControl:
    """A connection to a pool's control port. Each call waits at most ``timeout`` s."""

    def __init__(self, ip: str = "localhost", port: int = 21324, timeout: float = 10.0,
                 token: str | None = None) -> None:
        self.address = f"tcp://{ip if ':' not in ip or ip.startswith('[') else f'[{ip}]'}" \
                       f":{port}"
        self.timeout = timeout
        self.token = token
        self._ids = itertools.count(1)
        self.context: zmq.Context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IPV6, 1)
        self.socket.setsockopt(zmq.IDENTITY, f"ctl-{os.getpid()}-{id(self):x}".encode())
        self.socket.connect(self.address)

    def call(self, cmd: str, **args: Any) -> Any:
        """Send ``cmd`` and return its value; raise PoolRefused or PoolTimeout."""
        if cmd in CONTROL_COMMANDS and self.token is not None:
            args["token"] = self.token
        req_id = next(self._ids)
        self.socket.send(msgpack.packb({"id": req_id, "cmd": cmd, "args": args}))
        deadline_ms = int(self.timeout * 1000)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        end = time.monotonic() + self.timeout
        while True:
            left = int((end - time.monotonic()) * 1000)
            if left <= 0 or not poller.poll(left):
                raise PoolTimeout(f"no answer from the pool at {self.address} to {cmd!r} "
                                  f"within {deadline_ms / 1000:g}s")
            reply = msgpack.unpackb(self.socket.recv(), raw=False)
            if not isinstance(reply, dict) or reply.get("id") != req_id:
                continue  # a late reply to an earlier call that timed out
            if reply.get("ok"):
                return reply.get("value")
            raise PoolRefused(str(reply.get("error")), str(reply.get("message")))

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self) -> PoolControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def port_open(ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``ip:port`` (bounded by ``timeout``)."""
    try:
        with socket.create_connection((ip.strip("[]"), port), timeout=timeout):
            return True
    except OSError:
        return False
