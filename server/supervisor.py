"""The supervisor: starts the roles, watches them, restarts dead workers, stops cleanly.

It never touches traffic. Its loop waits on three things at once: events from the roles
(a ROUTER on an IPC socket), the roles' process sentinels (a readable fd means the
process ended), and a wake-up pipe written by signal handlers and :meth:`request_stop`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from wkr_serving.client.process import StoppableLoop

from . import messages as M
from .config import ServerConfig
from .devices import DeviceError, assign_devices, describe, discover_gpus
from .http import state as http_state
from .http.bridge import HTTPBridge
from .logs import JsonFormatter, log_base, set_logger
from .process import EXIT_BOOT_FAILED, Role, bind_internal, run_role
from .scratch import ServerDirs
from .sink import Sink
from .status import WorkerHistory
from .ventilator import Ventilator
from .worker import WKRHardWorker, WorkerProcess

__all__ = ["StartupError", "Supervisor"]

#: Seconds a role gets to exit after being told to stop, before SIGKILL (roles ignore
#: SIGTERM: the supervisor orchestrates stopping).
STOP_GRACE = 5.0
#: Least time a role is given to stop before it is killed, even when the graceful
#: timeout is spent: enough for one that is not busy to flush its sockets and exit.
MIN_STOP_GRACE = 0.25
#: A role (the ventilator, the sink, a bridge) that dies more often than this within
#: RESTART_WINDOW seconds halts the server; so do workers dying that often with no
#: request in hand (a worker dying *with* requests is their doing: see the ventilator's
#: quarantine).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: A worker slot whose restarted process fails to boot this many times in a row halts
#: the server (a first start that fails halts it at once).
MAX_BOOT_FAILURES = 3
#: Seconds to wait for the boot_failed event of a role seen exiting with
#: EXIT_BOOT_FAILED (the event is sent before the exit, so it is already under way).
BOOT_EVENT_WAIT = 2.0


class StartupError(RuntimeError):
    """The server could not start (a model failed to load, a port was taken...)."""


@dataclass
class _Child:
    role: Role
    process: Any  # multiprocessing.Process of the spawn context
    ready: bool = False
    handled: bool = False  # its exit was dealt with
    info: dict[str, Any] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)  # recent restart times
    total_restarts: int = 0
    hung: bool = False  # killed by us after -worker_timeout
    boot_failures: int = 0  # restarts in a row that failed to boot
    replaces: str | None = None  # a recycled worker's replacement: the one it replaces
    replaced_by: str | None = None  # a recycled worker: its replacement
    switching: bool = False  # a replacement loading the model switched to

    def retiring_done(self, code: int) -> bool:
        """Whether this exit is a recycled worker leaving as told, not a crash."""
        return self.replaced_by is not None and code == 0


class Supervisor(StoppableLoop):
    stop_reason: str | None  # set by request_stop (StoppableLoop)

    def __init__(self, config: ServerConfig, worker_class: type[WKRHardWorker],
                 logger: logging.Logger | None = None) -> None:
        super().__init__()
        self.config = config
        self.worker_class = worker_class
        self.logger = logger or set_logger("SUPERVISOR", config.log_dir, config.log_name,
                                           config.verbose, "cyan", config.log_format)
        self.mp = multiprocessing.get_context("spawn")
        self.children: dict[str, _Child] = {}
        self.failure: str | None = None
        #: The one line of a role's boot failure (``ValueError: no such model``), for the
        #: console when the traceback went to the log files.
        self.boot_error: str | None = None
        self.drained = False
        self.registered: list[int] = []  # worker indices the ventilator can dispatch to
        self.port: int | None = None
        self.port_out: int | None = None
        self.http_port: int | None = None
        self.http_state: str | None = None  # the bridge processes' shared directory
        self.started_at = time.time()
        self.ventilator_generation = 0  # ventilators started after the first
        self.generations: dict[int, int] = {}  # worker slot -> its latest generation
        self.idle_deaths: list[float] = []  # when workers died with nothing in hand
        self.recycle_queue: deque[str] = deque()  # workers waiting to be recycled
        #: Worker slot -> its restarts and last error, for a restarted ventilator's status.
        self.worker_history: dict[int, WorkerHistory] = {}
        self._hangups_seen = 0
        #: The models served, by epoch (0: the first; one more per switch begun):
        #: name, version, dir, epoch and the workers' get_metadata().
        self.models: dict[int, dict[str, Any]] = {0: {
            "name": config.model_name, "version": config.model_version,
            "dir": config.model_dir, "epoch": 0, "metadata": None}}
        self.epoch = 0  # the model every worker serves (the one switched from, meanwhile)
        self.switch: dict[str, Any] | None = None  # the last switch's state (status)
        self.switch_target: tuple[ServerConfig, int] | None = None  # its config and epoch
        self.switch_queue: deque[str] = deque()  # workers still to switch
        self._switch_started = 0.0  # monotonic
        self.started = False  # every role was ready once (a switch waits for it)
        self._event_handlers: dict[str, Callable[[str, _Child, Any], None]] = {
            M.Event.READY: self._event_ready,
            M.Event.BOOT_FAILED: self._event_boot_failed,
            M.Event.DRAINED: self._event_drained,
            M.Event.WORKERS: self._event_workers,
            M.Event.TERMINATE: self._event_terminate,
            M.Event.WORKER_HUNG: self._event_worker_hung,
            M.Event.WORKER_LOST: self._event_worker_lost,
            M.Event.RECYCLE: self._event_recycle,
            M.Event.SWITCH: self._event_switch,
        }

    # -- public -------------------------------------------------------------------------


    def serve(self, on_ready: Any = None) -> int:
        """Start, wait until ready, supervise until stopped; return the exit code."""
        self._dirs = ServerDirs.create(self.config)  # sockets, scratch; stale ones removed
        self.endpoints, self.config = self._dirs.endpoints, self._dirs.config
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind_internal(self.control, self.endpoints.control)
        try:
            self._start_roles()
            self._wait_ready()
            if self.failure is None and self.stop_reason is None:
                self.logger.info("ready: port %s, port_out %s, %d worker(s)%s", self.port,
                                 self.port_out, self.config.num_worker,
                                 f", HTTP on port {self.http_port}" if self.http_port else "")
                self.started = True
                if on_ready is not None:
                    on_ready()
                while self.failure is None and self.stop_reason is None:
                    self._tick(1000)
        except DeviceError as exc:
            self.failure = str(exc)
        except Exception as exc:  # a bug here must still stop the children
            self.failure = f"supervisor error: {type(exc).__name__}: {exc}"
            self.logger.exception("supervisor error")
        finally:
            self._shutdown()
        if self.failure:
            self.logger.error("stopped: %s", self.failure)
            self._tell_console()
            return 1
        self.logger.info("stopped cleanly (%s)", self.stop_reason)
        return 0

    # -- start --------------------------------------------------------------------------

    def _start_roles(self) -> None:
        existing, free = discover_gpus(self.logger)
        devices = assign_devices(self.config.num_worker, self.config.device_map,
                                 self.config.cpu, existing, free)
        self.logger.info("device assignment: %s", ", ".join(
            f"{M.worker_identity(i)}={describe(d)}" for i, d in enumerate(devices)))
        self._spawn(Sink(self.config, self.endpoints))
        self._spawn(Ventilator(self.config, self.endpoints, self.started_at))
        for index, device_id in enumerate(devices):
            self._spawn(WorkerProcess(self.config, self.endpoints, index, device_id,
                                      self.worker_class))

    def _spawn(self, role: Role, restarts: list[float] | None = None) -> None:
        process = self.mp.Process(target=run_role, args=(role,), name=role.identity)
        process.start()
        self.children[role.identity] = _Child(role, process, restarts=restarts or [])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while self.failure is None and self.stop_reason is None:
            if (all(c.ready for c in self.children.values())
                    and len(self.registered) >= self.config.num_worker
                    and (self.config.http_port is None
                         or len(self._bridges()) == self.config.http_workers)):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waiting = sorted(n for n, c in self.children.items() if not c.ready)
                self.failure = (f"not ready after -startup_timeout {self.config.startup_timeout}s"
                                f": still waiting for {', '.join(waiting)}")
                return
            self._tick(int(min(remaining, 1.0) * 1000))

    # -- loop ---------------------------------------------------------------------------

    def _tick(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        # Reading exitcode reaps a dead child, after which its sentinel may never fire:
        # a child found dead here is handled directly, the others are watched.
        exited: list[str] = []
        sentinels: dict[int, str] = {}
        for name, child in self.children.items():
            if child.handled:
                continue
            if child.process.exitcode is not None:
                exited.append(name)
            else:
                sentinels[child.process.sentinel] = name
        for fd in sentinels:
            poller.register(fd, zmq.POLLIN)
        events = dict(poller.poll(0 if exited else timeout_ms))
        if self._wake.read_fd in events:
            self._read_wakeups()
        if self.control in events:
            self._read_events()
        exited += [name for fd, name in sentinels.items() if fd in events]
        for name in exited:
            self._on_exit(name)

    def _read_wakeups(self) -> None:
        """A signal or another thread woke the loop: to stop (``stop_reason`` is set),
        or, for SIGHUP, to have the workers reopen their prediction logs."""
        self._wake.drain()
        if self.hangups != self._hangups_seen:
            self._hangups_seen = self.hangups
            self.logger.info("SIGHUP: the workers reopen their prediction logs")
            self._tell_workers(M.Control.HANGUP)

    def _on_event(self, frames: list[bytes]) -> None:
        name = frames[0].decode(errors="replace")
        event, value = M.parse_event(frames[1])
        child = self.children.get(name)
        handler = self._event_handlers.get(event)
        if child is not None and handler is not None:
            handler(name, child, value or {})

    def _event_ready(self, name: str, child: _Child, value: Any) -> None:
        child.ready = True
        child.boot_failures = 0
        child.info = value
        self.port = child.info.get("port", self.port)
        self.port_out = child.info.get("port_out", self.port_out)
        self.http_port = child.info.get("http_port", self.http_port)
        self._maybe_start_bridge()
        if name == "http-0":
            self._start_more_bridges()
        if isinstance(child.role, Ventilator):
            self._tell_model()
            if child.total_restarts:
                self._tell_workers(M.Control.REANNOUNCE)  # it knows no idle worker yet
        elif child.total_restarts and isinstance(child.role, Sink):
            self._send("ventilator", M.Control.SINK_RESTARTED)
        elif isinstance(child.role, WorkerProcess):
            model = self.models.get(child.role.epoch)
            if model is not None and model["metadata"] is None:
                model["metadata"] = child.info.get("metadata") or {}
                self._tell_model()
            if child.replaces:
                self._send(child.replaces, M.Control.RETIRE)  # the old one may go now
            elif child.switching:  # the worker it replaced died meanwhile
                child.switching = False
                self._slot_switched()

    def _event_boot_failed(self, name: str, child: _Child, value: Any) -> None:
        error = str(value.get("error") or "unknown error")
        if child.total_restarts or child.replaces:
            # A restarted role that cannot start again: its exit is one more restart
            # (repeated failure stops the server, with this error).
            child.info = {"boot_error": error}
            return
        self.boot_error = self.boot_error or f"{name} failed to start: {error}"
        trace = value.get("traceback")
        self.failure = self.failure or (f"{self.boot_error}\n{trace}" if trace
                                        else self.boot_error)

    def _event_drained(self, name: str, child: _Child, value: Any) -> None:
        self.drained = True

    def _event_workers(self, name: str, child: _Child, value: Any) -> None:
        self.registered = list(value)

    def _event_terminate(self, name: str, child: _Child, value: Any) -> None:
        if name == "ventilator":
            self.logger.warning("terminate command received from %s", value.get("peer"))
            self.request_stop("terminate command")

    def _event_worker_hung(self, name: str, child: _Child, value: Any) -> None:
        if name == "ventilator":
            self._kill_hung(value["index"], value["pid"])

    def _event_worker_lost(self, name: str, child: _Child, value: Any) -> None:
        """The ventilator says what a dead worker held. Dying with work in hand is the
        input's doing (the ventilator retries or quarantines it); dying idle, again and
        again, is a broken environment: then the server stops."""
        if name != "ventilator" or value.get("held"):
            return
        now = time.monotonic()
        self.idle_deaths = [t for t in self.idle_deaths if now - t < RESTART_WINDOW] + [now]
        if len(self.idle_deaths) > MAX_RESTARTS:
            self.failure = self.failure or (
                f"workers died {len(self.idle_deaths)} times in {RESTART_WINDOW:.0f}s with "
                f"no request in hand (last: {M.worker_identity(value['index'])}, pid "
                f"{value['pid']}); giving up")

    def _event_recycle(self, name: str, child: _Child, value: Any) -> None:
        """A worker reached -max_requests or -max_worker_rss: start its replacement; it
        serves on until the replacement is ready (then it is told to retire). One worker
        is recycled at a time, so the server holds at most one extra worker process."""
        if not isinstance(child.role, WorkerProcess) or child.replaced_by or child.handled:
            return
        if name not in self.recycle_queue:
            self.logger.info("%s (pid %s) asks to be recycled: %s", name, child.process.pid,
                             value.get("reason"))
            self.recycle_queue.append(name)
        self._next_recycle()

    def _next_recycle(self) -> None:
        """Start the next replacement, unless a worker is being replaced now: one for
        the model switch under way, else for the next worker waiting to be recycled
        (its replacement serves the same model)."""
        if any(c.replaced_by for c in self.children.values() if not c.handled):
            return
        if self.switch_target is not None and self._next_switch():
            return
        while self.recycle_queue:
            name = self.recycle_queue.popleft()
            child = self.children.get(name)
            if child is None or child.handled or not isinstance(child.role, WorkerProcess):
                continue
            self._replace(child, child.role.config, child.role.epoch, "recycling")
            return

    def _replace(self, child: _Child, config: ServerConfig, epoch: int, why: str) -> _Child:
        """Start a new process for ``child``'s slot, serving the model of ``config``
        (model ``epoch``); ``child`` retires once it is ready."""
        role = child.role
        assert isinstance(role, WorkerProcess)
        generation = self.generations.get(role.index, 0) + 1
        self.generations[role.index] = generation
        replacement = WorkerProcess(config, self.endpoints, role.index, role.device_id,
                                    self.worker_class, generation, epoch)
        self.logger.info("%s %s (pid %s): starting %s", why, role.identity,
                         child.process.pid, replacement.identity)
        self._spawn(replacement)
        new = self.children[replacement.identity]
        new.replaces = role.identity
        child.replaced_by = replacement.identity
        return new

    # -- model switch -------------------------------------------------------------------

    def _event_switch(self, name: str, child: _Child, value: Any) -> None:
        """An authorised client asked (through the ventilator) to serve another model:
        one worker at a time is replaced by one that loads it, so the server never has
        fewer serving workers than before (and one more process while one loads)."""
        if name != "ventilator":
            return
        if self.switch_target is not None:
            self._send("ventilator", M.Control.SWITCH_RESULT, {
                "error": "another model switch is under way: wait for it to end"})
            return
        if not self.started:
            self._send("ventilator", M.Control.SWITCH_RESULT, {
                "error": "the server is starting: switch once it is ready"})
            return
        current = self.models[self.epoch]
        changes = {"model_dir": value.get("model_dir") or current["dir"],
                   "model_name": value.get("model_name") or current["name"],
                   "model_version": value.get("version") or current["version"]}
        if not os.path.isdir(changes["model_dir"]):
            self._send("ventilator", M.Control.SWITCH_RESULT, {
                "error": f"model_dir {changes['model_dir']!r} is not a directory",
                "code": "bad_input"})
            return
        self._begin_switch(changes)

    def _begin_switch(self, changes: dict[str, Any], rollback: bool = False) -> None:
        """Start replacing the workers not serving ``changes``' model. A new model gets
        the next epoch; switching back (``rollback``) returns to the current epoch."""
        config = self.models_config(changes)
        if rollback:
            epoch = self.epoch
        else:
            epoch = max(self.models) + 1
            self.models[epoch] = {"name": changes["model_name"],
                                  "version": changes["model_version"],
                                  "dir": changes["model_dir"], "epoch": epoch,
                                  "metadata": None}
        workers = [n for n, c in self.children.items()  # (one being replaced goes away)
                   if isinstance(c.role, WorkerProcess) and not c.handled
                   and not c.replaced_by and c.role.epoch != epoch]
        self.switch_target = (config, epoch)
        self.switch_queue = deque(sorted(workers))
        self._switch_started = time.monotonic()
        self.switch = {"state": "switching", "rollback": rollback,
                       "to": {"name": changes["model_name"],
                              "version": changes["model_version"],
                              "dir": changes["model_dir"]},
                       "error": None, "started_at": time.time(), "seconds": None,
                       "switched": 0, "total": len(workers)}
        self.logger.warning("%s the model to %s (version %s, dir %s): %d worker(s), one at "
                            "a time", "switching back" if rollback else "switching",
                            changes["model_name"], changes["model_version"],
                            changes["model_dir"], len(workers))
        self._tell_model()
        self._next_recycle()

    def models_config(self, changes: dict[str, Any]) -> ServerConfig:
        """The workers' config for a model: this server's, with its dir, name, version."""
        return self.config.replace(**changes)

    def _next_switch(self) -> bool:
        """Replace the next worker of the switch; False when none is left to replace
        (the switch then ends)."""
        assert self.switch_target is not None
        config, epoch = self.switch_target
        while self.switch_queue:
            name = self.switch_queue.popleft()
            child = self.children.get(name)
            if (child is None or child.handled or not isinstance(child.role, WorkerProcess)
                    or child.role.epoch == epoch):
                continue  # gone, or restarted on the new model already
            self._replace(child, config, epoch, "switching").switching = True
            return True
        self._end_switch(None)
        return False

    def _slot_switched(self) -> None:
        if self.switch is not None:
            self.switch["switched"] += 1
            self._tell_model()

    def _end_switch(self, error: str | None) -> None:
        """The switch ended: every worker serves the new model, or (``error``) a new
        worker failed to load it."""
        assert self.switch is not None and self.switch_target is not None
        _, epoch = self.switch_target
        previous = self.models[self.epoch]
        seconds = time.monotonic() - self._switch_started
        self.switch_target = None
        self.switch_queue.clear()
        state = self.switch
        state["seconds"] = seconds
        rollback = bool(state.get("rollback"))
        if error is None:
            self.epoch = epoch
            state["state"] = "done"
            current = self.models[epoch]
            self.logger.warning("model switch done in %.2fs: serving %s version %s", seconds,
                                current["name"], current["version"])
            self._tell_model()
            if not rollback:
                self._send("ventilator", M.Control.SWITCH_RESULT, {"result": {
                    "model_name": current["name"], "model_version": current["version"],
                    "model_dir": current["dir"], "epoch": epoch, "seconds": seconds,
                    "workers": state["total"],
                    "previous": {"model_name": previous["name"],
                                 "model_version": previous["version"],
                                 "model_dir": previous["dir"], "epoch": previous["epoch"]}}})
            return
        state["state"] = "failed"
        state["error"] = error
        switched = state["switched"]
        self.logger.error("model switch failed after %.2fs: %s", seconds, error)
        message = f"the new model failed to load: {error}"
        if switched and not rollback:
            message += (f"; the {switched} worker(s) already switched are switched back to "
                        f"{previous['name']} version {previous['version']}")
        self._tell_model()
        if not rollback:
            self._send("ventilator", M.Control.SWITCH_RESULT, {"error": message})
        if switched and not rollback:
            self._begin_switch({"model_dir": previous["dir"], "model_name": previous["name"],
                                "model_version": previous["version"]}, rollback=True)
            self.switch["error"] = message

    def _switch_failed(self, child: _Child, code: int) -> None:
        """A worker loading the switched-to model exited before it was ready: the
        switch stops; the worker it was to replace keeps serving."""
        name = child.role.identity
        deadline = time.monotonic() + BOOT_EVENT_WAIT
        while "boot_error" not in child.info and time.monotonic() < deadline:
            if not self.control.poll(50, zmq.POLLIN):
                continue
            self._read_events()
        reason = child.info.get("boot_error") or describe_exit(code)
        old = self.children.get(child.replaces or "")
        if old is not None:
            old.replaced_by = None
        del self.children[name]
        self._end_switch(f"{name} {reason}")
        self._next_recycle()

    def _tell_model(self) -> None:
        """Tell the ventilator the models served and the switch state (status, the
        metadata command)."""
        current = self.models[self.epoch]
        if current["metadata"] is None:
            return  # no worker of it ready yet: said when the first one is
        self._send("ventilator", M.Control.MODEL, {
            "current": current, "switch": self.switch,
            "versions": {e: m["version"] for e, m in self.models.items()}})

    def _maybe_start_bridge(self) -> None:
        """Start the first HTTP bridge process once the ports it connects to are bound
        (it binds the HTTP port; the others start when it has: they need the number)."""
        if (self.config.http_port is None or "http-0" in self.children or self.port is None
                or self.port_out is None):
            return
        self.http_state = http_state.create()  # outlives any one bridge process
        self._spawn(self._bridge(0, self.config))

    def _start_more_bridges(self) -> None:
        config = self.config.replace(http_port=self.http_port)
        for index in range(1, self.config.http_workers):
            if f"http-{index}" not in self.children:
                self._spawn(self._bridge(index, config))

    def _bridge(self, index: int, config: ServerConfig) -> HTTPBridge:
        assert self.port is not None and self.port_out is not None
        cls = self.worker_class
        return HTTPBridge(config, self.endpoints, self.port, self.port_out,
                          f"{cls.__module__}.{cls.__qualname__}", index, self.http_state)

    def _bridges(self) -> list[str]:
        return [n for n, c in self.children.items() if _is_bridge(c)]

    def _tell_workers(self, command: M.Control) -> None:
        for name, child in self.children.items():
            if isinstance(child.role, WorkerProcess) and not child.handled:
                self._send(name, command)

    def _kill_hung(self, index: int, pid: int) -> None:
        for child in self.children.values():
            role = child.role
            if (isinstance(role, WorkerProcess) and role.index == index
                    and child.process.pid == pid and not child.handled):
                child.hung = True
                self.logger.error("killing %s (pid %d): it exceeded -worker_timeout %gs",
                                  role.identity, pid, self.config.worker_timeout)
                child.process.kill()

    def _on_exit(self, name: str) -> None:
        child = self.children.get(name)
        if child is None or child.handled:
            return
        child.process.join(0)
        code = child.process.exitcode
        if code is None:
            return
        child.handled = True
        if self.stop_reason is not None or self.failure is not None:
            return
        self._read_events()  # what it said before it went (boot_failed, ready...)
        if child.switching and not child.ready:
            self._switch_failed(child, code)
            return
        if not child.ready and not child.total_restarts and not child.replaces:
            # A role of the first start (or a first bridge) that could not boot: the
            # server cannot start as configured.
            if code == EXIT_BOOT_FAILED and self.boot_error is None:
                self._await_boot_error(name)  # it was sent before the exit: let it arrive
            self.failure = self.failure or f"{name} {describe_exit(code)}"
            return
        if child.retiring_done(code):
            self.logger.info("%s (pid %s) retired (replaced)", name, child.process.pid)
            replacement = self.children.get(child.replaced_by or "")
            del self.children[name]
            if replacement is not None:
                replacement.replaces = None
                if replacement.switching:
                    replacement.switching = False
                    self._slot_switched()
            self._next_recycle()
            return
        self._restart(child, code)

    def _restart(self, child: _Child, code: int) -> None:
        """Start another process for a role that died after it started, on the same
        ports; only repeated failure stops the server."""
        role = child.role
        reason = (f"exceeded -worker_timeout {self.config.worker_timeout:g}s and was killed"
                  if child.hung else child.info.get("boot_error") or describe_exit(code))
        if isinstance(role, WorkerProcess):
            self._restart_worker(child, reason)
        elif isinstance(role, HTTPBridge):
            self._respawn(child, reason, self._bridge(
                role.index, self.config.replace(http_port=self.http_port)),
                " (the ZeroMQ ports keep serving)")
        elif isinstance(role, Ventilator):
            self.ventilator_generation += 1
            self._respawn(child, reason, Ventilator(
                self._public_config(), self.endpoints, self.started_at,
                self.ventilator_generation, self.worker_history),
                " on the same port (workers stay loaded)")
        elif isinstance(role, Sink):
            self._respawn(child, reason, Sink(self._public_config(), self.endpoints),
                          " on the same port (workers stay loaded)")

    def _public_config(self) -> ServerConfig:
        """The config with the ports the first roles bound (a restart takes them again)."""
        return self.config.replace(port=self.port, port_out=self.port_out)

    def _await_boot_error(self, name: str, limit: float = BOOT_EVENT_WAIT) -> None:
        """Read events (bounded) until ``name``'s boot_failed event has come: a role
        sends it before it exits, but its exit may be seen first."""
        deadline = time.monotonic() + limit
        while self.boot_error is None:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.control.poll(left_ms, zmq.POLLIN):
                return
            self._read_events()

    def _read_events(self) -> None:
        """Handle every event waiting on the control socket."""
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_event(frames)

    def _tell_console(self) -> None:
        """With -log_dir every log line, tracebacks included, goes to the files: say on
        stderr why the server stopped and where the traceback is."""
        if not self.config.log_dir or not self.failure:
            return
        reason = self.boot_error or self.failure.splitlines()[0]
        err_file = os.path.abspath(log_base(self.config.log_dir, self.config.log_name)
                                   + ".err")
        text = f"wkr-serving: stopped: {reason}\nwkr-serving: the traceback is in {err_file}"
        if self.config.log_format == "json":  # one JSON line, like the rest of stderr
            text = JsonFormatter("SUPERVISOR").format(logging.makeLogRecord({
                "levelname": "ERROR", "name": "wkr_serving",
                "msg": f"stopped: {reason}; the traceback is in {err_file}"}))
        with contextlib.suppress(OSError, ValueError):  # no usable stderr: nothing to do
            print(text, file=sys.stderr, flush=True)

    def _restart_worker(self, child: _Child, reason: str) -> None:
        """A worker died after it started: the ventilator retries or fails what it held,
        and a new process takes its slot. Only a slot whose new processes keep failing
        to boot, or workers dying with nothing in hand (see :meth:`_event_worker_lost`),
        stop the server."""
        role = child.role
        assert isinstance(role, WorkerProcess)
        name = role.identity
        self.worker_history[role.index] = {"restarts": child.total_restarts + 1,
                                           "last_error": reason}
        if child.ready:
            self._send("ventilator", M.Control.WORKER_LOST, {
                "index": role.index, "pid": child.process.pid, "reason": reason,
                "restarts": child.total_restarts + 1})
        boot_failures = child.boot_failures + (not child.ready)
        if boot_failures >= MAX_BOOT_FAILURES:
            self.failure = (f"{name} failed to start {boot_failures} times in a row after a "
                            f"restart (last: {reason}); giving up")
            self.boot_error = self.boot_error or self.failure
            return
        if child.replaced_by:  # it was being recycled: its replacement takes the slot
            replacement = self.children[child.replaced_by]
            replacement.replaces = None
            if replacement.switching and replacement.ready:
                replacement.switching = False
                self._slot_switched()
            self.logger.error("%s (pid %s) %s while being recycled", name, child.process.pid,
                              reason)
            del self.children[name]
            self._next_recycle()
            return
        self.logger.error("%s (pid %s) %s; restarting it", name, child.process.pid, reason)
        self._spawn(WorkerProcess(role.config, self.endpoints, role.index, role.device_id,
                                  self.worker_class, role.generation, role.epoch))
        replacement = self.children[name]
        replacement.total_restarts = child.total_restarts + 1
        replacement.boot_failures = boot_failures
        replacement.replaces = child.replaces if child.replaces in self.children else None

    def _respawn(self, child: _Child, reason: str, replacement: Role, note: str = "") -> None:
        """Start ``replacement`` for the dead ``child``, unless it died more than
        MAX_RESTARTS times in RESTART_WINDOW seconds: then the server stops, saying why."""
        name = child.role.identity
        now = time.monotonic()
        recent = [t for t in child.restarts if now - t < RESTART_WINDOW] + [now]
        if len(recent) > MAX_RESTARTS:
            self.failure = (f"{name} died {len(recent)} times in {RESTART_WINDOW:.0f}s "
                            f"(last: {reason}); giving up")
            return
        self.logger.error("%s (pid %s) %s; restarting it%s", name, child.process.pid, reason,
                          note)
        self._spawn(replacement, restarts=recent)
        self.children[name].total_restarts = child.total_restarts + 1

    def _send(self, name: str, command: M.Control, value: Any = None) -> bool:
        try:
            self.control.send_multipart([name.encode(), M.control(command, value)],
                                        zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    # -- stop ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Drain, then stop every role. A graceful stop fits in ``-graceful_timeout``:
        draining gets it minus a reserve for stopping, in which the roles that are still
        busy (a worker stuck in predict) are killed."""
        upstream = [n for n in self.children if n != "sink"]
        vent = self.children.get("ventilator")
        if self.failure is None and vent is not None and vent.ready and self._send(
                "ventilator", M.Control.DRAIN):
            timeout = self.config.graceful_timeout
            end = time.monotonic() + timeout
            reserve = min(STOP_GRACE, max(MIN_STOP_GRACE * 2, 0.2 * timeout))
            while (not self.drained and self.failure is None and vent.process.is_alive()
                   and time.monotonic() < end - reserve):
                self._tick(100)
            if not self.drained:
                self.logger.warning("in-flight work not drained within %.1fs", timeout)
            sink_reserve = reserve / 2
            self._stop_children(upstream, end - sink_reserve - time.monotonic())
            self._stop_children(["sink"], end - time.monotonic())
        else:
            self._stop_children(upstream, STOP_GRACE)
            self._stop_children(["sink"], STOP_GRACE)
        self.control.close(0)
        self.context.term()
        self._dirs.remove()
        http_state.remove(self.http_state)
        self.close_wake_pipe()

    def close_wake_pipe(self) -> None:
        """Release the wake-up pipe (done by the loop's shutdown; idempotent)."""
        self._wake.close()

    def _stop_children(self, names: list[str], grace: float) -> None:
        """Tell roles to stop, repeating until each took it (a role that was still
        starting may not have connected yet), then kill whatever outlives ``grace``
        seconds (at least :data:`MIN_STOP_GRACE`)."""
        live = [self.children[n] for n in names if n in self.children]
        told: set[str] = set()
        deadline = time.monotonic() + max(grace, MIN_STOP_GRACE)
        while time.monotonic() < deadline:
            for child in live:
                name = child.role.identity
                if (name not in told and child.process.is_alive()
                        and self._send(name, M.Control.STOP)):
                    told.add(name)
            running = [c.process.sentinel for c in live if c.process.is_alive()]
            if not running:
                break
            multiprocessing.connection.wait(running, timeout=0.05)
        for child in live:
            if child.process.is_alive():
                self.logger.warning("%s did not stop in time; killing it", child.role.identity)
                child.process.kill()
                child.process.join()


def _is_bridge(child: _Child | None) -> bool:
    return child is not None and isinstance(child.role, HTTPBridge)


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``was killed by SIGKILL`` for a process's exit code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
