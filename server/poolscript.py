"""``wkr-decentral-make``: run scripts for a decentralized pool.

The pool is one more kind of service for the run-script generator and helper of
:mod:`.runscript` (the same POSIX sh script, pid file, ``logs/std.log``, start / stop /
stopf / restart / status). It lives in the server package because the helper does (it
needs psutil); the pool itself runs with the client package alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from wkr_serving.client.errors import WKRTimeoutError
from wkr_serving.client.pool import KILL_GRACE_S
from wkr_serving.client.pool_cli import load_pool_config, summarize
from wkr_serving.client.pool_config import PoolConfig
from wkr_serving.client.pool_control import PoolControl, PoolTimeout

from .runscript import (
    MARGIN_S,
    ServiceKind,
    build_make_parser,
    main_make,
    probe_address,
    register_kind,
)

__all__ = ["POOL_KIND", "build_make_pool_parser", "main_make_pool"]

#: Seconds a pool gets to answer its first status (its units start in the background).
POOL_START_S = 60.0


def _connect(config: PoolConfig, client_key: str | None, connect_ms: int,
             timeout_ms: int) -> PoolControl:
    return PoolControl(probe_address(config.bind), config.port, timeout_ms / 1000,
                       config.auth_token)


def _status(control: PoolControl) -> dict[str, Any]:
    try:
        return dict(control.call("status"))
    except PoolTimeout as exc:
        raise WKRTimeoutError(str(exc)) from None


POOL_KIND = register_kind(ServiceKind(
    name="pool", module="wkr_serving.client.pool_cli", start_command="wkr-decentral-start",
    make_command="wkr-decentral-make", parse=lambda args: load_pool_config(args)[0],
    ports=lambda c: {"-port": c.port, "-port_out": c.port_out},
    check=lambda config, client_key: None,
    start_timeout=lambda c: POOL_START_S + MARGIN_S,
    stop_timeout=lambda c: c.graceful_timeout + KILL_GRACE_S + MARGIN_S,
    connect=_connect, status=_status, ready=lambda status: bool(status.get("ready")),
    summarize=summarize,
    fallback=lambda: PoolConfig("unknown.Unit", "[[localhost, 1, 2]]"),
    registered_in=__name__, title="wkr-decentral pool"))


def build_make_pool_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-make`` parser (its own flags; the rest go to the pool)."""
    return build_make_parser(POOL_KIND)


def main_make_pool(argv: Sequence[str] | None = None) -> int:
    """``wkr-decentral-make <wkr-decentral-start args> -name NAME > run_script.sh``."""
    return main_make(argv, POOL_KIND)


if __name__ == "__main__":
    sys.exit(main_make_pool())
