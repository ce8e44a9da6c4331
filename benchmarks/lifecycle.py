#!/usr/bin/env python
"""What the model lifecycle costs live traffic (issue 11): a model switch and a large
evaluation, each beside the same traffic without them.

    python benchmarks/lifecycle.py                          # about a minute
    python benchmarks/lifecycle.py --out benchmarks/results/lifecycle.json

One server (``WKRServer`` in this process, 2 workers, ``-batch_size 32``) on 127.0.0.1
serves ``benchmarks/lifecycle_worker.py`` (a 64 -> 10 dense layer). ``--threads``
callers, each with its own ``WKRClient``, send blocking one-item ``encode`` calls
back to back for the whole run, bounded in count and time; each call's send time and
latency are kept. Three phases, each measured on the same running server:

``baseline``     the traffic alone, ``--baseline-s`` seconds;
``switch``       ``--switches`` model switches one after another (A -> B -> A ...),
                 each timed from the call to its answer; the traffic sent while they
                 run is the row;
``evaluate``     one ``WKRClient.evaluate`` of ``--rows`` rows (in the default chunks),
                 timed; the traffic sent while it runs is the row.

Every call must succeed and every result must come from one model; the errors are
counted and reported (they must be 0). Nothing sleeps to synchronise: the phases are
driven by the calls' own returns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned workers import lifecycle_worker by name

import lifecycle_worker  # noqa: E402
from wkr_serving.client import WKRClient  # noqa: E402
from wkr_serving.client.version import __version__  # noqa: E402
from wkr_serving.server import WKRServer  # noqa: E402
from wkr_serving.server.helper import get_args_parser  # noqa: E402

#: Longest the whole run may take, and a single call.
RUN_LIMIT_S = 600.0
CALL_TIMEOUT_MS = 30_000
#: Most calls one traffic thread makes.
MAX_CALLS = 2_000_000


class Traffic:
    """Callers sending one-item blocking calls until stopped."""

    def __init__(self, port: int, port_out: int, threads: int) -> None:
        self.port, self.port_out = port, port_out
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float]] = []  # (sent at, latency s)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(CALL_TIMEOUT_MS / 1000 + 5)

    def _run(self, k: int) -> None:
        x = np.random.default_rng(k).standard_normal(lifecycle_worker.FEATURES).astype(
            np.float32)
        deadline = time.monotonic() + RUN_LIMIT_S
        with WKRClient("127.0.0.1", self.port, self.port_out, protocol="numpy",
                       timeout=CALL_TIMEOUT_MS) as client:
            for _ in range(MAX_CALLS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                sent = time.perf_counter()
                try:
                    client.encode(x)
                except Exception as exc:
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    self.samples.append((sent, time.perf_counter() - sent))

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self.lock:
            latencies = [lat for sent, lat in self.samples if start <= sent < end]
        if not latencies:
            return {"requests": 0}
        ms = np.array(latencies) * 1000.0
        return {"requests": len(latencies), "req_per_s": len(latencies) / (end - start),
                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8, help="traffic callers")
    parser.add_argument("--baseline-s", type=float, default=10.0)
    parser.add_argument("--switches", type=int, default=5)
    parser.add_argument("--rows", type=int, default=10_000, help="rows evaluated")
    parser.add_argument("--chunk", type=int, default=None,
                        help="evaluate's chunk_size (default: the client's)")
    parser.add_argument("--out", default=None, help="write JSON here (and .md beside it)")
    args = parser.parse_args(argv)

    model_dir = tempfile.mkdtemp(prefix="wkr-lifecycle-")
    for name, seed in (("a.txt", 1), ("b.txt", 2)):
        Path(model_dir, name).write_text(str(seed))
    server_args = get_args_parser().parse_args([
        "-port", "0", "-port_out", "0", "-bind", "127.0.0.1", "-model_dir", model_dir,
        "-model_name", "a.txt", "-model_version", "v0", "-num_worker", "2",
        "-batch_size", "32", "-cpu", "-protocol", "numpy", "-startup_timeout", "120"])
    server = WKRServer(server_args, lifecycle_worker.DenseWorker)
    server.start()
    result: dict[str, Any] = {}
    try:
        server.wait_ready(120)
        traffic = Traffic(server.port, server.port_out, args.threads)
        traffic.start()
        control = WKRClient("127.0.0.1", server.port, server.port_out, protocol="numpy",
                            timeout=CALL_TIMEOUT_MS)
        try:
            warm_until = time.perf_counter() + 2.0
            while time.perf_counter() < warm_until and not traffic.errors:
                control.encode(np.zeros(lifecycle_worker.FEATURES, np.float32))
            start = time.perf_counter()
            traffic.stop.wait(args.baseline_s)  # the measurement window (never set here)
            result["baseline"] = traffic.window(start, time.perf_counter())

            seconds = []
            start = time.perf_counter()
            for k in range(args.switches):
                began = time.perf_counter()
                control.switch_model(model_name="b.txt" if k % 2 == 0 else "a.txt",
                                     version=f"v{k + 1}", timeout=300_000)
                seconds.append(time.perf_counter() - began)
            result["switch"] = traffic.window(start, time.perf_counter())
            result["switch"]["switch_s"] = {"median": statistics.median(seconds),
                                            "min": min(seconds), "max": max(seconds),
                                            "count": len(seconds)}

            rng = np.random.default_rng(7)
            inputs = list(rng.standard_normal((args.rows, lifecycle_worker.FEATURES)
                                              ).astype(np.float32))
            labels = [int(k) for k in rng.integers(0, lifecycle_worker.CLASSES, args.rows)]
            start = time.perf_counter()
            metrics = control.evaluate(inputs, labels, chunk_size=args.chunk)
            result["evaluate"] = traffic.window(start, time.perf_counter())
            result["evaluate"]["evaluate_s"] = time.perf_counter() - start
            result["evaluate"]["rows"] = args.rows
            result["evaluate"]["accuracy"] = metrics.get("accuracy")
        finally:
            control.close()
            traffic.close()
        result["errors"] = len(traffic.errors)
        result["error_samples"] = traffic.errors[:5]
    finally:
        server.close()
    result["settings"] = {"threads": args.threads, "num_worker": 2, "batch_size": 32,
                          "rows": args.rows, "switches": args.switches}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "wkr_serving": __version__}
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = render(result)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0 if result["errors"] == 0 else 1


def render(result: dict[str, Any]) -> str:
    lines = ["# Model lifecycle: live traffic during a switch and an evaluation", "",
             f"{result['date']}, {result['machine']['cpus']} CPUs, Python "
             f"{result['machine']['python']}; {result['settings']['threads']} callers, "
             "blocking one-item encode, 2 workers, -batch_size 32.", "",
             "| phase | requests | req/s | p50 ms | p99 ms | max ms | phase time |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for phase in ("baseline", "switch", "evaluate"):
        row = result.get(phase, {})
        if not row.get("requests"):
            lines.append(f"| {phase} | 0 | | | | | |")
            continue
        extra = ""
        if phase == "switch":
            s = row["switch_s"]
            extra = (f"{s['count']} switches: median {s['median']:.2f} s "
                     f"(min {s['min']:.2f}, max {s['max']:.2f})")
        elif phase == "evaluate":
            extra = f"{row['rows']} rows in {row['evaluate_s']:.2f} s"
        lines.append(f"| {phase} | {row['requests']} | {row['req_per_s']:.0f} | "
                     f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.1f} | "
                     f"{extra} |")
    lines += ["", f"Failed calls: {result['errors']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
