#!/usr/bin/env python
"""Soak benchmark for wkr-serving: a long closed-loop W1 run, watching every server
process's memory.

    python benchmarks/soak.py                 # 1,000,000 W1 requests at C=64 (about 1 minute)
    python benchmarks/soak.py --quick         # 50,000 requests, smoke run
    python benchmarks/soak.py --out benchmarks/results/soak.json

It starts ``wkr-serving-start example/noop_worker.Worker`` as a real subprocess (1 worker,
``-protocol numpy -batch_size 32 -batch_group_timeout 5``, free ports on 127.0.0.1), finds
its processes with psutil (supervisor = the started pid; ventilator and workers named from
``server_status``; the multiprocessing resource tracker from its command line; the
remaining child is the sink) and drives it with the closed-loop generator of
``benchmarks/run.py``: ``P`` spawned load processes x ``N`` ``WKRClient`` connections x
``K`` requests in flight (default ``2x4x8`` = 64), each process waiting for its oldest
request and re-sending at once.

Phases: warm-up (``--warmup-requests``, drained), baseline sample (server idle), the
measured ``--requests``, end sample (server idle again). The RSS of every server process
is sampled at the baseline, every ``--interval`` seconds during the run and at the end;
the report has per-process growth (MiB and %), a FLAT/GROWING verdict (flat: growth below
``--flat-mib`` MiB or below ``--flat-pct`` % of the baseline), throughput and latency
p50/p99 per interval, and the correctness checks: every request gets exactly one reply
(client ids, plus the server's own request/result counters), no errors, and every
``--check-every``-th reply equals its input. Every loop is bounded by its request count
and by ``--max-seconds``. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawned load processes inherit sys.path

import run as bench  # noqa: E402  (benchmarks/run.py: machine info, JSON cleaning)

REPO = HERE.parent
HOST = bench.HOST
WORKER_SPEC = "example/noop_worker.Worker"
SERVER_FLAGS = ["-bind", HOST, "-protocol", "numpy", "-num_worker", "1", "-batch_size", "32",
                "-batch_group_timeout", "5"]
IN_SHAPE = (4,)
#: Distinct payloads each load process cycles through, so a reply paired with the wrong
#: request would be seen by the content check.
PAYLOADS = 251
CLIENT_TIMEOUT_MS = bench.CLIENT_TIMEOUT_MS
START_LIMIT_S = 60.0  # server ready
SPAWN_LIMIT_S = bench.SPAWN_LIMIT_S  # load processes connected and warmed up
FINISH_LIMIT_S = bench.FINISH_LIMIT_S  # load processes done after the deadline
STOP_LIMIT_S = 40.0  # server exit after SIGTERM (its -graceful_timeout is 30 s)
MIB = float(1 << 20)
LOG_LEVEL = re.compile(r"^\[[^\]]*\]: ([WEC]):", re.MULTILINE)


# ---------------------------------------------------------------------------------------
# load processes (spawned)
# ---------------------------------------------------------------------------------------


def _closed_loop(clients: list[Any], depth: int, cap: int, deadline: float,
                 pool: list[np.ndarray], check_every: int, record: bool) -> dict[str, Any]:
    """Keep ``len(clients) * depth`` requests in flight until ``cap`` were sent or the
    ``perf_counter`` deadline passed, then drain. One send-order FIFO: wait for the oldest
    request's reply, account it, re-send on its connection at once."""
    pc = time.perf_counter
    n_pool = len(pool)
    done_at, lat = array("d"), array("d")
    fifo: deque[tuple[Any, int, int, float]] = deque()
    push, pop = fifo.append, fifo.popleft
    sent = received = errors = lost = checked = mismatches = wrong_ids = 0
    first_problem = ""
    stopped_by = "requests"
    for _ in range(depth):
        for client in clients:
            if sent < cap:
                k = sent % n_pool
                ts = pc()
                push((client, client.encode(pool[k], blocking=False), k, ts))
                sent += 1
    while fifo:
        client, rid, k, ts = pop()
        try:
            response = next(client.fetch())
        except Exception as exc:  # no reply in CLIENT_TIMEOUT_MS: counted as lost
            lost += 1
            first_problem = first_problem or f"request {rid}: {type(exc).__name__}: {exc}"
            continue
        te = pc()
        received += 1
        if response.id != rid:
            wrong_ids += 1
            first_problem = first_problem or f"request {rid} got the reply of {response.id}"
        if response.error_code:
            errors += 1
            first_problem = first_problem or f"request {rid}: {response.error_message}"
        elif received % check_every == 0:
            checked += 1
            y = response.embedding
            if not (isinstance(y, np.ndarray) and y.dtype == np.float32
                    and y.shape == IN_SHAPE and np.array_equal(y, pool[k])):
                mismatches += 1
                first_problem = first_problem or f"request {rid}: reply {y!r} != its input"
        if record:
            done_at.append(te)
            lat.append(te - ts)
        if sent < cap:
            if te >= deadline:
                stopped_by, cap = "deadline", sent
                continue
            k = sent % n_pool
            ts = pc()
            push((client, client.encode(pool[k], blocking=False), k, ts))
            sent += 1
    return {"sent": sent, "received": received, "errors": errors, "lost": lost,
            "checked": checked, "mismatches": mismatches, "wrong_ids": wrong_ids,
            "first_problem": first_problem, "stopped_by": stopped_by,
            "done_at": done_at.tobytes(), "lat": lat.tobytes()}


def _load_process(index: int, cfg: dict[str, Any], queue: Any, go: Any, t_go: Any) -> None:
    """One spawned load process: connect, warm up, wait for the common start, run."""
    try:
        from wkr_serving.client import WKRClient

        rng = np.random.default_rng(index)
        pool = [rng.standard_normal(IN_SHAPE).astype(np.float32) for _ in range(PAYLOADS)]
        clients = [WKRClient(HOST, cfg["port"], cfg["port_out"], protocol="numpy",
                             timeout=CLIENT_TIMEOUT_MS) for _ in range(cfg["conns"])]
        try:
            warm = _closed_loop(clients, cfg["depth"], cfg["warmup"],
                                time.perf_counter() + cfg["max_seconds"], pool, 1, False)
            queue.put(("warm", index, {k: v for k, v in warm.items()
                                       if k not in ("done_at", "lat")}))
            if not go.wait(SPAWN_LIMIT_S + cfg["max_seconds"]):
                raise RuntimeError("no start signal from the soak process")
            result = _closed_loop(clients, cfg["depth"], cfg["requests"],
                                  t_go.value + cfg["max_seconds"], pool, cfg["check_every"],
                                  True)
            result["pending_after"] = sum(c.status["num_pending_request"] for c in clients)
            queue.put(("result", index, result))
        finally:
            for client in clients:
                client.close()
    except BaseException:
        queue.put(("error", index, traceback.format_exc()))


# ---------------------------------------------------------------------------------------
# the server subprocess and its processes
# ---------------------------------------------------------------------------------------


#: The supervisor's log line once the server is ready, with the ports it bound: the
#: server is started with port 0 (a number picked here could be taken by another
#: process before the server binds it), and this line says which ports it got.
READY_LINE = re.compile(r"\bready: port (\d+), port_out (\d+)")


def _server_command(port: int, port_out: int, model_dir: str,
                    extra: Sequence[str] = ()) -> list[str]:
    beside = Path(sys.executable).with_name("wkr-serving-start")
    exe = str(beside) if beside.exists() else shutil.which("wkr-serving-start")
    if not exe:
        raise RuntimeError("the wkr-serving-start entry point is not installed")
    return [exe, WORKER_SPEC, "-port", str(port), "-port_out", str(port_out), *SERVER_FLAGS,
            *extra, "-model_dir", model_dir]


class Server:
    """``wkr-serving-start`` as a subprocess (:data:`SERVER_FLAGS`, then ``extra``); its
    output goes to a file (never a pipe)."""

    def __init__(self, workdir: str, extra: Sequence[str] = ()) -> None:
        self.port = self.port_out = 0  # bound by the server; read back in connect()
        self.command = _server_command(0, 0, workdir, extra)
        self.log_path = Path(workdir, "server.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children: list[psutil.Process] = []
        self.exit: dict[str, Any] = {}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def connect(self) -> Any:
        """A status client, once the server answers and all its workers are ready."""
        from wkr_serving.client import WKRClient, WKRError

        deadline = time.monotonic() + START_LIMIT_S
        pause = threading.Event()
        client = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"server not ready in {START_LIMIT_S}s:\n{self.log()[-4000:]}")
            ready = READY_LINE.search(self.log())
            try:
                if client is None and ready:
                    self.port, self.port_out = int(ready[1]), int(ready[2])
                    client = WKRClient(HOST, self.port, self.port_out, protocol="numpy",
                                       timeout=10_000, connect_timeout=1000)
                if client is not None and client.server_status["ready"]:
                    self.children = psutil.Process(self.proc.pid).children(recursive=True)
                    return client
            except WKRError:
                pass  # not up yet: try again
            pause.wait(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM the started pid, wait bounded; kill only its tree if it stays."""
        if self.exit:
            return self.exit
        t = time.monotonic()
        forced = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                forced = True
                for proc in self.children:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                self.proc.kill()
                self.proc.wait(10)
        _gone, alive = psutil.wait_procs(self.children, timeout=10)
        for proc in alive:  # only our server's children
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self._log.close()
        self.exit = {"exit_code": self.proc.returncode, "seconds": time.monotonic() - t,
                     "forced": forced, "children_left": [p.pid for p in alive]}
        return self.exit


def _roles(server: Server, status: dict[str, Any]) -> dict[int, str]:
    """pid -> role for every process of the server."""
    roles = {server.proc.pid: "supervisor", **bench.server_role_names(status)}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        if proc.pid in roles:
            continue
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        roles[proc.pid] = ("mp-resource-tracker" if "resource_tracker" in cmdline
                           else f"pid-{proc.pid}")
    return roles


class Sampler:
    """RSS of every server process (and the server's counters) on demand, and every
    ``interval`` seconds from ``t0`` in a thread while the load runs."""

    def __init__(self, server: Server, status_client: Any, roles: dict[int, str],
                 interval: float) -> None:
        self.server, self.client, self.interval = server, status_client, interval
        self.procs = {role: psutil.Process(pid) for pid, role in roles.items()}
        self.known = set(roles)
        self.load_procs: list[psutil.Process] = []  # set by run_load, for the CPU figures
        self.samples: list[dict[str, Any]] = []
        self.changes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def sample(self, label: str) -> dict[str, Any]:
        now = time.perf_counter()
        rss: dict[str, float | None] = {}
        for role, proc in self.procs.items():
            try:
                rss[role] = proc.memory_info().rss / MIB
            except psutil.Error:
                rss[role] = None
                self.changes.append(f"{label}: {role} (pid {proc.pid}) is gone")
        try:
            current = {p.pid for p in psutil.Process(self.server.proc.pid).children(True)}
            current.add(self.server.proc.pid)
        except psutil.Error:
            current = set()
        for pid in sorted(current - self.known):
            self.changes.append(f"{label}: new server process pid {pid}")
            self.known.add(pid)
        try:
            status = self.client.server_status
            counters = {k: status.get(k) for k in ("num_requests", "num_results",
                                                   "num_undeliverable", "queue_items")}
            counters["batch_counts"] = status["batch_size"]["counts"]
            counters["num_errors"] = sum((status.get("num_errors") or {}).values())
        except Exception as exc:
            counters = {"error": f"{type(exc).__name__}: {exc}"}
        return {"label": label, "t_s": now - self.t0 if self.t0 else 0.0, "rss_mib": rss,
                "server": counters, "cpu": self._cpu()}

    def _cpu(self) -> dict[str, float]:
        """Busy CPU seconds of the whole machine and of our processes (server, load,
        this one), so an interval's ``not_ours`` share shows other load on the machine.
        Load processes that were joined count in this process's ``children_*`` times."""
        t = psutil.cpu_times()
        machine = (t.user + t.nice + t.system + t.irq + t.softirq
                   + getattr(t, "steal", 0.0))
        me = psutil.Process().cpu_times()
        ours = me.user + me.system + me.children_user + me.children_system
        for proc in [*self.procs.values(), *self.load_procs]:
            with contextlib.suppress(psutil.Error):  # gone: joined, so in children_*
                c = proc.cpu_times()
                ours += c.user + c.system
        return {"machine_s": machine, "ours_s": ours}

    def details(self) -> dict[str, dict[str, Any]]:
        """CPU seconds, open files and threads of every process (baseline and end)."""
        out = {}
        for role, proc in self.procs.items():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    out[role] = {"pid": proc.pid, "cpu_s": cpu.user + cpu.system,
                                 "fds": proc.num_fds(), "threads": proc.num_threads()}
            except psutil.Error:
                out[role] = {"pid": proc.pid}
        return out

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        k = 1
        last = self.sample("start")["server"].get("num_requests") or 0
        while not self._stop.wait(max(0.0, self.t0 + k * self.interval - time.perf_counter())):
            s = self.sample(f"t{k}")
            self.samples.append(s)
            n = s["server"].get("num_requests")
            rate = f"{(n - last) / self.interval:>9,.0f} req/s" if n is not None else "-"
            last = n if n is not None else last
            print(f"  t={s['t_s']:6.1f}s  server {rate}  RSS MiB "
                  + " ".join(f"{r}={v:.1f}" for r, v in s["rss_mib"].items() if v is not None),
                  flush=True)
            k += 1


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


def _layout(concurrency: int, spec: str | None) -> tuple[int, int, int]:
    if spec:
        p, n, k = (int(v) for v in spec.split("x"))
    elif concurrency == 64:
        p, n, k = 2, 4, 8  # benchmarks/run.py's default C=64 layout
    else:
        p = 2 if concurrency % 2 == 0 else 1
        n = next(d for d in (4, 2, 1) if (concurrency // p) % d == 0)
        k = concurrency // p // n
    if min(p, n, k) < 1 or p * n * k != concurrency:
        raise ValueError(f"load layout {p}x{n}x{k} does not give concurrency {concurrency}")
    return p, n, k


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_load(server: Server, sampler: Sampler, settings: dict[str, Any],
             report: dict[str, Any]) -> list[dict[str, Any]]:
    """Warm up, take the baseline, run the measured requests with the sampler on."""
    procs, conns, depth = settings["layout"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    t_go = ctx.Value("d", 0.0, lock=False)
    base = {"port": server.port, "port_out": server.port_out, "conns": conns, "depth": depth,
            "check_every": settings["check_every"], "max_seconds": settings["max_seconds"]}
    workers = [ctx.Process(target=_load_process, name=f"wkr-soak-load-{i}", daemon=True,
                           args=(i, {**base, "warmup": w, "requests": r}, queue, go, t_go))
               for i, (w, r) in enumerate(zip(_shares(settings["warmup_requests"], procs),
                                              _shares(settings["requests"], procs), strict=True))]
    for w in workers:
        w.start()
        sampler.load_procs.append(psutil.Process(w.pid))
    try:
        warm: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + SPAWN_LIMIT_S + settings["max_seconds"]
        while len(warm) < procs:
            tag, index, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if tag == "error":
                raise RuntimeError(f"load process {index} failed:\n{value}")
            warm[index] = value
        report["warmup"] = [warm[i] for i in range(procs)]
        report["baseline"] = sampler.sample("baseline")
        report["baseline_details"] = sampler.details()
        report["baseline_perf_counter"] = time.perf_counter()
        t0 = time.perf_counter()  # the common start: every completion comes after it
        t_go.value = t0
        go.set()
        sampler.start(t0)
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + settings["max_seconds"] + FINISH_LIMIT_S
        while len(results) < procs:
            tag, index, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if tag == "error":
                raise RuntimeError(f"load process {index} failed:\n{value}")
            results[index] = value
        sampler.stop()
        report["t0"] = t0
        for w in workers:
            w.join(FINISH_LIMIT_S)
        return [results[i] for i in range(procs)]
    finally:
        sampler.stop()
        for w in workers:  # only the processes started here
            if w.is_alive():
                w.terminate()
                w.join(5)
        queue.close()
        queue.join_thread()


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def _mean_batch(before: dict[str, int], after: dict[str, int]) -> float:
    delta = {int(k): v - before.get(k, 0) for k, v in after.items()}
    n = sum(delta.values())
    return sum(k * v for k, v in delta.items()) / n if n else math.nan


def _cpu_shares(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Machine busy CPU and the part not used by our processes between two samples, in %
    of one core."""
    wall = b["t_s"] - a["t_s"]
    if wall <= 0:
        return {"machine_cpu_pct": math.nan, "not_ours_cpu_pct": math.nan}
    busy = b["cpu"]["machine_s"] - a["cpu"]["machine_s"]
    ours = b["cpu"]["ours_s"] - a["cpu"]["ours_s"]
    return {"machine_cpu_pct": 100.0 * busy / wall,
            "not_ours_cpu_pct": max(0.0, 100.0 * (busy - ours) / wall)}


def analyse(report: dict[str, Any], results: list[dict[str, Any]], settings: dict[str, Any]
            ) -> None:
    """Fill in totals, intervals, per-process memory and the verdicts."""
    t0, interval = report["t0"], settings["interval"]
    done = np.concatenate([np.frombuffer(r["done_at"], dtype=np.float64) for r in results]) - t0
    lat_ms = np.concatenate([np.frombuffer(r["lat"], dtype=np.float64) for r in results]) * 1e3
    for r in results:
        del r["done_at"], r["lat"]
    keys = ("sent", "received", "errors", "lost", "checked", "mismatches", "wrong_ids",
            "pending_after")
    totals: dict[str, Any] = {k: sum(r[k] for r in results) for k in keys}
    elapsed = float(done.max()) if done.size else math.nan
    totals.update({"elapsed_s": elapsed, "req_per_s": totals["received"] / elapsed,
                   "p50_ms": _pct(lat_ms, 50), "p99_ms": _pct(lat_ms, 99),
                   "max_ms": float(lat_ms.max()) if lat_ms.size else math.nan,
                   "stopped_by": sorted({r["stopped_by"] for r in results}),
                   "first_problem": next((r["first_problem"] for r in results
                                          if r["first_problem"]), "")})
    report["load_processes"] = results

    samples = [report["baseline"], *report["samples"], report["end"]]
    base_srv, end_srv = report["baseline"]["server"], report["end"]["server"]
    server_counts = {k: (end_srv.get(k) or 0) - (base_srv.get(k) or 0)
                     for k in ("num_requests", "num_results", "num_undeliverable", "num_errors")}
    totals["server"] = server_counts

    # intervals [k*I, (k+1)*I) from the client side, RSS from the sample at each end
    intervals = []
    order = np.argsort(done, kind="stable")
    done, lat_ms = done[order], lat_ms[order]
    n_int = max(1, math.ceil(elapsed / interval)) if done.size else 0
    edges = np.searchsorted(done, [k * interval for k in range(n_int + 1)], side="left")
    edges[0], edges[-1] = 0, done.size
    prev = samples[0]
    for k in range(n_int):
        lo, hi = int(edges[k]), int(edges[k + 1])
        t_end = min((k + 1) * interval, elapsed)
        width = t_end - k * interval
        at_end = next((s for s in samples[1:] if s["t_s"] >= t_end - 1e-6), samples[-1])
        intervals.append({
            "t_start_s": k * interval, "t_end_s": t_end, "requests": hi - lo,
            "req_per_s": (hi - lo) / width if width > 0 else math.nan,
            "p50_ms": _pct(lat_ms[lo:hi], 50), "p99_ms": _pct(lat_ms[lo:hi], 99),
            "mean_batch": _mean_batch(prev["server"].get("batch_counts") or {},
                                      at_end["server"].get("batch_counts") or {}),
            "rss_sample": at_end["label"], "rss_mib": at_end["rss_mib"],
            **_cpu_shares(prev, at_end)})
        prev = at_end
    report["intervals"] = intervals
    full = [iv["req_per_s"] for iv in intervals
            if iv["t_end_s"] - iv["t_start_s"] >= interval - 1e-9]
    if full:
        half = len(full) // 2
        totals["interval_req_per_s"] = {
            "min": min(full), "max": max(full), "mean": float(np.mean(full)),
            "second_half_over_first_half": (float(np.mean(full[half:]) / np.mean(full[:half]))
                                            if half else math.nan)}
    report["totals"] = totals

    # memory per process: end (idle) vs baseline (idle, after the warm-up)
    flat_mib, flat_pct = settings["flat_mib"], settings["flat_pct"]
    processes = {}
    for role, start in report["baseline"]["rss_mib"].items():
        end = report["end"]["rss_mib"].get(role)
        series = [(s["t_s"], s["rss_mib"].get(role)) for s in report["samples"]]
        series = [(t, v) for t, v in series if v is not None]
        d0, d1 = report["baseline_details"].get(role, {}), report["end_details"].get(role, {})
        entry: dict[str, Any] = {
            "pid": d0.get("pid"), "rss_idle_mib": report["idle"]["rss_mib"].get(role),
            "rss_start_mib": start, "rss_end_mib": end,
            "rss_peak_mib": max([v for _, v in series] + [x for x in (start, end) if x]),
            "fds_start": d0.get("fds"), "fds_end": d1.get("fds"),
            "threads_start": d0.get("threads"), "threads_end": d1.get("threads"),
            "cpu_percent": (100.0 * (d1["cpu_s"] - d0["cpu_s"]) / report["cpu_window_s"]
                            if "cpu_s" in d0 and "cpu_s" in d1 else None),
        }
        if len(series) >= 3:
            ts, vs = np.array(series).T
            entry["slope_mib_per_min"] = float(np.polyfit(ts / 60.0, vs, 1)[0])
        if start is None or end is None:
            entry.update(growth_mib=None, growth_pct=None, flat=False)
        else:
            growth = end - start
            pct = 100.0 * growth / start
            entry.update(growth_mib=growth, growth_pct=pct,
                         flat=bool(growth < flat_mib or pct < flat_pct))
        processes[role] = entry
    report["processes"] = processes

    expected = settings["requests"]
    checks = {
        "all requests sent": totals["sent"] == expected,
        "one reply per request (client)": totals["received"] == totals["sent"]
        and totals["lost"] == 0 and totals["wrong_ids"] == 0 and totals["pending_after"] == 0,
        "server counted every request once": server_counts["num_requests"] == totals["sent"],
        "server sent every result once": server_counts["num_results"] == totals["received"]
        and server_counts["num_undeliverable"] == 0,
        "no errors": totals["errors"] == 0 and server_counts["num_errors"] == 0,
        f"sampled replies equal their input ({totals['checked']:,} checked)":
            totals["mismatches"] == 0 and totals["checked"] > 0,
        "server processes unchanged": not report["process_changes"],
        "server stopped cleanly on SIGTERM": report["shutdown"].get("exit_code") == 0
        and not report["shutdown"].get("forced") and not report["shutdown"]["children_left"],
    }
    memory_flat = all(p["flat"] for p in processes.values())
    report["checks"] = checks
    report["verdict"] = {
        "memory": "FLAT" if memory_flat else "GROWING",
        "rule": f"a process is flat if its RSS grew by less than {flat_mib:g} MiB or less than "
                f"{flat_pct:g} % between the baseline (idle, after the warm-up) and the end "
                "(idle, after the run)",
        "correct": all(checks.values()),
        "all_ok": memory_flat and all(checks.values()),
    }


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def markdown(report: dict[str, Any]) -> str:
    def table(columns: list[str], rows: list[list[str]]) -> list[str]:
        return (["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
                + ["| " + " | ".join(r) + " |" for r in rows])

    m, st, tot = report["machine"], report["settings"], report["totals"]
    srv, v = tot["server"], report["verdict"]
    p, n, k = st["layout"]
    lines = [f"# wkr-serving soak ({report['mode']})", "",
             f"- date: {report['date']}",
             f"- command: `{report['command']}`",
             f"- machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}",
             f"- software: Python {m['python']}, numpy {m['numpy']}, pyzmq {m['pyzmq']} (libzmq "
             f"{m['libzmq']}), msgpack {m['msgpack']}, wkr-serving {m['wkr_serving']}",
             f"- server: `{' '.join(report['server_command'])}` (real subprocess)",
             f"- load: W1 noop float32 (4,), concurrency {st['concurrency']} = {p} load processes "
             f"x {n} WKRClient connections x {k} in flight; warm-up "
             f"{st['warmup_requests']:,} requests, then {st['requests']:,} measured; RSS sampled "
             f"every {st['interval']:g} s",
             f"- load average (1 min) at start: {m['loadavg_at_start'][0]:.2f}", "",
             "## Headline", "",
             f"- **{tot['received']:,} requests in {tot['elapsed_s']:.1f} s = "
             f"{tot['req_per_s']:,.0f} req/s**, latency p50 {tot['p50_ms']:.3f} ms, "
             f"p99 {tot['p99_ms']:.3f} ms, max {tot['max_ms']:.1f} ms",
             f"- errors {tot['errors']}, lost {tot['lost']}, wrong reply ids {tot['wrong_ids']}, "
             f"content mismatches {tot['mismatches']} of {tot['checked']:,} checked; server "
             f"counted {srv['num_requests']:,} requests / {srv['num_results']:,} results, "
             f"{srv['num_undeliverable']} undeliverable",
             f"- **memory: {v['memory']}** ({v['rule']})",
             f"- **checks: {'all passed' if v['correct'] else 'FAILED'}**", ""]
    if "interval_req_per_s" in tot:
        ir = tot["interval_req_per_s"]
        lines[-1:-1] = [f"- full intervals: {ir['min']:,.0f} to {ir['max']:,.0f} req/s "
                        f"(mean {ir['mean']:,.0f}); second half / first half "
                        f"{_f(ir['second_half_over_first_half'], '.3f')}"]
    lines += ["## RSS per server process (MiB)", "",
              "idle: server ready, before any load; start: after the warm-up, server idle; "
              "end: after the last reply, server idle; slope: least-squares fit of the "
              "samples taken under load.", ""]
    lines += table(["process", "pid", "idle", "start", "end", "peak", "growth MiB", "growth %",
                    "slope MiB/min", "fds start/end", "threads start/end", "CPU %", "flat"],
                   [[role, str(e["pid"]), _f(e["rss_idle_mib"], ".1f"),
                     _f(e["rss_start_mib"], ".1f"), _f(e["rss_end_mib"], ".1f"),
                     _f(e["rss_peak_mib"], ".1f"), _f(e["growth_mib"], "+.2f"),
                     _f(e["growth_pct"], "+.2f"), _f(e.get("slope_mib_per_min"), "+.3f"),
                     f"{e['fds_start']}/{e['fds_end']}",
                     f"{e['threads_start']}/{e['threads_end']}", _f(e["cpu_percent"], ".0f"),
                     "yes" if e["flat"] else "**NO**"]
                    for role, e in report["processes"].items()])
    roles = list(report["processes"])
    lines += ["", f"## Per interval ({st['interval']:g} s)", "",
              "Client side: completions whose reply arrived in the interval, their round-trip "
              "latency; mean batch from the ventilator's histogram; machine CPU: busy CPU of "
              f"the whole machine in % of one core ({report['machine']['cores']} cores = "
              f"{100 * (report['machine']['cores'] or 0)} %), not ours: the part of it used "
              "by processes outside this run; RSS (MiB) sampled at the interval's end (the "
              "last row: the end sample).", ""]
    lines += table(["t (s)", "requests", "req/s", "p50 ms", "p99 ms", "mean batch",
                    "machine CPU %", "not ours %", *[f"{r} RSS" for r in roles]],
                   [[f"{iv['t_start_s']:.1f}-{iv['t_end_s']:.1f}", f"{iv['requests']:,}",
                     _f(iv["req_per_s"], ",.0f"), _f(iv["p50_ms"], ".3f"),
                     _f(iv["p99_ms"], ".3f"), _f(iv["mean_batch"], ".2f"),
                     _f(iv["machine_cpu_pct"], ".0f"), _f(iv["not_ours_cpu_pct"], ".0f"),
                     *[_f(iv["rss_mib"].get(r), ".1f") for r in roles]]
                    for iv in report["intervals"]])
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in report["checks"].items()]
    if tot["first_problem"]:
        lines.append(f"- first problem: {tot['first_problem']}")
    lines += [f"- process change: {c}" for c in report["process_changes"]]
    sd = report["shutdown"]
    lines.append(f"- shutdown: exit code {sd['exit_code']} after {sd['seconds']:.2f} s"
                 + (", killed" if sd["forced"] else "")
                 + (f", children left {sd['children_left']}" if sd["children_left"] else ""))
    if report["server_log_levels"]:
        lines.append(f"- server log warnings/errors: {report['server_log_levels']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, help="measured requests (default 1,000,000; "
                        "--quick: 50,000)")
    parser.add_argument("--warmup-requests", type=int,
                        help="requests before the baseline (default 100,000; --quick: 10,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--layout", metavar="PxNxK", help="load processes x connections x "
                        "in flight per connection (default 2x4x8 for 64)")
    parser.add_argument("--interval", type=float, default=5.0, help="sampling seconds")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="safety cap on the measured phase (and on the warm-up)")
    parser.add_argument("--check-every", type=int, default=100,
                        help="compare every Nth reply with its input (all are counted)")
    parser.add_argument("--flat-mib", type=float, default=10.0,
                        help="flat if a process grew by less than this many MiB ...")
    parser.add_argument("--flat-pct", type=float, default=5.0, help="... or by less than this %%")
    parser.add_argument("--quick", action="store_true", help="50,000 requests (smoke run)")
    parser.add_argument("--out", default=str(HERE / "results" / "soak.json"),
                        help="JSON results file (a .md report is written beside it)")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {
        "requests": args.requests or (50_000 if args.quick else 1_000_000),
        "warmup_requests": (args.warmup_requests if args.warmup_requests is not None
                            else 10_000 if args.quick else 100_000),
        "concurrency": args.concurrency,
        "layout": _layout(args.concurrency, args.layout),
        "interval": args.interval, "max_seconds": args.max_seconds,
        "check_every": max(1, args.check_every),
        "flat_mib": args.flat_mib, "flat_pct": args.flat_pct,
    }
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(__file__, os.getcwd()),
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": bench.machine_info(), "settings": settings,
    }
    print(f"wkr-serving soak: {settings['requests']:,} W1 requests at concurrency "
          f"{settings['concurrency']} (layout {'x'.join(map(str, settings['layout']))})",
          flush=True)
    workdir = tempfile.mkdtemp(prefix="wkr-soak-")
    server = Server(workdir)
    report["server_command"] = ["wkr-serving-start", *server.command[1:-2]]
    client = None
    try:
        client = server.connect()
        roles = _roles(server, client.server_status)
        sampler = Sampler(server, client, roles, settings["interval"])
        report["idle"] = sampler.sample("idle")
        print("  server processes: " + ", ".join(f"{r} (pid {p})" for p, r in roles.items()),
              flush=True)
        results = run_load(server, sampler, settings, report)
        report["samples"] = sampler.samples
        report["end"] = sampler.sample("end")
        report["end_details"] = sampler.details()
        report["cpu_window_s"] = time.perf_counter() - report.pop("baseline_perf_counter")
        report["process_changes"] = sampler.changes
        client.close()
        client = None
        report["shutdown"] = server.stop()
        log = server.log_path.read_text(errors="replace")
        levels = LOG_LEVEL.findall(log)
        report["server_log_levels"] = {lv: levels.count(lv) for lv in sorted(set(levels))}
        analyse(report, results, settings)
    except BaseException:
        sys.stderr.write(f"--- server log ---\n{server.log()[-4000:]}\n")
        raise
    finally:
        if client is not None:
            client.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench._clean(report), indent=2) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0 if report["verdict"]["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
