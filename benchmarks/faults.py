#!/usr/bin/env python
"""How the server behaves when things go wrong (issues 3 and 10): reaction and recovery
times, and what each fault costs the clients.

    python benchmarks/faults.py                      # every scenario once, 1-2 minutes
    python benchmarks/faults.py --repeat 3 --out benchmarks/results/faults.json
    python benchmarks/faults.py --only worker_killed,sink_killed

Each scenario starts real servers on 127.0.0.1 (``WKRServer`` in this process, or a
``wkr-serving-start`` subprocess where a signal, the temp dir or the exit code is what is
measured) with the worker of ``benchmarks/fault_worker.py`` (echo; hold a batch until a
file appears; ``sys.exit``; SIGSEGV; say its pid), and measures ``--repeat`` times, where
it applies: the time from the fault to the client's error, the time until a request is
answered again, and the requests sent, failed and lost. Every call is a blocking call
with a 30 s timeout, so every request sent ends in exactly one outcome: its result, a
server error (*failed*), or no reply within the timeout (*lost*, which must stay 0).
Where the server's counters survive the fault, the replies the sink sent are counted as
well and must equal the requests sent.

Scenarios (see ``benchmarks/README.md`` for what each one does):

``exit_code_3``, ``worker_killed``, ``poison_input``, ``log_dir_unwritable``,
``prediction_log_rotation``, ``server_restart_same_ports``,
``kill9_supervisor_leftovers``, ``recycling``, ``missing_model_dir``,
``ventilator_killed``, ``sink_killed``, ``worker_timeout``, ``terminate``,
``overloaded``.

Times come from ``time.monotonic()`` (shared by every process of the host) and
``time.perf_counter()``; every wait is bounded, nothing sleeps to synchronise, and only
processes this script started are signalled, by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned workers import fault_worker by name

import fault_worker  # noqa: E402
from wkr_serving.client import (  # noqa: E402
    ConnectionLost,
    ConnectTimeout,
    Overloaded,
    PoisonInput,
    WKRClient,
    WKRError,
    WKRTimeoutError,
    WorkerDied,
)
from wkr_serving.client.client import READ_SLICE_MS  # noqa: E402
from wkr_serving.client.version import __version__  # noqa: E402
from wkr_serving.server import WKRServer  # noqa: E402
from wkr_serving.server.helper import get_args_parser  # noqa: E402
from wkr_serving.server.predlog import log_path  # noqa: E402

#: Longest single wait (a process to start or end, a reply, a file to appear).
LIMIT_S = 60.0
#: Longest a whole load of a scenario may take.
LOAD_LIMIT_S = 180.0
#: Call timeout of every client (ms): a request without a reply by then counts as lost.
CALL_TIMEOUT_MS = 30_000
#: Handshake timeout of every client (ms).
CONNECT_TIMEOUT_MS = 10_000
#: How often a polling wait looks again (s).
POLL_S = 0.002

#: Result key: CPU used by processes other than this benchmark's during a scenario.
OTHERS = "other_processes_cpu_pct"
#: Outcomes of a call besides the server's error class names.
OK, WRONG, LOST = "ok", "wrong_result", "lost"

#: The bounded pipelined loads: clients x calls in flight per client (one thread per
#: call in flight, each sending its next call when its reply has come).
LOAD_CLIENTS = 4
LOAD_DEPTH = 4
#: worker_killed: calls in flight per client while both workers are held (4 x 6 = 24,
#: plus the victim: one batch of at most -batch_size 32) and calls per thread.
HELD_DEPTH = 6
HELD_CALLS = 25
#: ventilator_killed / sink_killed: calls per thread, and replies before the kill.
ROLE_CALLS = 100
ROLE_KILL_AFTER = 400
#: recycling: requests of each load, and the -max_requests under test. A replacement
#: takes about a second to load on a busy 2-core machine and one worker is recycled at a
#: time, so a load of 2,000 requests (a fraction of a second) would see one recycle at
#: most; 20,000 last long enough for several.
RECYCLE_REQUESTS = 20_000
RECYCLE_MAX_REQUESTS = 50
#: How often the worker processes are counted during the recycling load (s).
PROCESS_SAMPLE_S = 0.005
#: kill9_supervisor_leftovers: how long the kernel is given to drop the socket names of
#: a killed tree before the names still there are counted as left.
NAMES_LIMIT_S = 5.0
#: poison_input: round trips of an input already quarantined, per repeat.
POISON_AGAIN = 50
#: overloaded: refused round trips.
OVERLOADED_REQUESTS = 200
#: server_restart_same_ports: quick calls after each restart, besides the first one and
#: a call that lasts more than a few of the client's read slices.
RESTART_CALLS = 10
LONG_CALL_S = 3 * READ_SLICE_MS / 1000.0


def wait_for(predicate: Callable[[], Any], limit: float, what: str) -> Any:
    """Poll ``predicate`` until truthy, at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no {what} within {limit}s")
        pause.wait(POLL_S)


# -- servers and clients -------------------------------------------------------------------


def start_server(workdir: str, *flags: str) -> WKRServer:
    """A ready ``WKRServer`` (in this process) on loopback; ports 0 unless ``flags`` say."""
    args = get_args_parser().parse_args(
        ["-port", "0", "-port_out", "0", "-bind", "127.0.0.1", "-cpu", "-model_dir", workdir,
         "-log_dir", workdir, "-log_name", "server", "-graceful_timeout", "2", *flags])
    srv = WKRServer(args, fault_worker.Worker)
    srv.start()
    try:
        srv.wait_ready(LIMIT_S)
    except BaseException:
        srv.close(LIMIT_S)
        raise
    return srv


@contextmanager
def server(workdir: str, *flags: str) -> Iterator[WKRServer]:
    srv = start_server(workdir, *flags)
    try:
        yield srv
    finally:
        srv.close(LIMIT_S)


def make_client(port: int, port_out: int, timeout: int = CALL_TIMEOUT_MS) -> WKRClient:
    return WKRClient("127.0.0.1", port, port_out, timeout=timeout,
                     connect_timeout=CONNECT_TIMEOUT_MS)


def client(srv: WKRServer, timeout: int = CALL_TIMEOUT_MS) -> WKRClient:
    assert srv.port is not None and srv.port_out is not None
    return make_client(srv.port, srv.port_out, timeout)


def answered(status: dict[str, Any]) -> int:
    """Replies the sink has sent for requests (results and errors, not commands)."""
    return status["num_results"] + sum(status["num_errors"].values())


def settled(probe: WKRClient, num_worker: int) -> dict[str, Any]:
    """The status once every worker slot has a ready worker and nothing is queued or in
    flight. A status call that meets a role being restarted counts as "not yet"."""

    def check() -> dict[str, Any] | None:
        try:
            s = probe.server_status
        except (ConnectionLost, WKRTimeoutError):
            return None
        rows = s["workers"]
        up = s["ready"] and len(rows) == num_worker and all(r["pid"] for r in rows)
        return s if up and s["queue_items"] == 0 and s["in_flight_items"] == 0 else None

    return wait_for(check, LIMIT_S, "every worker up and the server idle")


def worker_pids(status: dict[str, Any]) -> list[int]:
    return sorted(w["pid"] for w in status["workers"])


class Hold:
    """A request held in ``predict``: ``started()`` returns ``(pid, monotonic start)``."""

    def __init__(self, workdir: str, name: Any) -> None:
        self.dir = os.path.join(workdir, f"hold-{name}")
        os.makedirs(self.dir)
        self.item = {"hold": self.dir}

    def started(self) -> tuple[int, float]:
        path = os.path.join(self.dir, "started")
        text = wait_for(lambda: os.path.exists(path) and Path(path).read_text(), LIMIT_S,
                        "predict start")
        pid, t = text.split()
        return int(pid), float(t)

    def release(self) -> None:
        Path(self.dir, "release").touch()


# -- calls and loads -----------------------------------------------------------------------


@dataclass
class Call:
    """One blocking call: which client sent it, when, when it ended, and how."""

    client: int
    sent: float
    done: float
    outcome: str


def call(c: WKRClient, index: int, value: Any, timeout: int | None = None,
         check: Callable[[Any], bool] | None = None) -> Call:
    """``c.encode(value)``; its outcome is ``ok`` (the value came back, or the result
    passed ``check``), ``wrong_result``, ``lost`` (no reply within the timeout) or the
    class name of the error raised."""
    sent = time.monotonic()
    try:
        result = c.encode(value, timeout=timeout)
        outcome = OK if (check(result) if check else result == value) else WRONG
    except ConnectTimeout as exc:  # the handshake failed: nothing was sent
        outcome = type(exc).__name__
    except WKRTimeoutError:
        outcome = LOST
    except WKRError as exc:
        outcome = type(exc).__name__
    return Call(index, sent, time.monotonic(), outcome)


class Pending:
    """A blocking call running in a thread of its own."""

    def __init__(self, c: WKRClient, value: Any, index: int = -1) -> None:
        self.result: Call | None = None
        self._thread = threading.Thread(target=self._run, args=(c, value, index),
                                        daemon=True)
        self._thread.start()

    def _run(self, c: WKRClient, value: Any, index: int) -> None:
        self.result = call(c, index, value)

    def join(self, limit: float = LIMIT_S) -> Call:
        self._thread.join(limit)
        if self.result is None:
            raise TimeoutError(f"a call got no outcome within {limit}s")
        return self.result


class Load:
    """A bounded pipelined load: ``clients`` WKRClients, each with ``depth`` calls in
    flight (one thread per call in flight), each thread making ``calls`` calls of distinct
    values; every call's outcome is kept."""

    def __init__(self, srv: WKRServer, clients: int, depth: int, calls: int,
                 tag: str) -> None:
        self.clients = [client(srv) for _ in range(clients)]
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, t, calls, tag),
                                          daemon=True)
                         for i in range(clients) for t in range(depth)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.join()
        finally:
            for c in self.clients:
                c.close()

    def _run(self, index: int, thread: int, calls: int, tag: str) -> None:
        for n in range(calls):
            record = call(self.clients[index], index, f"{tag}-{index}-{thread}-{n}")
            with self._lock:
                self.calls.append(record)

    @property
    def done(self) -> int:
        return len(self.calls)

    def join(self, limit: float = LOAD_LIMIT_S) -> list[Call]:
        deadline = time.monotonic() + limit
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError(f"the load did not end within {limit}s")
        return self.calls


def tally(calls: list[Call]) -> dict[str, Any]:
    """Requests sent, answered with their result, failed (a server error), lost (no
    reply), and the failures by kind."""
    kinds = Counter(c.outcome for c in calls)
    lost = kinds.pop(LOST, 0)
    ok = kinds.pop(OK, 0)
    return {"requests_sent": len(calls), "results": ok, "failed": sum(kinds.values()),
            "lost": lost, "failures": dict(sorted(kinds.items()))}


def add_tally(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum two tallies (over repeats)."""
    out = dict(total)
    for key in ("requests_sent", "results", "failed", "lost"):
        out[key] = out.get(key, 0) + part[key]
    out["failures"] = dict(Counter(out.get("failures", {})) + Counter(part["failures"]))
    return out


# -- wkr-serving-start subprocesses --------------------------------------------------------


class CLI:
    """A ``wkr-serving-start fault_worker.Worker`` subprocess on 127.0.0.1 binding ports 0
    (unless ``flags`` name them): its stdout and stderr go to files in ``directory``; its
    ports are read from the supervisor's ready line, on stderr or in ``log_file``."""

    READY_LINE = re.compile(r"\bready: port (\d+), port_out (\d+)")

    def __init__(self, directory: Path, name: str, *flags: str,
                 env: dict[str, str] | None = None, log_file: Path | None = None,
                 model_dir: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("wkr-serving-start")
        if exe is None:
            raise RuntimeError("the wkr-serving-start entry point is not installed")
        self.err_path = directory / f"{name}.stderr.txt"
        self.log_file = log_file
        self._ports: tuple[int, int] | None = None
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self.started = time.monotonic()
        with open(directory / f"{name}.stdout.txt", "wb") as out, \
                open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [exe, "fault_worker.Worker", "-port", "0", "-port_out", "0",
                 "-bind", "127.0.0.1", "-cpu", "-model_dir", str(model_dir or directory),
                 "-graceful_timeout", "5", *flags],
                cwd=HERE, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def _find_ports(self) -> tuple[int, int] | None:
        if self._ports is None:
            text = self.stderr()
            if self.log_file is not None and self.log_file.exists():
                text += self.log_file.read_text(errors="replace")
            found = self.READY_LINE.search(text)
            if found:
                self._ports = int(found.group(1)), int(found.group(2))
            elif self.proc.poll() is not None:
                raise RuntimeError(f"wkr-serving-start exited with {self.proc.returncode}:"
                                   f"\n{text[-3000:]}")
        return self._ports

    def client(self) -> WKRClient:
        """A client, once the server is ready."""
        port, port_out = wait_for(self._find_ports, LIMIT_S, "ready line")
        c = make_client(port, port_out)
        try:
            wait_for(lambda: c.server_status["ready"], LIMIT_S, "ready server")
        except BaseException:
            c.close()
            raise
        return c

    def stop(self) -> int:
        """SIGTERM to the started pid, then its exit code (SIGKILL if it stays)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(LIMIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(LIMIT_S)

    def tree(self) -> list[int]:
        """The started pid and every process below it."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return [self.pid, *(p.pid for p in psutil.Process(self.pid).children(True))]
        return [self.pid]

    def kill_tree(self) -> list[int]:
        """SIGKILL the started process and every descendant; their pids once all ended."""
        tree = self.tree()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(LIMIT_S)
        wait_for(lambda: all(ended(p) for p in tree), LIMIT_S, "end of the killed tree")
        return tree


@contextmanager
def cli(directory: Path, name: str, *flags: str, **kwargs: Any) -> Iterator[CLI]:
    server_proc = CLI(directory, name, *flags, **kwargs)
    try:
        yield server_proc
    finally:
        server_proc.stop()


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def abstract_names(pid: int) -> int:
    """Abstract unix socket names of the server of supervisor ``pid`` in /proc/net/unix."""
    with open("/proc/net/unix", encoding="utf-8") as fh:
        return sum(1 for line in fh if f" @wkr-{pid}-" in line)


def no_abstract_names(pid: int) -> bool:
    return abstract_names(pid) == 0


def other_pid(pid: int, result: Any) -> bool:
    """Whether a ``{"pid": v}`` result was computed by a process other than ``pid``."""
    return isinstance(result, dict) and result.get("pid") not in (None, pid)


def wkr_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("wkr-"))


# -- scenarios: a worker dies --------------------------------------------------------------


def exit_code_3(workdir: str, repeat: int) -> dict[str, Any]:
    """``sys.exit(3)`` in predict, 2 workers: the input is retried alone, kills a second
    worker and gets PoisonInput; then the next request is answered."""
    to_poison, to_next, calls, deaths = [], [], [], []
    messages: list[str] = []
    with server(workdir, "-num_worker", "2") as srv, client(srv) as c:
        for n in range(repeat):
            base = settled(c, 2)
            sent = time.monotonic()
            try:
                c.encode({"exit": 3, "token": f"exit3-{n}"})
                outcome = OK
            except PoisonInput as exc:
                outcome = type(exc).__name__
                messages.append(exc.message)
            except WKRTimeoutError:
                outcome = LOST
            except WKRError as exc:
                outcome = type(exc).__name__
            bad = Call(0, sent, time.monotonic(), outcome)
            nxt = call(c, 0, f"next-{n}")
            calls += [bad, nxt]
            to_poison.append(bad.done - bad.sent)
            to_next.append(nxt.done - bad.done)
            after = settled(c, 2)
            deaths.append(sum(w["restarts"] for w in after["workers"])
                          - sum(w["restarts"] for w in base["workers"]))
        up = srv.is_alive() and srv.supervisor.failure is None
    return {"request_to_PoisonInput_s": to_poison, "PoisonInput_to_next_answered_s": to_next,
            **tally(calls), "worker_deaths_per_input": deaths, "server_up": up,
            "PoisonInput_says_exit_code_3": all("exited with code 3" in m for m in messages)
            and len(messages) == repeat}


def worker_killed(workdir: str, repeat: int) -> dict[str, Any]:
    """SIGKILL of a worker holding one batch of 25 requests from 5 clients, under a
    pipelined load of 4 clients x 6 calls in flight (2 workers, -batch_size 32)."""
    to_results, to_ready = [], []
    totals: dict[str, Any] = {}
    held_sizes, held_clients, retried, sink_counts = [], [], [], []
    queued = LOAD_CLIENTS * HELD_DEPTH
    with server(workdir, "-num_worker", "2", "-batch_size", "32") as srv, \
            client(srv) as probe, client(srv) as holder, client(srv) as victim:
        for n in range(repeat):
            base = settled(probe, 2)
            # Both workers held, so the load's first calls and the victim queue up and
            # leave together as one batch when the first worker is released.
            gates = [Hold(workdir, f"{n}-gate{k}") for k in range(2)]
            gate_calls = []
            for gate in gates:
                gate_calls.append(Pending(holder, gate.item))
                gate.started()
            with Load(srv, LOAD_CLIENTS, HELD_DEPTH, HELD_CALLS, f"k{n}") as load:
                wait_for(lambda: probe.server_status["queue_items"] == queued, LIMIT_S,
                         "the load queued")
                hold = Hold(workdir, f"{n}-victim")
                held = Pending(victim, hold.item, LOAD_CLIENTS)
                wait_for(lambda: probe.server_status["queue_items"] == queued + 1, LIMIT_S,
                         "the victim queued")
                gates[0].release()
                pid, _ = hold.started()
                status = probe.server_status
                assert status["queue_items"] == 0, "the held batch left part of the queue"
                held_sizes.append(status["in_flight_items"] - 1)  # less the other gate
                (index,) = [w["index"] for w in status["workers"] if w["pid"] == pid]
                gates[1].release()
                for pending in gate_calls:
                    pending.join()  # the other worker is idle from now on
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                hold.release()  # the victim's retry runs at once

                def replaced(index: int = index, pid: int = pid) -> bool:
                    s = probe.server_status
                    row = next(w for w in s["workers"] if w["index"] == index)
                    return s["ready"] and row["pid"] not in (None, pid)

                wait_for(replaced, LIMIT_S, "a replacement worker")
                to_ready.append(time.monotonic() - killed)
                victim_call = held.join()
                load.join()
            in_batch = [victim_call, *(c for c in load.calls
                                       if c.sent < killed <= c.done)]
            held_clients.append(len({c.client for c in in_batch}))
            to_results.append(max(c.done for c in in_batch) - killed)
            calls = [*load.calls, victim_call, *(p.join() for p in gate_calls)]
            totals = add_tally(totals, tally(calls))
            final = settled(probe, 2)
            retried.append(final["num_retried_items"] - base["num_retried_items"])
            sink_counts.append(answered(final) - answered(base) - len(calls))
    return {"kill_to_held_requests_answered_s": to_results,
            "kill_to_replacement_ready_s": to_ready, **totals,
            "held_batch_items": held_sizes, "held_batch_clients": held_clients,
            "retried_items": retried, "sink_replies_minus_requests": sink_counts}


def poison_input(workdir: str, repeat: int) -> dict[str, Any]:
    """An input that kills its worker (SIGSEGV): PoisonInput after two deaths; the same
    input sent again is answered PoisonInput without reaching a worker."""
    first, again, calls = [], [], []
    deaths_again = batches_again = 0
    with server(workdir, "-num_worker", "2") as srv, client(srv) as c:
        for n in range(repeat):
            settled(c, 2)
            item = {"segv": f"poison-{n}"}
            bad = call(c, 0, item)
            first.append(bad.done - bad.sent)
            calls.append(bad)
            base = settled(c, 2)
            for _ in range(POISON_AGAIN):
                t0 = time.perf_counter()
                calls.append(call(c, 0, item))
                again.append(time.perf_counter() - t0)
            after = settled(c, 2)
            deaths_again += (sum(w["restarts"] for w in after["workers"])
                             - sum(w["restarts"] for w in base["workers"]))
            batches_again += after["num_batches"] - base["num_batches"]
        up = srv.is_alive() and srv.supervisor.failure is None
    return {"request_to_PoisonInput_s": first, "PoisonInput_again_round_trip_s": again,
            **tally(calls), "worker_deaths_when_sent_again": deaths_again,
            "batches_when_sent_again": batches_again, "server_up": up}


def worker_timeout(workdir: str, repeat: int) -> dict[str, Any]:
    """``-worker_timeout 0.5``: a request that never finishes gets WorkerDied (no retry)."""
    late = []
    with server(workdir, "-num_worker", "1", "-worker_timeout", "0.5") as srv, \
            client(srv) as c:
        for n in range(repeat):
            hold = Hold(workdir, n)
            c.encode(hold.item, blocking=False)
            (reply,) = c.fetch_all(on_error="return")
            arrived = time.monotonic()
            _, started = hold.started()
            hold.release()
            assert isinstance(reply, WorkerDied), reply
            late.append(arrived - started)
            wait_for(lambda: c.server_status["ready"], LIMIT_S, "the replacement worker")
    return {"predict_start_to_WorkerDied_s": late, "worker_timeout_s": 0.5}


def recycling(workdir: str, repeat: int) -> dict[str, Any]:
    """The same pipelined load (20,000 requests, 2 workers) on a server without and one
    with ``-max_requests 50``: latency, failures, worker processes at once, recycles."""
    out: dict[str, Any] = {}
    latency: dict[str, list[float]] = {"without": [], "with": []}
    most: dict[str, int] = {"without": 0, "with": 0}
    seen: dict[str, int] = {"without": 0, "with": 0}
    retired: dict[str, int] = {"without": 0, "with": 0}
    restarts = 0
    per_thread = RECYCLE_REQUESTS // (LOAD_CLIENTS * LOAD_DEPTH)
    for n in range(repeat):
        for label, flags in (("without", ()),
                             ("with", ("-max_requests", str(RECYCLE_MAX_REQUESTS)))):
            sub = os.path.join(workdir, f"{label}-{n}")
            os.makedirs(sub)
            with server(sub, "-num_worker", "2", *flags) as srv, client(srv) as probe:
                base = settled(probe, 2)
                counter = WorkerCounter({base["ventilator_pid"], base["sink_pid"]})
                with counter, Load(srv, LOAD_CLIENTS, LOAD_DEPTH, per_thread,
                                   f"{label}{n}") as load:
                    load.join()
                final = settled(probe, 2)
                restarts += sum(w["restarts"] for w in final["workers"])
            log = Path(sub, "server.log").read_text(errors="replace")
            retired[label] += log.count("retired (recycled)")
            latency[label] += [c.done - c.sent for c in load.calls]
            most[label] = max(most[label], counter.most)
            seen[label] = max(seen[label], len(counter.pids))
            out[label] = add_tally(out.get(label, {}), tally(load.calls))
    return {"latency_without_recycling_s": latency["without"],
            "latency_with_max_requests_50_s": latency["with"],
            "requests_sent": out["with"]["requests_sent"], "failed": out["with"]["failed"],
            "lost": out["with"]["lost"], "failures": out["with"]["failures"],
            "failed_without_recycling": out["without"]["failed"],
            "most_worker_processes_at_once": most["with"],
            "most_worker_processes_without_recycling": most["without"],
            "worker_processes_seen_per_load": seen["with"], "num_worker": 2,
            "workers_recycled": retired["with"],
            "workers_recycled_without_max_requests": retired["without"],
            "worker_restarts": restarts}


class WorkerCounter:
    """Counts, every few ms, the live worker processes under this process (the
    supervisor thread's children less the ventilator, the sink and multiprocessing's
    resource tracker); keeps the most at once and every pid seen."""

    def __init__(self, not_workers: set[int]) -> None:
        self.not_workers = set(not_workers)
        self.most = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(LIMIT_S)

    def _is_worker(self, proc: psutil.Process) -> bool:
        if proc.pid in self.not_workers:
            return False
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if proc.pid not in self.pids and "resource_tracker" in " ".join(proc.cmdline()):
                self.not_workers.add(proc.pid)
                return False
        except psutil.Error:
            return False
        return True

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(PROCESS_SAMPLE_S):
            live = [p.pid for p in me.children() if self._is_worker(p)]
            self.pids.update(live)
            self.most = max(self.most, len(live))


# -- scenarios: logs -----------------------------------------------------------------------


def block(path: Path) -> None:
    """Make ``path`` unopenable for anyone, root included: rotate it away and put a
    directory in its place (as tests/test_log_faults.py does)."""
    if path.exists() and not path.is_dir():
        path.rename(path.with_name(path.name + ".1"))
    path.mkdir(exist_ok=True)


def log_dir_unwritable(workdir: str, repeat: int) -> dict[str, Any]:
    """The log files and the prediction log made unopenable, then kill -9 of the only
    worker: time until its replacement answers (it falls back to stderr)."""
    log_dir = Path(workdir, "logs")
    log_dir.mkdir()
    took, calls = [], []
    with cli(Path(workdir), "server", "-num_worker", "1", "-log_dir", str(log_dir),
             "-log_name", "svc", "-log_predictions", log_file=log_dir / "svc.log") as srv, \
            srv.client() as c:
        c.encode("before")
        for path in (log_dir / "svc.log", log_dir / "svc.err",
                     Path(log_path(str(log_dir), "svc"))):
            block(path)
        for n in range(repeat):
            pid = c.encode({"pid": n})["pid"]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            # Answered by another process: the replacement, which booted without files.
            calls.append(call(c, 0, {"pid": n}, check=functools.partial(other_pid, pid)))
            took.append(calls[-1].done - killed)
            calls.append(call(c, 0, f"after-{n}"))
        up = srv.proc.poll() is None
        fallbacks = sum(1 for line in srv.stderr().splitlines()
                        if "cannot use log file" in line)
    return {"kill_to_replacement_answer_s": took, **tally(calls), "server_up": up,
            "log_file_fallback_warnings": fallbacks}


def prediction_log_rotation(workdir: str, repeat: int) -> dict[str, Any]:
    """The prediction log renamed away; then either SIGHUP to the supervisor, or nothing
    (the writer's own check of the file at its path). A closed loop of requests runs
    until a line appears at the path; late lines went to the renamed file after the
    SIGHUP / the rename."""
    log_dir = Path(workdir, "logs")
    path = Path(log_path(str(log_dir), "svc"))
    out: dict[str, Any] = {"sighup_to_new_line_s": [], "rename_to_new_line_s": [],
                           "late_lines_after_sighup": 0, "late_lines_without_sighup": 0,
                           "requests_until_new_line_without_sighup": []}
    with cli(Path(workdir), "server", "-num_worker", "1", "-log_dir", str(log_dir),
             "-log_name", "svc", "-log_predictions", log_file=log_dir / "svc.log") as srv, \
            srv.client() as c:
        for n in range(repeat):
            for variant in ("sighup", "inode"):
                c.encode(f"{variant}{n}-before")
                wait_for(lambda: path.exists() and path.stat().st_size, LIMIT_S, "a line")
                rotated = path.with_name(f"{path.name}.{variant}{n}")
                path.rename(rotated)
                t0 = time.monotonic()
                if variant == "sighup":
                    os.kill(srv.pid, signal.SIGHUP)
                sent = 0
                deadline = t0 + LIMIT_S
                while not (path.exists() and path.stat().st_size):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"no new line at {path} within {LIMIT_S}s")
                    c.encode(f"{variant}{n}-after-{sent}")
                    sent += 1
                took = time.monotonic() - t0
                late = sum(1 for line in rotated.read_text().splitlines()
                           if f"{variant}{n}-after-" in line)
                if variant == "sighup":
                    out["sighup_to_new_line_s"].append(took)
                    out["late_lines_after_sighup"] += late
                else:
                    out["rename_to_new_line_s"].append(took)
                    out["late_lines_without_sighup"] += late
                    out["requests_until_new_line_without_sighup"].append(sent)
        out["server_up"] = srv.proc.poll() is None
    return out


# -- scenarios: the ventilator or the sink dies ----------------------------------------------


def role_killed(workdir: str, repeat: int, role: str) -> dict[str, Any]:
    """SIGKILL of the ventilator or the sink under a pipelined load (4 clients x 4 calls
    in flight, 2 workers): ConnectionLost at the clients, then the same client objects
    answered again; the workers must be the same processes."""
    first_lost, all_lost, recovered = [], [], []
    totals: dict[str, Any] = {}
    unchanged = restarted = True
    with server(workdir, "-num_worker", "2") as srv, client(srv, 10_000) as probe:
        for n in range(repeat):
            before = settled(probe, 2)
            victim = before[f"{role}_pid"]
            with Load(srv, LOAD_CLIENTS, LOAD_DEPTH, ROLE_CALLS, f"{role}{n}") as load:
                wait_for(lambda: load.done >= ROLE_KILL_AFTER, LOAD_LIMIT_S, "load")
                killed = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                calls = load.join()
            lost_at, back_at = [], []
            for i in range(LOAD_CLIENTS):
                mine = [c for c in calls if c.client == i]
                lost_at += [min((c.done for c in mine if c.outcome == "ConnectionLost"
                                 and c.done >= killed), default=None)]
                back_at += [min((c.done for c in mine if c.outcome == OK
                                 and c.sent >= killed), default=None)]
            seen = [t for t in lost_at if t is not None]
            if seen:
                first_lost.append(min(seen) - killed)
                all_lost.append(max(seen) - killed)
            if None not in back_at:
                recovered.append(max(t for t in back_at if t is not None) - killed)
            totals = add_tally(totals, tally(calls))
            for key, count in (
                    ("in_flight_at_kill", sum(1 for c in calls if c.sent < killed <= c.done)),
                    ("failed_of_those_in_flight", sum(1 for c in calls if c.sent < killed
                                                      and c.outcome != OK)),
                    ("failed_of_those_sent_after_kill", sum(1 for c in calls if c.sent
                                                            >= killed and c.outcome != OK))):
                totals[key] = totals.get(key, 0) + count
            totals["clients_without_ConnectionLost"] = (
                totals.get("clients_without_ConnectionLost", 0) + lost_at.count(None))
            totals["clients_not_recovered"] = (totals.get("clients_not_recovered", 0)
                                               + back_at.count(None))
            after = settled(probe, 2)
            if role == "ventilator":  # the sink's counters live on: compare with them
                totals["sink_replies_minus_client_results"] = (
                    totals.get("sink_replies_minus_client_results", 0) + answered(after)
                    - answered(before) - sum(1 for c in calls if c.outcome == OK))
            unchanged = unchanged and worker_pids(after) == worker_pids(before)
            restarted = restarted and after[f"{role}_pid"] not in (None, victim)
        up = srv.is_alive() and srv.supervisor.failure is None
    return {"kill_to_first_ConnectionLost_s": first_lost,
            "kill_to_every_client_ConnectionLost_s": all_lost,
            "kill_to_every_client_answered_again_s": recovered, **totals,
            "worker_pids_unchanged": unchanged, f"{role}_restarted": restarted,
            "server_up": up}


def ventilator_killed(workdir: str, repeat: int) -> dict[str, Any]:
    return role_killed(workdir, repeat, "ventilator")


def sink_killed(workdir: str, repeat: int) -> dict[str, Any]:
    return role_killed(workdir, repeat, "sink")


# -- scenarios: the whole server -----------------------------------------------------------


def server_restart_same_ports(workdir: str, repeat: int) -> dict[str, Any]:
    """One client object; its server stopped and another started on the same port
    numbers, ``repeat`` times: time until its next call succeeds, and whether any call
    made after the restart fails with a stale ConnectionLost."""
    stop_s, start_s, first_s, gap_s, calls = [], [], [], [], []
    srv = start_server(_fresh_dir(workdir, 0))
    try:
        assert srv.port is not None and srv.port_out is not None
        port, port_out = srv.port, srv.port_out
        with make_client(port, port_out) as c:
            calls.append(call(c, 0, "before"))
            for n in range(repeat):
                t0 = time.monotonic()
                srv.close(LIMIT_S)
                stopped = time.monotonic()
                srv = start_server(_fresh_dir(workdir, n + 1), "-port", str(port),
                                   "-port_out", str(port_out))
                ready = time.monotonic()
                first = call(c, 0, f"first-{n}")
                stop_s.append(stopped - t0)
                start_s.append(ready - stopped)
                first_s.append(first.done - ready)
                gap_s.append(first.done - t0)
                calls.append(first)
                calls += [call(c, 0, f"quick-{n}-{k}") for k in range(RESTART_CALLS)]
                calls.append(long_call(c, workdir, f"long-{n}"))
    finally:
        srv.close(LIMIT_S)
    stale = sum(1 for x in calls if x.outcome == "ConnectionLost")
    return {"stop_s": stop_s, "start_on_same_ports_s": start_s,
            "ready_to_first_answer_s": first_s, "stop_begins_to_first_answer_s": gap_s,
            **tally(calls), "stale_ConnectionLost": stale}


def long_call(c: WKRClient, workdir: str, name: str) -> Call:
    """A call held in predict for longer than a few of the client's read slices."""
    hold = Hold(workdir, name)
    pending = Pending(c, hold.item)
    _, started = hold.started()
    try:
        wait_for(lambda: time.monotonic() - started >= LONG_CALL_S, LIMIT_S, "a long call")
    finally:
        hold.release()
    return pending.join()


def kill9_supervisor_leftovers(workdir: str, repeat: int) -> dict[str, Any]:
    """kill -9 of a CLI server's whole tree (own TMPDIR): what is left in the temp dir and
    in /proc/net/unix; then the next server's start cleans the temp dir."""
    out: dict[str, Any] = {"kill_to_tree_ended_s": [], "tree_ended_to_names_released_s": [],
                           "wkr_entries_while_running": [], "wkr_entries_after_kill": [],
                           "abstract_names_while_running": [],
                           "abstract_names_when_tree_ended": [], "abstract_names_left": [],
                           "stale_wkr_entries_after_next_start": [],
                           "wkr_entries_after_clean_stop": [], "clean_stop_exit_code": []}
    for n in range(repeat):
        systmp = Path(workdir, f"systmp-{n}")
        systmp.mkdir()
        env = {"TMPDIR": str(systmp)}
        first = CLI(Path(workdir), f"first-{n}", "-num_worker", "2", env=env)
        try:
            with first.client() as c:
                c.encode("up")
            out["wkr_entries_while_running"].append(len(wkr_entries(systmp)))
            out["abstract_names_while_running"].append(abstract_names(first.pid))
            killed = time.monotonic()
            first.kill_tree()
            ended_at = time.monotonic()
            out["kill_to_tree_ended_s"].append(ended_at - killed)
            out["abstract_names_when_tree_ended"].append(abstract_names(first.pid))
            with contextlib.suppress(TimeoutError):  # what is left is the measurement
                wait_for(functools.partial(no_abstract_names, first.pid), NAMES_LIMIT_S,
                         "the socket names released")
                out["tree_ended_to_names_released_s"].append(time.monotonic() - ended_at)
            out["abstract_names_left"].append(abstract_names(first.pid))
            out["wkr_entries_after_kill"].append(len(wkr_entries(systmp)))
        finally:
            first.stop()
        with cli(Path(workdir), f"second-{n}", env=env) as second:
            with second.client() as c:
                c.encode("up")
            mine = f"-{second.pid}-"
            out["stale_wkr_entries_after_next_start"].append(
                sum(1 for e in wkr_entries(systmp) if mine not in e))
            out["clean_stop_exit_code"].append(second.stop())
        out["wkr_entries_after_clean_stop"].append(len(wkr_entries(systmp)))
    return out


def missing_model_dir(workdir: str, repeat: int) -> dict[str, Any]:
    """``wkr-serving-start -model_dir <missing>``: how fast it exits, its exit code and
    its error lines."""
    took, codes, lines = [], [], []
    missing = Path(workdir, "no", "model")
    exe = shutil.which("wkr-serving-start")
    assert exe, "the wkr-serving-start entry point is not installed"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for _ in range(repeat):
        t0 = time.monotonic()
        proc = subprocess.run(
            [exe, "fault_worker.Worker", "-model_dir", str(missing), "-port", "0",
             "-port_out", "0", "-bind", "127.0.0.1", "-cpu"], cwd=HERE, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=LIMIT_S,
            check=False)
        took.append(time.monotonic() - t0)
        codes.append(proc.returncode)
        lines.append([line for line in proc.stderr.splitlines() if line.strip()])
    return {"start_to_exit_s": took, "exit_codes": sorted(set(codes)),
            "stderr_lines": max(len(x) for x in lines),
            "error_line": lines[0][0] if lines[0] else "",
            "model_dir_created": missing.exists()}


def terminate(workdir: str, repeat: int) -> dict[str, Any]:
    took = []
    for n in range(repeat):
        with server(_fresh_dir(workdir, n)) as srv, client(srv) as c:
            t0 = time.monotonic()
            c.terminate()
            srv.join(LIMIT_S)
            took.append(time.monotonic() - t0)
            assert srv.exit_code == 0
    return {"terminate_to_stopped_s": took}


def overloaded(workdir: str, repeat: int) -> dict[str, Any]:
    rtt = []
    with server(workdir, "-num_worker", "1", "-max_queue_size", "4") as srv, \
            client(srv) as c, client(srv) as filler:
        hold = Hold(workdir, "q")
        c.encode(hold.item, blocking=False)
        hold.started()
        for i in range(4):
            filler.encode(i, blocking=False)
        wait_for(lambda: c.server_status["queue_items"] == 4, LIMIT_S, "a full queue")
        for i in range(OVERLOADED_REQUESTS):
            t0 = time.perf_counter()
            try:
                c.encode(i, timeout=10_000)
            except Overloaded:
                rtt.append(time.perf_counter() - t0)
        hold.release()
        filler.fetch_all()
        c.fetch_all()
    assert len(rtt) == OVERLOADED_REQUESTS, (
        f"{OVERLOADED_REQUESTS - len(rtt)} requests were not refused")
    return {"Overloaded_round_trip_s": rtt}


def _fresh_dir(workdir: str, n: int) -> str:
    """A model/log directory for the ``n``-th server of a scenario that stops it."""
    path = os.path.join(workdir, f"server-{n}")
    os.makedirs(path)
    return path


#: Every scenario, in the order they run: name -> function(workdir, repeat).
SCENARIOS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "exit_code_3": exit_code_3,
    "worker_killed": worker_killed,
    "poison_input": poison_input,
    "log_dir_unwritable": log_dir_unwritable,
    "prediction_log_rotation": prediction_log_rotation,
    "server_restart_same_ports": server_restart_same_ports,
    "kill9_supervisor_leftovers": kill9_supervisor_leftovers,
    "recycling": recycling,
    "missing_model_dir": missing_model_dir,
    "ventilator_killed": ventilator_killed,
    "sink_killed": sink_killed,
    "worker_timeout": worker_timeout,
    "terminate": terminate,
    "overloaded": overloaded,
}


# -- report --------------------------------------------------------------------------------


def summarise(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "median_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
            "max_ms": ordered[-1] * 1000, "min_ms": ordered[0] * 1000}


def is_times(key: str, value: Any) -> bool:
    return key.endswith("_s") and isinstance(value, list)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# wkr-serving fault reaction times", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             f"- machine: {report['machine']}", f"- wkr-serving {report['version']}",
             f"- load average (1 min) before / after: {report['loadavg_before']:.2f} / "
             f"{report['loadavg_after']:.2f}",
             "- CPU used by other processes during each scenario (% of the machine; "
             "kill9_supervisor_leftovers counts its killed server there, as init reaps "
             "its processes): "
             + ", ".join(f"{k} {v[OTHERS]}" for k, v in report["results"].items()), "",
             "## Times", "",
             "| scenario | measured | n | median ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|"]
    for scenario, values in report["results"].items():
        for name, s in values.items():
            if isinstance(s, dict) and "n" in s:
                if s["n"]:
                    lines.append(f"| {scenario} | {name} | {s['n']} | {s['median_ms']:.1f} | "
                                 f"{s['p99_ms']:.1f} | {s['max_ms']:.1f} |")
                else:
                    lines.append(f"| {scenario} | {name} | 0 | - | - | - |")
    lines += ["", "## Counts and facts (summed or listed over the repeats)", "",
              "| scenario | measured | value |", "|---|---|---|"]
    for scenario, values in report["results"].items():
        for name, value in values.items():
            if not (isinstance(value, dict) and "n" in value) and name != OTHERS:
                shown = json.dumps(value) if not isinstance(value, str) else value
                lines.append(f"| {scenario} | {name} | {shown.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def cpu_snapshot() -> tuple[float, float, float]:
    """``(monotonic time, CPU seconds the machine was busy, CPU seconds of this process
    and of the children it reaped)``. Taken between scenarios, when every server of the
    last one has stopped and been reaped, the difference of two snapshots tells how much
    of the machine other processes used meanwhile."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    own = os.times()
    return (time.monotonic(), busy,
            own.user + own.system + own.children_user + own.children_system)


def others_share(before: tuple[float, float, float]) -> float:
    """Percent of the machine's CPU used by other processes since ``before``."""
    after = cpu_snapshot()
    wall = (after[0] - before[0]) * (os.cpu_count() or 1)
    others = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, 100.0 * others / wall), 1) if wall > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", help="write JSON here, and Markdown beside it")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    results: dict[str, Any] = {}
    loadavg_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="wkr-faults-") as workdir:
        for name in names:
            sub = os.path.join(workdir, name)
            os.makedirs(sub)
            before = cpu_snapshot()
            raw = SCENARIOS[name](sub, args.repeat)
            results[name] = {k: summarise(v) if is_times(k, v) else v for k, v in raw.items()}
            results[name][OTHERS] = others_share(before)
            print(name, json.dumps(results[name]), flush=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python benchmarks/faults.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores, Python {platform.python_version()}",
              "version": __version__, "repeat": args.repeat,
              "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()[0],
              "results": results}
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
