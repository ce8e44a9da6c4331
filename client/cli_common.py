"""What the command-line tools that talk to a running server share: the connection
flags (``-ip -port -port_out -protocol -server_public_key -client_key``) and a client
that finds the server's protocol by itself."""

from __future__ import annotations

import argparse
from typing import Any

from .base import DEFAULT_PORT, DEFAULT_PORT_OUT
from .client import WKRClient
from .errors import ClientUsageError, ProtocolMismatch
from .protocol import PROTOCOL_NAMES, PROTOCOLS, normalize_protocol

__all__ = ["add_connection_args", "connect_any"]


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags that say where the server is and how to reach it."""
    parser.add_argument("-ip", default="localhost", help="server address")
    parser.add_argument("-port", type=int, default=DEFAULT_PORT, help="the server's -port")
    parser.add_argument("-port_out", type=int, default=DEFAULT_PORT_OUT,
                        help="the server's -port_out")
    parser.add_argument("-protocol", default=None, choices=PROTOCOL_NAMES,
                        help="the server's protocol (default: detected; npy is numpy)")
    parser.add_argument("-server_public_key", default=None,
                        help="the server's CurveZMQ public key (.key file or Z85 text)")
    parser.add_argument("-client_key", default=None,
                        help="this client's .key_secret, for a server with "
                        "-curve_client_keys")


def connect_any(args: argparse.Namespace, connect_ms: int,
                timeout_ms: int | None = None) -> WKRClient:
    """A client of the server named by :func:`add_connection_args`' flags, whatever
    protocol it speaks (``-protocol`` is tried first). ``timeout_ms``: the client's call
    timeout (default: the connect timeout, at least a second)."""
    order = [normalize_protocol(args.protocol)] if args.protocol else []
    order += [p for p in PROTOCOLS if p not in order]
    curve: dict[str, Any] = {}
    if args.server_public_key:
        curve["server_public_key"] = args.server_public_key
    if args.client_key:
        curve["client_key"] = args.client_key
    last: Exception | None = None
    for protocol in order:
        try:
            return WKRClient(args.ip, args.port, args.port_out, protocol=protocol,
                             check_version=False, connect_timeout=connect_ms,
                             timeout=timeout_ms if timeout_ms is not None
                             else max(connect_ms, 1000), **curve)
        except ProtocolMismatch as exc:
            last = exc
    raise ClientUsageError(f"the server speaks no protocol this client knows: {last}")
