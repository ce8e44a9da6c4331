"""The decentralized pool's settings: one frozen object, and the remote-server list parser.

``-remote_servers`` is read as JSON (``'[["10.0.0.1", 8996, 8998]]'``) or in the
original package's unquoted form, which the shell splits into several words
(``[[10.0.0.1, 8996, 8998], [10.0.0.2, 8996, 8998]]``): the words are joined again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_UNITS", "PoolConfig", "PoolConfigError", "RemoteServer", "check_units",
           "parse_remote_servers"]

#: Most units one pool runs (servers x num_client): each is a process.
MAX_UNITS = 1024

#: ``(ip, port, port_out)`` of one remote WKR server.
RemoteServer = tuple[str, int, int]

_GROUP = re.compile(r"\[\s*['\"]?([^'\",\[\]\s]+)['\"]?\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")


class PoolConfigError(ValueError):
    """A pool setting is missing or invalid."""


def parse_remote_servers(value: str | Sequence[Any]) -> tuple[RemoteServer, ...]:
    """``[[ip, port, port_out], ...]`` from JSON text, the unquoted form, or a list."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = _parse_unquoted(text)
    if not isinstance(value, (list, tuple)) or not value:
        raise PoolConfigError("-remote_servers must be a non-empty list of "
                              "[ip, port, port_out]")
    servers = []
    for entry in value:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 3
                or not isinstance(entry[0], str) or not entry[0]):
            raise PoolConfigError(f"-remote_servers: each server is [ip, port, port_out], "
                                  f"got {entry!r}")
        try:
            port, port_out = int(entry[1]), int(entry[2])
        except (TypeError, ValueError):
            raise PoolConfigError(f"-remote_servers: ports must be numbers in {entry!r}") \
                from None
        if not (0 < port <= 65535 and 0 < port_out <= 65535) or port == port_out:
            raise PoolConfigError(f"-remote_servers: two different TCP ports needed in "
                                  f"{entry!r}")
        servers.append((entry[0], port, port_out))
    if len(set(servers)) != len(servers):
        raise PoolConfigError("-remote_servers lists a server twice")
    return tuple(servers)


def check_units(servers: Sequence[RemoteServer], num_client: int) -> None:
    """Refuse a pool of more than :data:`MAX_UNITS` unit processes."""
    if len(servers) * num_client > MAX_UNITS:
        raise PoolConfigError(f"{len(servers)} server(s) x {num_client} unit(s) is more "
                              f"than the {MAX_UNITS} unit processes a pool may run")


def _parse_unquoted(text: str) -> list[list[Any]]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise PoolConfigError(f"-remote_servers: cannot read {text!r} (expected "
                              "[[ip, port, port_out], ...])")
    inner = inner[1:-1]
    groups = list(_GROUP.finditer(inner))
    leftover = _GROUP.sub("", inner).replace(",", "").strip()
    if not groups or leftover:
        raise PoolConfigError(f"-remote_servers: cannot read {text!r} (expected "
                              "[[ip, port, port_out], ...])")
    return [[m.group(1), int(m.group(2)), int(m.group(3))] for m in groups]


@dataclass(frozen=True)
class PoolConfig:
    """Settings of ``wkr-decentral-start``. Times are in seconds."""

    unit_class: str
    remote_servers: tuple[RemoteServer, ...]
    num_client: int = 1
    port: int = 21324
    port_out: int = 21326
    bind: str = "0.0.0.0"
    http_port: int | None = None
    log_dir: str | None = None
    log_name: str = "WKRDecentralize"
    verbose: bool = False
    graceful_timeout: float = 30.0
    #: First and largest pause before restarting a unit that died or failed to start.
    restart_backoff: float = 0.5
    max_restart_backoff: float = 30.0
    auth_token: str | None = None
    #: The unit class's own options (its ``add_arguments``), by name.
    unit_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_client < 0:
            raise PoolConfigError("-num_client must be >= 0")
        object.__setattr__(self, "remote_servers", parse_remote_servers(self.remote_servers))
        check_units(self.remote_servers, self.num_client)
        for name, port in (("port", self.port), ("port_out", self.port_out),
                           ("http_port", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise PoolConfigError(f"-{name} must be a TCP port number, got {port}")
        if self.port and self.port == self.port_out:
            raise PoolConfigError("-port and -port_out must differ")
        if self.graceful_timeout < 0:
            raise PoolConfigError("-graceful_timeout must be >= 0")
        if not 0 < self.restart_backoff <= self.max_restart_backoff:
            raise PoolConfigError("need 0 < -restart_backoff <= -max_restart_backoff")
        if self.auth_token is not None and not self.auth_token:
            raise PoolConfigError("-auth_token must not be empty")

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["remote_servers"] = [list(s) for s in self.remote_servers]
        if redact and values["auth_token"] is not None:
            values["auth_token"] = "<redacted>"
        values["unit_options"] = {k: ("<redacted>" if redact and "password" in k else v)
                                  for k, v in self.unit_options.items()}
        return values
