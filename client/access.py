"""Who may send a command that stops or changes a service (server or pool).

One rule for both: with a token configured, the token is required from everywhere
(compared in constant time); without one, only peers on the service's own host
(loopback) are accepted. Read-only commands (status) need neither.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import zmq

__all__ = ["authorize", "is_local", "peer_address"]


def peer_address(frame: zmq.Frame) -> str | None:
    """The sender's IP address as libzmq saw it (None for IPC and inproc peers)."""
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return None
    return address if isinstance(address, str) else None


def is_local(peer: str | None) -> bool:
    """Whether a peer address is this host (loopback). The public ports are TCP, so a
    peer without an address is not trusted."""
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def authorize(token: str | None, args: Any, peer: str | None, what: str = "server",
              flag: str = "-auth_token") -> str | None:
    """Why a command that stops or changes the service is refused (None: allowed).
    ``args`` is the command's argument mapping; its ``token`` is checked."""
    if token is not None:
        given = args.get("token") if isinstance(args, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(),
                                                                 token.encode()):
            return f"this command needs the {what}'s {flag}"
        return None
    if not is_local(peer):
        return (f"this command is only accepted from the {what}'s own host (peer {peer}) "
                f"unless the {what} has an {flag}")
    return None
