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
2. *queue*: ``--units`` QueueWorker units, each in its own spawned process running
   get_model / do_work / off_model, drain the jobs that ``JobQueue.submit_many`` queues
   (submission overlaps the draining, as in production). Each job's latency is the time
   from its submission to its result being stored (both timestamps are in the result
   record); throughput is jobs / (last result stored - first job submitted). Every
   result is checked against its input (the noop model returns it): 0 lost.

Prints a table and writes ``benchmarks/results/pool.json`` and ``pool.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shutil
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


def unit_main(index: int, server: tuple[str, int, int], argv: list[str], stop: Any,
              ready: Any) -> None:
    """One QueueWorker unit in its own process, until ``stop`` is set."""
    import logging

    from wkr_serving.client.queueworker import QueueWorker

    parser = argparse.ArgumentParser()
    QueueWorker.add_arguments(parser)
    unit = QueueWorker(index, server, parser.parse_args(argv))
    logger = logging.getLogger(f"unit.{index}")
    model = unit.get_model(*server)
    ready.release()
    deadline = time.monotonic() + DRAIN_LIMIT_S + 120
    try:
        for _ in range(10_000_000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            unit.do_work(model, logger)
    finally:
        unit.off_model(model)


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


def queue_run(server: Any, redis_url: str, xs: list[np.ndarray], args: argparse.Namespace,
              ) -> dict[str, Any]:
    from wkr_serving.client.jobqueue import JobQueue

    name = f"bench{os.getpid()}"
    argv = ["-redis_url", redis_url, "-queue", name, "-prefetch", str(args.prefetch),
            "-server_protocol", "numpy"]
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Semaphore(0)
    procs = [ctx.Process(target=unit_main, daemon=True,
                         args=(i, (HOST, server.port, server.port_out), argv, stop, ready))
             for i in range(args.units)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=START_LIMIT_S):
                raise RuntimeError("a unit did not start")
        with JobQueue(redis_url, name) as queue:
            t_submit0 = time.time()
            ids = queue.submit_many(xs)
            submit_s = time.time() - t_submit0
            details = queue.wait(ids, DRAIN_LIMIT_S)
            stats = queue.stats()
        lost = 0
        for x, (ok, y, _ts, _td) in zip(xs, details, strict=True):
            if not ok or not np.array_equal(np.asarray(y), x):
                lost += 1
        t_sub = np.array([d[2] for d in details])
        t_done = np.array([d[3] for d in details])
        lat = (t_done - t_sub) * 1000.0
        elapsed = float(t_done.max() - t_sub.min())
        return {"jobs": len(xs), "units": args.units, "prefetch": args.prefetch,
                "submit_s": submit_s, "submit_per_s": len(xs) / submit_s,
                "seconds": elapsed, "jobs_per_s": len(xs) / elapsed,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "max_ms": float(lat.max()), "lost_or_wrong": lost, "left_in_redis": stats}
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=512)
    parser.add_argument("--in-flight", type=int, default=256,
                        help="outstanding requests of the direct encode_async run")
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
            q = queue_run(server, redis.url, xs, args)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    q["ratio_to_direct"] = q["jobs_per_s"] / d["jobs_per_s"]
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "server": "W1 noop, -protocol numpy, 1 worker, -batch_size 32 "
                        "-batch_group_timeout 5",
              "redis_appendonly": args.appendonly, "direct": d, "queue": q}
    rows = [
        ("direct WKRClient.encode_async", f"{d['jobs']:,}", f"{d['jobs_per_s']:,.0f}", "-",
         "-", "1.00", "-"),
        (f"JobQueue -> {q['units']} QueueWorker (prefetch {q['prefetch']})",
         f"{q['jobs']:,}", f"{q['jobs_per_s']:,.0f}", f"{q['p50_ms']:,.0f}",
         f"{q['p99_ms']:,.0f}", f"{q['ratio_to_direct']:.2f}", str(q["lost_or_wrong"])),
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
          f"{q['submit_per_s']:,.0f} jobs/s\n")
    out.with_suffix(".md").write_text(md)
    return 0 if q["lost_or_wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
