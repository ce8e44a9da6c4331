"""The decentralized pool's central process: supervise N units per remote server.

The central never touches the work itself. It starts ``num_client`` unit processes
(:mod:`.pool_unit`) for each remote server, restarts a unit that dies (with a growing
pause, reset once a unit has run for a while), answers control commands on ``-port``
(:mod:`.pool_control`), publishes state changes on ``-port_out``, and serves status,
health and metrics over HTTP on ``-http_port`` (:mod:`.pool_http`).

Stopping is cooperative first: a unit's stop event is set, its loop ends after the
current ``do_work`` and ``off_model`` runs; a unit still alive ``-graceful_timeout``
seconds later is killed.

    with WKRDecentralizeCentral(ProcessingModel, config) as pool:   # units started
        ...                                                        # stopped on exit
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from .access import authorize, peer_address
from .logs import set_logger
from .pool_config import (
    PoolConfig,
    PoolConfigError,
    RemoteServer,
    check_units,
    parse_remote_servers,
)
from .pool_control import (
    CONTROL_COMMANDS,
    MAX_COMMAND_BYTES,
    decode_command,
    encode_reply,
    port_open,
)
from .pool_unit import EXIT_BOOT_FAILED, UnitSpec, run_unit
from .process import StoppableLoop, bind_public
from .unit import WKRWorker
from .version import __version__

__all__ = ["Central", "WKRDecentralizeCentral"]

#: A unit that ran this long before dying starts again without the growing pause.
STABLE_AFTER_S = 30.0
#: Seconds between two reachability probes of the remote servers.
PROBE_EVERY_S = 2.0
#: Seconds a killed unit may take to disappear before the central stops waiting.
KILL_GRACE_S = 5.0


@dataclass
class Slot:
    """One unit place: a remote server and a process serving it (restarted in place)."""

    index: int
    server: RemoteServer
    position: int  # 0..num_client-1 among the units of its server
    generation: int = 0
    process: Any = None
    stop_event: Any = None
    state: str = "pending"
    pid: int | None = None
    started_at: float = 0.0
    start_at: float = 0.0  # monotonic time of the next (re)start
    kill_at: float | None = None  # monotonic time a stopping unit gets SIGKILL
    stopping: bool = False
    wanted: bool = True  # False: remove the slot once its process is gone
    restarts: int = 0
    failures_in_row: int = 0
    iterations: int = 0
    errors: int = 0
    last_error: str | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        ip, port, port_out = self.server
        return {"unit": self.index, "server": f"{ip}:{port}/{port_out}", "state": self.state,
                "pid": self.pid, "iterations": self.iterations, "errors": self.errors,
                "restarts": self.restarts, "last_error": self.last_error,
                "counters": dict(self.counters)}


class Central(StoppableLoop):
    """The pool's supervisor loop (run it in the main thread or in a thread)."""

    def __init__(self, config: PoolConfig, unit_class: type[WKRWorker]) -> None:
        super().__init__()
        if not (isinstance(unit_class, type) and issubclass(unit_class, WKRWorker)):
            raise TypeError("the unit class must be a subclass of WKRWorker")
        self.config = config
        self.unit_class = unit_class
        self.servers: tuple[RemoteServer, ...] = config.remote_servers
        self.num_client = config.num_client
        self.idle = False
        self.slots: dict[tuple[RemoteServer, int], Slot] = {}
        self.logger = logging.getLogger("wkr_serving.central")
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.settled = threading.Event()  # ready, or the loop ended
        self.port: int | None = None
        self.port_out: int | None = None
        self.http_port: int | None = None
        self.snapshot: dict[str, Any] = {}
        self.reachable: dict[str, bool | None] = {}
        self._next_index = 0
        self._started = time.monotonic()
        self._mp = multiprocessing.get_context("spawn")
        self._report_endpoint = f"ipc://@wkr-pool-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._http: Any = None
        self._dirty = True


    # -- the loop -------------------------------------------------------------------------

    def serve(self) -> int:
        """Bind, start the units, supervise until stopped; return the exit code."""
        self.logger = set_logger("central", self.config.log_dir, self.config.log_name,
                                 self.config.verbose, "magenta")
        context = zmq.Context()
        try:
            try:
                self._bind(context)
            except (zmq.ZMQError, OSError) as exc:
                self.logger.error("cannot start the pool: %s", exc)
                return 1
            self._apply_target()
            self.ready.set()
            self.snapshot = self._build_snapshot()
            self.logger.info("pool ready: control port %s, events port %s%s; %d unit(s) "
                             "for %d server(s)", self.port, self.port_out,
                             f", http port {self.http_port}" if self.http_port else "",
                             len(self.slots), len(self.servers))
            self.settled.set()
            self._loop()
            return 0
        finally:
            self._shutdown(context)

    def _bind(self, context: zmq.Context) -> None:
        self.control = context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.events = context.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 500)
        self.events.setsockopt(zmq.SNDHWM, 10_000)
        self.reports = context.socket(zmq.PULL)
        self.reports.setsockopt(zmq.LINGER, 0)
        self.reports.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)  # a report is small
        self.reports.bind(self._report_endpoint)
        self.port = bind_public(self.control, self.config.bind, self.config.port)
        self.port_out = bind_public(self.events, self.config.bind, self.config.port_out)
        if self.config.http_port is not None:
            from .pool_http import start_http

            self._http = start_http(self, self.config.bind, self.config.http_port)
            self.http_port = self._http.server_port
        threading.Thread(target=self._probe_servers, name="probe", daemon=True).start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.reports, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        watched: dict[int, Slot] = {}
        stopping = False
        while True:
            if self.stop_reason is not None and not stopping:
                stopping = True
                self._stop_all()
            if stopping and not self.slots:
                return
            for fd in set(watched) - {s.process.sentinel for s in self._live()}:
                poller.unregister(fd)
                del watched[fd]
            for slot in self._live():
                if slot.process.sentinel not in watched:
                    watched[slot.process.sentinel] = slot
                    poller.register(slot.process.sentinel, zmq.POLLIN)
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self._wake.read_fd in events:
                self._wake.drain()
            if self.control in events:
                self._drain(self.control, self._on_command)
            if self.reports in events:
                self._drain(self.reports, self._on_report)
            for fd, slot in list(watched.items()):
                if fd in events:
                    self._reap(slot)
            self._tick()
            if self._dirty:
                self.snapshot = self._build_snapshot()
                self._dirty = False

    def _live(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.process is not None]

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [s.start_at for s in self.slots.values() if s.process is None and s.wanted
               and not s.stopping and self.stop_reason is None]
        due += [s.kill_at for s in self.slots.values() if s.kill_at is not None]
        wait = min([d - now for d in due], default=1.0)
        return max(0, min(1000, int(wait * 1000) + 1))

    def _drain(self, sock: zmq.Socket, handler: Any) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    def _tick(self) -> None:
        """Start what is due, kill what overstayed its stop."""
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.process is None:
                if not slot.wanted or self.stop_reason is not None:
                    del self.slots[(slot.server, slot.position)]
                    self._dirty = True
                elif now >= slot.start_at:
                    self._start(slot)
            elif slot.kill_at is not None and now >= slot.kill_at:
                self.logger.warning("unit-%d did not stop within %.1fs: killing pid %s",
                                    slot.index, self.config.graceful_timeout, slot.pid)
                with contextlib.suppress(Exception):
                    slot.process.kill()
                slot.kill_at = now + KILL_GRACE_S

    # -- units ----------------------------------------------------------------------------

    def _apply_target(self) -> None:
        """Make the slots match ``servers`` x ``num_client`` (unless idle)."""
        wanted = set() if self.idle else {(server, k) for server in self.servers
                                          for k in range(self.num_client)}
        for key, slot in self.slots.items():
            if key not in wanted and slot.wanted:
                slot.wanted = False
                self._stop(slot, "no longer in the pool")
            elif key in wanted and not slot.wanted:  # wanted again while stopping:
                slot.wanted = True  # started again once its process is gone
        for key in sorted(wanted - set(self.slots), key=lambda k: (self.servers.index(k[0]),
                                                                    k[1])):
            self.slots[key] = Slot(index=self._next_index, server=key[0], position=key[1])
            self._next_index += 1
        self._dirty = True

    def _start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.stop_event = self._mp.Event()
        spec = UnitSpec(self.unit_class, slot.index, slot.generation, slot.server,
                        dict(self.config.unit_options), self._report_endpoint,
                        self.config.log_dir, self.config.log_name, self.config.verbose)
        process = self._mp.Process(target=run_unit, args=(spec, slot.stop_event),
                                   name=f"unit-{slot.index}")
        process.start()
        slot.process, slot.pid, slot.state = process, process.pid, "starting"
        slot.started_at = time.monotonic()
        slot.stopping, slot.kill_at = False, None
        self._publish("unit_started", unit=slot.index, pid=slot.pid,
                      server=slot.row()["server"])
        self._dirty = True

    def _stop(self, slot: Slot, why: str) -> None:
        if slot.process is None or slot.stopping:
            return
        self.logger.info("stopping unit-%d (pid %s): %s", slot.index, slot.pid, why)
        slot.stopping, slot.state = True, "stopping"
        slot.stop_event.set()
        slot.kill_at = time.monotonic() + self.config.graceful_timeout
        self._dirty = True

    def _stop_all(self) -> None:
        self.logger.info("stopping the pool (%s)", self.stop_reason)
        self._publish("stopping", reason=self.stop_reason)
        for slot in self.slots.values():
            slot.wanted = False
            self._stop(slot, self.stop_reason or "stop")

    def _reap(self, slot: Slot) -> None:
        process = slot.process
        process.join(0)
        if process.exitcode is None:
            return
        code = process.exitcode
        process.close()
        slot.process, slot.kill_at = None, None
        asked = slot.stopping
        slot.stopping = False
        self._dirty = True
        self._publish("unit_exited", unit=slot.index, pid=slot.pid, code=code, asked=asked)
        if asked:  # started again by _tick if still wanted (restart), else removed
            slot.state, slot.start_at = "stopped", time.monotonic()
            return
        slot.restarts += 1
        ran_for = time.monotonic() - slot.started_at
        slot.failures_in_row = 1 if ran_for >= STABLE_AFTER_S else slot.failures_in_row + 1
        pause = min(self.config.max_restart_backoff,
                    self.config.restart_backoff * 2 ** min(slot.failures_in_row - 1, 30))
        why = ("get_model failed" if code == EXIT_BOOT_FAILED else
               f"was killed by {signal.Signals(-code).name}" if code < 0 else
               f"exited with code {code}")
        if code != EXIT_BOOT_FAILED or not slot.last_error:
            slot.last_error = f"unit {why}"
        slot.state, slot.start_at = "backoff", time.monotonic() + pause
        log = self.logger.warning if code != EXIT_BOOT_FAILED else self.logger.info
        log("unit-%d (pid %s) %s; restarting in %.2fs", slot.index, slot.pid, why, pause)

    def _on_report(self, frames: list[zmq.Frame]) -> None:
        try:
            report = json.loads(frames[-1].bytes)
            slot = next((s for s in self.slots.values() if s.index == report["unit"]), None)
            if slot is None or report.get("gen") != slot.generation:
                return
            state = str(report["state"])
        except (ValueError, KeyError, TypeError):
            self.logger.warning("ignored a malformed unit report")
            return
        if state == "running" and slot.state != "running" and not slot.stopping:
            self._publish("unit_ready", unit=slot.index, pid=slot.pid)
        elif state == "boot_failed":
            self._publish("unit_boot_failed", unit=slot.index, pid=slot.pid,
                          error=report.get("last_error"))
        if not slot.stopping or state == "stopped":
            slot.state = state
        for name in ("iterations", "errors"):
            if isinstance(report.get(name), int):
                setattr(slot, name, report[name])
        if report.get("last_error"):
            slot.last_error = str(report["last_error"])
        if isinstance(report.get("counters"), dict):
            slot.counters = report["counters"]
        self._dirty = True

    # -- commands -------------------------------------------------------------------------

    def _on_command(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            return  # not a DEALER command: nothing to answer to
        identity, frame = frames
        try:
            req_id, cmd, args = decode_command(frame.bytes)
        except ValueError as exc:
            self._reply(identity, getattr(exc, "req_id", None), error=("BadRequest", str(exc)))
            return
        if cmd in CONTROL_COMMANDS:
            refusal = authorize(self.config.auth_token, args, peer_address(frame), "pool")
            if refusal is not None:
                self.logger.warning("refused %s from %s: %s", cmd, peer_address(frame),
                                    refusal)
                self._reply(identity, req_id, error=("Unauthorized", refusal))
                return
        try:
            if cmd in CONTROL_COMMANDS and cmd != "terminate" and self.stop_reason:
                raise ValueError("the pool is stopping")
            value = getattr(self, f"_cmd_{cmd}")(args)
        except (PoolConfigError, ValueError, TypeError) as exc:
            self._reply(identity, req_id, error=("BadRequest", str(exc)))
            return
        self._reply(identity, req_id, value)

    def _reply(self, identity: zmq.Frame, req_id: Any, value: Any = None,
               error: tuple[str, str] | None = None) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.control.send_multipart([identity, encode_reply(req_id, value, error)],
                                        zmq.NOBLOCK)

    def _cmd_ping(self, args: dict[str, Any]) -> str:
        return "pong"

    def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._build_snapshot()

    def _cmd_switch(self, args: dict[str, Any]) -> dict[str, Any]:
        unknown = set(args) - {"num_client", "remote_servers", "token"}
        if unknown:
            raise ValueError(f"switch takes num_client and remote_servers, not "
                             f"{', '.join(sorted(unknown))}")
        servers = self.servers
        if args.get("remote_servers") is not None:
            servers = parse_remote_servers(args["remote_servers"])
        num = self.num_client
        if args.get("num_client") is not None:
            num = args["num_client"]
            if not isinstance(num, int) or isinstance(num, bool) or num < 0:
                raise ValueError("num_client must be an integer >= 0")
        check_units(servers, num)
        self.servers, self.num_client, self.idle = servers, num, False
        self.logger.info("switch: %d unit(s) for each of %s", num,
                         ", ".join(f"{s[0]}:{s[1]}/{s[2]}" for s in servers))
        self._apply_target()
        self._publish("switched", num_client=num, remote_servers=[list(s) for s in servers])
        return {"num_client": num, "remote_servers": [list(s) for s in servers]}

    def _cmd_idle(self, args: dict[str, Any]) -> dict[str, Any]:
        self.idle = True
        self._apply_target()
        self._publish("idle")
        return {"idle": True, "stopping_units": sum(1 for s in self.slots.values()
                                                   if s.process is not None)}

    def _cmd_restart(self, args: dict[str, Any]) -> dict[str, Any]:
        self.idle = False
        self._apply_target()
        for slot in self.slots.values():
            if slot.wanted and slot.process is not None:  # started again once gone
                self._stop(slot, "restart")
            slot.start_at = time.monotonic()
        self._publish("restarting")
        return {"restarting": len(self.slots)}

    def _cmd_terminate(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("terminate command")
        return {"stopping": True, "pid": os.getpid()}

    # -- status ---------------------------------------------------------------------------

    def _build_snapshot(self) -> dict[str, Any]:
        units = [s.row() for s in sorted(self.slots.values(), key=lambda s: s.index)]
        servers = []
        for ip, port, port_out in self.servers:
            name = f"{ip}:{port}/{port_out}"
            mine = [u for u in units if u["server"] == name]
            servers.append({"server": name, "reachable": self.reachable.get(name),
                            "units": len(mine),
                            "units_running": sum(u["state"] == "running" for u in mine)})
        state = "stopping" if self.stop_reason else "idle" if self.idle else "running"
        return {"state": state, "ready": self.ready.is_set() and not self.stop_reason,
                "pid": os.getpid(), "version": __version__,
                "unit_class": f"{self.unit_class.__module__}.{self.unit_class.__qualname__}",
                "uptime_s": round(time.monotonic() - self._started, 3),
                "num_client": self.num_client, "units_wanted": 0 if self.idle else
                len(self.servers) * self.num_client,
                "units_running": sum(u["state"] == "running" for u in units),
                "iterations": sum(u["iterations"] for u in units),
                "errors": sum(u["errors"] for u in units),
                "restarts": sum(u["restarts"] for u in units),
                "units": units, "servers": servers,
                "ports": {"port": self.port, "port_out": self.port_out,
                          "http_port": self.http_port},
                "config": self.config.as_dict(redact=True)}

    def _publish(self, event: str, **fields: Any) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.events.send_json({"event": event, "time": time.time(), **fields},
                                  zmq.NOBLOCK)

    def _probe_servers(self) -> None:
        """Background thread: is each remote server's pair of ports accepting?"""
        pause = threading.Event()
        while not self.finished.is_set():
            for ip, port, port_out in self.servers:
                name = f"{ip}:{port}/{port_out}"
                ok = all(port_open(ip, p) for p in (port, port_out))
                if self.reachable.get(name) != ok:
                    self.reachable = {**self.reachable, name: ok}
                    self.request_wake()
            pause.wait(PROBE_EVERY_S)

    def request_wake(self) -> None:
        self._dirty = True
        self._wake.wake()

    def _shutdown(self, context: zmq.Context) -> None:
        for slot in self._live():  # only after an error in the loop itself
            with contextlib.suppress(Exception):
                slot.process.kill()
        self.snapshot = {**self._build_snapshot(), "state": "stopped", "ready": False}
        with contextlib.suppress(Exception):
            self._publish("stopped")
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.finished.set()
        self.settled.set()
        context.destroy(linger=500)
        self._wake.close()
        self.logger.info("pool stopped")


class WKRDecentralizeCentral(threading.Thread):
    """A pool whose central loop runs in this thread (units are child processes).

    ``WKRDecentralizeCentral(ProcessingModel, args)`` where ``args`` is a
    :class:`PoolConfig`, or ``wkr-decentral-start``'s parsed arguments (a namespace or
    a mapping, e.g. ``build_start_parser(ProcessingModel).parse_args([...])``);
    ``start()`` then ``join()`` as in the original package, or use it as a context
    manager (returns once the ports are bound and the units started)."""

    def __init__(self, unit_class: type[WKRWorker], args: Any) -> None:
        super().__init__(name="WKRDecentralizeCentral", daemon=True)
        if not isinstance(args, PoolConfig):
            from .pool_cli import config_from_args

            args = config_from_args(args, f"{unit_class.__module__}.{unit_class.__name__}")
        self.central = Central(args, unit_class)
        self.exit_code: int | None = None

    @property
    def port(self) -> int | None:
        return self.central.port

    @property
    def port_out(self) -> int | None:
        return self.central.port_out

    @property
    def http_port(self) -> int | None:
        return self.central.http_port

    @property
    def status(self) -> dict[str, Any]:
        return self.central.snapshot

    def run(self) -> None:
        try:
            self.exit_code = self.central.serve()
        finally:
            self.central.finished.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the ports are bound and the units started (raise if it failed)."""
        self.central.settled.wait(timeout)
        if not self.central.ready.is_set():
            raise RuntimeError("the pool did not start (see its log)")

    def close(self, timeout: float | None = None) -> None:
        self.central.request_stop("close()")
        if self.is_alive():
            self.join(timeout)

    def __enter__(self) -> WKRDecentralizeCentral:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
