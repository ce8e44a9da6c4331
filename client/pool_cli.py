"""The pool's commands: ``wkr-decentral-start`` and the control commands.

``wkr-decentral-start decentralize.ProcessingModel -port P -port_out Q -http_port H
-num_client N -remote_servers '[["127.0.0.1", 8996, 8998]]' -log_dir D`` runs a pool in
the foreground until SIGTERM/Ctrl-C or ``wkr-decentral-terminate``.

``wkr-decentral-status | -switch | -idle | -restart | -terminate`` each take ``-ip
-port -port_out -timeout`` (and ``-token``). Exit status: 0 done, 1 no answer within
``-timeout`` (or, for terminate, still running then), 2 usage error or refused.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .loader import import_class
from .pool_config import PoolConfig, PoolConfigError, parse_remote_servers
from .pool_control import PoolControl, PoolRefused, PoolTimeout, port_open
from .process import serve_until_signalled
from .unit import WKRWorker
from .version import __version__

__all__ = ["build_idle_parser", "build_restart_parser", "build_start_parser",
           "build_status_parser", "build_switch_parser", "build_terminate_parser",
           "config_from_args", "load_pool_config", "main_idle", "main_restart", "main_start",
           "main_status", "main_switch", "main_terminate", "summarize"]

ENV_TOKEN = "WKR_AUTH_TOKEN"


def _parser(prog: str, description: str, full: bool = True) -> argparse.ArgumentParser:
    # No -h: the seed's single-dash flags (-http_port) would be read as -h + "ttp_port".
    parser = argparse.ArgumentParser(prog=prog, description=description, add_help=False,
                                     allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if full:
        parser.add_argument("--help", action="help", help="show this help and exit")
        parser.add_argument("-version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _servers_arg(words: Sequence[str] | None) -> Any:
    """``-remote_servers`` as given: one JSON word, or the unquoted form split by the shell."""
    return None if words is None else " ".join(words)


def build_start_parser(unit_class: type[WKRWorker] | None = None, full: bool = True,
                       ) -> argparse.ArgumentParser:
    """The ``wkr-decentral-start`` parser, with ``unit_class``'s own options. Not
    ``full``: no help or version, nothing required (to find the unit class first)."""
    parser = _parser("wkr-decentral-start", "Start a decentralized pool: num_client units "
                     "of the given WKRWorker class per remote server.", full)
    parser.add_argument("unit_class", nargs=None if full else "?",
                        help="<file>.<Class> of the unit (a WKRWorker "
                        "subclass), file in the current directory, or an installed "
                        "module's class such as wkr_serving.client.QueueWorker")
    parser.add_argument("-remote_servers", nargs="+", required=full, metavar="SERVERS",
                        help="the WKR servers to feed: '[[\"ip\", port, port_out], ...]'")
    parser.add_argument("-num_client", type=int, default=1, help="units per remote server")
    parser.add_argument("-port", type=int, default=21324,
                        help="control port (status, switch, idle, restart, terminate)")
    parser.add_argument("-port_out", type=int, default=21326,
                        help="events port (PUB: one JSON message per state change)")
    parser.add_argument("-http_port", type=int, default=None,
                        help="HTTP port for /status, /health and /metrics (default: none)")
    parser.add_argument("-bind", default="0.0.0.0", help="address the ports bind to")
    parser.add_argument("-log_dir", default=None,
                        help="write <log_name>.log and <log_name>.err here, not stderr")
    parser.add_argument("-log_name", default="WKRDecentralize", help="base name of the logs")
    parser.add_argument("-verbose", action="store_true", help="debug logging")
    parser.add_argument("-graceful_timeout", type=float, default=30.0,
                        help="seconds a stopping unit may take before it is killed")
    parser.add_argument("-restart_backoff", type=float, default=0.5,
                        help="first pause (s) before restarting a unit that died")
    parser.add_argument("-max_restart_backoff", type=float, default=30.0,
                        help="longest pause (s) between restarts of a failing unit")
    parser.add_argument("-auth_token", default=os.environ.get(ENV_TOKEN),
                        help=f"token required by switch/idle/restart/terminate (default: "
                        f"${ENV_TOKEN}); without one only this host may send them")
    if unit_class is not None:
        group = parser.add_argument_group(f"options of {unit_class.__name__}")
        unit_class.add_arguments(group)  # type: ignore[arg-type]
    return parser


def load_pool_config(argv: Sequence[str]) -> tuple[PoolConfig, type[WKRWorker]]:
    """Parse ``wkr-decentral-start`` arguments; import the unit class (from the cwd)."""
    first, _ = build_start_parser(full=False).parse_known_args(argv)
    if first.unit_class is None:  # --help, or an error naming what is missing
        build_start_parser().parse_args(argv)
        raise PoolConfigError("the unit class (<file>.<Class>) is required")
    try:
        unit_class = import_class(first.unit_class, WKRWorker)
    except Exception as exc:
        raise PoolConfigError(f"cannot load {first.unit_class}: {type(exc).__name__}: "
                              f"{exc}") from None
    return config_from_args(build_start_parser(unit_class).parse_args(argv)), unit_class


def config_from_args(args: Any, unit_class: str | None = None) -> PoolConfig:
    """A :class:`PoolConfig` from parsed ``wkr-decentral-start`` arguments (a namespace
    or a mapping); every option that is not the pool's own is the unit's."""
    values = dict(args) if isinstance(args, Mapping) else dict(vars(args))
    parser = build_start_parser(full=False)
    own = {a.dest for a in parser._actions} - {"unit_class"}
    pool = {name: values.get(name, parser.get_default(name)) for name in own}
    servers = pool.pop("remote_servers")
    if isinstance(servers, list) and all(isinstance(word, str) for word in servers):
        servers = " ".join(servers)  # the words of the command line
    return PoolConfig(unit_class=unit_class or str(values.get("unit_class")),
                      remote_servers=servers, **pool,
                      unit_options={k: v for k, v in values.items()
                                    if k not in own and k != "unit_class"})


def main_start(argv: Sequence[str] | None = None) -> int:
    from .pool import Central

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, unit_class = load_pool_config(argv)
    except PoolConfigError as exc:
        print(f"wkr-decentral-start: error: {exc}", file=sys.stderr)
        return 2
    rows = sorted(config.as_dict(redact=True).items())
    print("\n".join(f"{k:>22} = {v}" for k, v in rows), file=sys.stderr, flush=True)
    return serve_until_signalled(Central(config, unit_class))


# -- control commands ------------------------------------------------------------------------


def _control_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = _parser(f"wkr-decentral-{name}", description)
    parser.add_argument("-ip", default="localhost", help="the pool's address")
    parser.add_argument("-port", type=int, default=21324, help="the pool's control -port")
    parser.add_argument("-port_out", type=int, default=21326,
                        help="the pool's events -port_out (accepted for compatibility)")
    parser.add_argument("-timeout", type=float, default=10.0,
                        help="seconds to wait for the answer")
    parser.add_argument("-token", default=os.environ.get(ENV_TOKEN),
                        help=f"the pool's -auth_token (default: ${ENV_TOKEN})")
    return parser


def _run(prog: str, args: argparse.Namespace, cmd: str, **cmd_args: Any) -> tuple[int, Any]:
    if args.timeout <= 0:
        print(f"{prog}: error: -timeout must be > 0", file=sys.stderr)
        return 2, None
    try:
        with PoolControl(args.ip, args.port, args.timeout, args.token) as control:
            return 0, control.call(cmd, **cmd_args)
    except PoolTimeout as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1, None
    except PoolRefused as exc:
        print(f"{prog}: error: the pool refused: {exc}", file=sys.stderr)
        return 2, None


def build_status_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-status`` parser."""
    parser = _control_parser("status", "Show a pool's units and remote servers.")
    parser.add_argument("-json", action="store_true", help="print the whole status as JSON")
    return parser


def main_status(argv: Sequence[str] | None = None) -> int:
    parser = build_status_parser()
    args = parser.parse_args(argv)
    code, status = _run(parser.prog, args, "status")
    if code == 0:
        print(json.dumps(status, indent=2) if args.json else summarize(status))
    return code


def summarize(status: dict[str, Any]) -> str:
    lines = [f"pool pid {status['pid']}: {status['state']}, {status['units_running']}/"
             f"{status['units_wanted']} unit(s) running, {status['iterations']} "
             f"iteration(s), {status['errors']} error(s), {status['restarts']} restart(s)"]
    for server in status["servers"]:
        reach = {True: "reachable", False: "UNREACHABLE", None: "not probed yet"}[
            server["reachable"]]
        lines.append(f"  server {server['server']}: {reach}, {server['units_running']}/"
                     f"{server['units']} unit(s) running")
    for unit in status["units"]:
        extra = f", last error: {unit['last_error']}" if unit["last_error"] else ""
        counters = "".join(f", {k} {v}" for k, v in sorted(unit["counters"].items()))
        lines.append(f"  unit-{unit['unit']} ({unit['server']}, pid {unit['pid']}): "
                     f"{unit['state']}, {unit['iterations']} iteration(s), {unit['errors']} "
                     f"error(s), {unit['restarts']} restart(s){counters}{extra}")
    return "\n".join(lines)


def build_switch_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-switch`` parser."""
    parser = _control_parser("switch", "Change a pool's units per server and/or its "
                             "remote servers (units of removed servers stop gracefully).")
    parser.add_argument("-num_client", type=int, default=None, help="units per server")
    parser.add_argument("-remote_servers", nargs="+", default=None, metavar="SERVERS",
                        help="the new server list '[[\"ip\", port, port_out], ...]'")
    return parser


def main_switch(argv: Sequence[str] | None = None) -> int:
    parser = build_switch_parser()
    args = parser.parse_args(argv)
    if args.num_client is None and args.remote_servers is None:
        parser.error("give -num_client and/or -remote_servers")
    servers = None
    if args.remote_servers is not None:
        try:
            servers = [list(s) for s in parse_remote_servers(_servers_arg(args.remote_servers))]
        except PoolConfigError as exc:
            parser.error(str(exc))
    code, value = _run(parser.prog, args, "switch", num_client=args.num_client,
                       remote_servers=servers)
    if code == 0:
        print(f"switched: {value['num_client']} unit(s) for each of "
              f"{', '.join(f'{s[0]}:{s[1]}/{s[2]}' for s in value['remote_servers'])}")
    return code


def _plain_command(name: str, parser: argparse.ArgumentParser, report: Any,
                   argv: Sequence[str] | None) -> int:
    """A control command without options of its own: send it, print ``report(value)``."""
    args = parser.parse_args(argv)
    code, value = _run(parser.prog, args, name)
    if code == 0:
        print(report(value))
    return code


def build_idle_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-idle`` parser."""
    return _control_parser("idle", "Stop every unit of a pool (gracefully); the pool keeps "
                           "running until switch or restart.")


def main_idle(argv: Sequence[str] | None = None) -> int:
    return _plain_command("idle", build_idle_parser(),
                          lambda v: f"idle: {v['stopping_units']} unit(s) stopping", argv)


def build_restart_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-restart`` parser."""
    return _control_parser("restart", "Restart every unit of a pool (each finishes its "
                           "current work first).")


def main_restart(argv: Sequence[str] | None = None) -> int:
    return _plain_command("restart", build_restart_parser(),
                          lambda v: f"restarting {v['restarting']} unit(s)", argv)


def build_terminate_parser() -> argparse.ArgumentParser:
    """The ``wkr-decentral-terminate`` parser."""
    return _control_parser("terminate", "Stop a pool and wait until it has stopped: its "
                           "process has exited (pool on this host) and its control port "
                           "refuses connections.")


def main_terminate(argv: Sequence[str] | None = None) -> int:
    parser = build_terminate_parser()
    args = parser.parse_args(argv)
    deadline = time.monotonic() + max(args.timeout, 0.0)
    code, value = _run(parser.prog, args, "terminate")
    if code:
        return code
    pid = value.get("pid")
    print(f"terminate accepted by the pool at {args.ip}:{args.port} (pid {pid})")
    if isinstance(pid, int) and _is_local_host(args.ip):
        _wait_pid(pid, deadline)
    pause = threading.Event()
    while port_open(args.ip, args.port):
        if time.monotonic() >= deadline:
            print(f"{parser.prog}: the pool is still running after {args.timeout:g}s",
                  file=sys.stderr)
            return 1
        pause.wait(0.05)
    print("the pool has stopped")
    return 0


def _is_local_host(ip: str) -> bool:
    return ip.strip("[]") in ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def _wait_pid(pid: int, deadline: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(fd)


if __name__ == "__main__":  # the run scripts start a pool as python -m this module
    sys.exit(main_start())
