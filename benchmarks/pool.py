#!/usr/bin/env python
"""Queue benchmark: JobQueue -> Redis Stream -> QueueWorker units -> one WKR server.

    python benchmarks/pool.py                       # 100,000 jobs, 2 units
    python benchmarks/pool.py --jobs 20000 --units 1 --prefetch 512

It starts a real ``redis-server`` (free port, temporary directory, ``--save ''``,
``--appendonly`` as ``--appendonly``) and one server with 1 worker of W1 ``noop``
(``example/noop_worker.py``, ``-protocol numpy``, the flags of ``benchmarks/run.py``),
then:

1. *direct*: one ``WKRClient`` sends the same inputs with ``encode_async`` (pipelined,
   ``--in-flight`` outstanding): the floor the queue is compared with;
2. *queue*: a real pool (``wkr-decentral-start wkr_serving.client.QueueWorker``, as a
   subprocess: its central and ``--units`` unit processes) drains the jobs that
   ``JobQueue.submit_many`` queues (submission overlaps the draining, as in
   production). Each job's latency is the time from its submission to its result being
   stored (both timestamps are in the result record); throughput is jobs / (last
   result stored - first job submitted). Every result is checked against its input
   (the noop model returns it): 0 lost;
3. *queue, unit killed*: the same, with unit 0 killed by SIGKILL once it has done
   ``--kill-after`` jobs: the central restarts it and the jobs it held are reclaimed
   after ``--claim-after`` seconds.

Prints a table and writes ``benchmarks/results/pool.json`` and ``pool.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import HOST, _import_worker_module, _server_args  # noqa: E402

RESULTS = HERE / "results"
START_LIMIT_S = 30.0
DRAIN_LIMIT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of this benchmark (stopped by pid)."""

    def __init__(self, directory: str, appendonly: bool) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.log = open(os.path.join(directory, "redis.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", HOST, "--dir", directory, "--save", "",
             "--appendonly", "yes" if appendonly else "no"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_LIMIT_S
        pause = threading.Event()
        try:
            while True:  # bounded by the deadline
                try:
                    if client.ping():
                        break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    pause.wait(0.01)
        finally:
            client.close()
        self.url = f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        self.log.close()


def direct(server: Any, xs: list[np.ndarray], in_flight: int) -> dict[str, Any]:
    from wkr_serving.client import WKRClient

    with WKRClient(HOST, server.port, server.port_out, protocol="numpy",
                   timeout=60_000) as client:
        list(client.encode_async(xs[:1000], max_in_flight=in_flight))  # warm up
        t0 = time.perf_counter()
        n = 0
        for r in client.encode_async(xs, max_in_flight=in_flight):
            if r.error_code:
                raise RuntimeError(r.error_message)
            n += 1
        elapsed = time.perf_counter() - t0
    return {"jobs": n, "seconds": elapsed, "jobs_per_s": n / elapsed,
            "in_flight": in_flight}


class Pool:
    """``wkr-decentral-start wkr_serving.client.QueueWorker ...`` as a subprocess (the
    real pool: a central supervising unit processes), stopped by ``terminate``."""

    def __init__(self, server: Any, redis_url: str, name: str, args: argparse.Namespace,
                 log_path: str) -> None:
        from wkr_serving.client.pool_control import PoolControl

        self.port, self.port_out = free_port(), free_port()
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wkr_serving.client.pool_cli",
             "wkr_serving.client.QueueWorker", "-redis_url", redis_url, "-queue", name,
             "-prefetch", str(args.prefetch), "-server_protocol", "numpy",
             "-claim_after", str(args.claim_after), "-remote_servers",
             json.dumps([[HOST, server.port, server.port_out]]), "-num_client",
             str(args.units), "-port", str(self.port), "-port_out", str(self.port_out),
             "-bind", HOST, "-restart_backoff", "0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.control = PoolControl(HOST, self.port, 10.0)
        self.wait(lambda s: s["units_running"] == args.units, START_LIMIT_S, "units")

    def status(self) -> dict[str, Any]:
        return dict(self.control.call("status"))

    def wait(self, predicate: Any, limit: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        pause = threading.Event()
        while True:  # bounded by the deadline
            if self.proc.poll() is not None:
                raise RuntimeError(f"the pool exited with {self.proc.returncode}")
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            pause.wait(0.02)

    def stop(self) -> None:
        try:
            self.control.call("terminate")
            self.proc.wait(60)
        except Exception:
            self.proc.kill()
            self.proc.wait(30)
        self.control.close()
        self.log.close()


def _kill_a_unit(pool: Pool, after_jobs: int, record: dict[str, Any]) -> None:
    """Thread: once unit 0 has done ``after_jobs`` jobs, SIGKILL it (mid-run)."""
    try:
        status = pool.wait(lambda s: s["units"][0]["counters"].get("jobs_done", 0)
                           >= after_jobs, DRAIN_LIMIT_S, "unit 0 to be busy")
        os.kill(status["units"][0]["pid"], signal.SIGKILL)
        record.update(killed_pid=status["units"][0]["pid"], killed_at=time.time())
    except Exception as exc:  # reported in the results, never silently
        record["kill_error"] = repr(exc)


def queue_run(server: Any, redis_url: str, xs: list[np.ndarray], args: argparse.Namespace,
              workdir: str, kill_after: int | None = None) -> dict[str, Any]:
    from wkr_serving.client.jobqueue import JobQueue

    name = f"bench{os.getpid()}{'kill' if kill_after else ''}"
    pool = Pool(server, redis_url, name, args, os.path.join(workdir, f"{name}.log"))
    killed: dict[str, Any] = {}
    try:
        with JobQueue(redis_url, name) as queue:
            if kill_after is not None:
                threading.Thread(target=_kill_a_unit, args=(pool, kill_after, killed),
                                 daemon=True).start()
            t_submit0 = time.time()
            ids = queue.submit_many(xs)
            submit_s = time.time() - t_submit0
            details = queue.wait(ids, DRAIN_LIMIT_S)
            stats = queue.stats()
        final = pool.status()
    finally:
        pool.stop()
    lost = 0
    for x, (ok, y, _ts, _td) in zip(xs, details, strict=True):
        if not ok or not np.array_equal(np.asarray(y), x):
            lost += 1
    t_sub = np.array([d[2] for d in details])
    t_done = np.array([d[3] for d in details])
    lat = (t_done - t_sub) * 1000.0
    elapsed = float(t_done.max() - t_sub.min())
    return {"jobs": len(xs), "units": args.units, "prefetch": args.prefetch,
            "claim_after_s": args.claim_after, "submit_s": submit_s,
            "submit_per_s": len(xs) / submit_s, "seconds": elapsed,
            "jobs_per_s": len(xs) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "lost_or_wrong": lost, "left_in_redis": stats, "killed": killed or None,
            "unit_restarts": final["restarts"],
            "reclaimed": sum(u["counters"].get("reclaimed", 0) for u in final["units"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=512)
    parser.add_argument("--in-flight", type=int, default=256,
                        help="outstanding requests of the direct encode_async run")
    parser.add_argument("--claim-after", type=float, default=2.0,
                        help="the units' -claim_after (s): how soon a dead unit's jobs move")
    parser.add_argument("--kill-after", type=int, default=20_000,
                        help="in the second queue run, SIGKILL unit 0 once it has done this "
                        "many jobs")
    parser.add_argument("--appendonly", action="store_true",
                        help="run redis-server with --appendonly yes (everysec)")
    parser.add_argument("--out", default=str(RESULTS / "pool.json"))
    args = parser.parse_args(argv)

    from wkr_serving.server import WKRServer

    module = _import_worker_module("noop_worker")
    rng = np.random.default_rng(0)
    xs = list(rng.standard_normal((args.jobs, 4)).astype(np.float32))
    workdir = tempfile.mkdtemp(prefix="wkr-bench-pool-")
    redis = Redis(workdir, args.appendonly)
    try:
        with WKRServer(_server_args("numpy", workdir), module.Worker) as server:
            d = direct(server, xs, args.in_flight)
            print(f"direct encode_async: {d['jobs_per_s']:,.0f} jobs/s", flush=True)
            q = queue_run(server, redis.url, xs, args, workdir)
            print(f"queue: {q['jobs_per_s']:,.0f} jobs/s", flush=True)
            k = queue_run(server, redis.url, xs, args, workdir, args.kill_after)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for run in (q, k):
        run["ratio_to_direct"] = run["jobs_per_s"] / d["jobs_per_s"]
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "server": "W1 noop, -protocol numpy, 1 worker, -batch_size 32 "
                        "-batch_group_timeout 5",
              "redis_appendonly": args.appendonly, "direct": d, "queue": q,
              "queue_unit_killed": k}
    rows = [
        ("direct WKRClient.encode_async", f"{d['jobs']:,}", f"{d['jobs_per_s']:,.0f}", "-",
         "-", "1.00", "-"),
        *((f"JobQueue -> pool of {r['units']} QueueWorker (prefetch {r['prefetch']})"
           + (", unit 0 killed (SIGKILL) mid-run" if r["killed"] else ""),
           f"{r['jobs']:,}", f"{r['jobs_per_s']:,.0f}", f"{r['p50_ms']:,.0f}",
           f"{r['p99_ms']:,.0f}", f"{r['ratio_to_direct']:.2f}", str(r["lost_or_wrong"]))
          for r in (q, k)),
    ]
    head = ("path", "jobs", "jobs/s", "p50 ms", "p99 ms", "ratio", "lost")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    print(f"submit_many: {q['submit_per_s']:,.0f} jobs/s; left in Redis: {q['left_in_redis']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = (f"# Queue benchmark ({report['date']})\n\n{report['server']}; redis appendonly "
          f"{'yes' if args.appendonly else 'no'}; {os.cpu_count()} CPUs. Latency: job "
          f"submitted to result stored (all {q['jobs']:,} jobs submitted at once with "
          f"submit_many, so it includes queueing).\n\n{table}\n\nsubmit_many: "
          f"{q['submit_per_s']:,.0f} jobs/s. Killed run: unit restarts "
          f"{k['unit_restarts']}, jobs reclaimed {k['reclaimed']}, claim_after "
          f"{k['claim_after_s']:g} s; left in Redis {k['left_in_redis']}.\n")
    out.with_suffix(".md").write_text(md)
    return 0 if q["lost_or_wrong"] == 0 == k["lost_or_wrong"] and not k.get(
        "killed", {}).get("kill_error") else 1


if __name__ == "__main__":
    sys.exit(main())
