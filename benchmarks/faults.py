#!/usr/bin/env python
"""How fast the server reacts when things go wrong (issue 3's failure semantics).

    python benchmarks/faults.py                  # about a minute
    python benchmarks/faults.py --repeat 3 --out benchmarks/results/faults.json

Each scenario starts a real server (``WKRServer``, loopback, free ports) with the worker
of ``benchmarks/fault_worker.py`` and measures, ``--repeat`` times:

- ``worker_died``: a worker holding a request is killed with SIGKILL; time from the kill
  to the client's ``WorkerDied``, and until a replacement worker is ready.
- ``worker_timeout``: with ``-worker_timeout 0.5``, a request that never finishes; time
  from the start of its ``predict`` to the client's ``WorkerDied``.
- ``connection_lost``: the sink is killed with SIGKILL while a request waits; time to
  the client's ``ConnectionLost`` (the client timeout is 30 s).
- ``terminate``: an idle server is sent the ``terminate`` command; time until the
  server's thread has ended (every process stopped, the IPC directory removed).
- ``overloaded``: the queue (``-max_queue_size 4``) is full; round-trip time of the
  ``Overloaded`` answer to each of 200 more requests.

Times come from ``time.monotonic()`` (shared by every process of the host) and
``time.perf_counter()``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned workers import fault_worker by name

import fault_worker  # noqa: E402
from wkr_serving.client import (  # noqa: E402
    ConnectionLost,
    Overloaded,
    WKRClient,
    WorkerDied,
)
from wkr_serving.client.version import __version__  # noqa: E402
from wkr_serving.server import WKRServer  # noqa: E402
from wkr_serving.server.helper import get_args_parser  # noqa: E402

LIMIT_S = 30.0


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
        pause.wait(0.002)


@contextmanager
def server(workdir: str, *flags: str) -> Iterator[WKRServer]:
    args = get_args_parser().parse_args(
        ["-port", "0", "-port_out", "0", "-bind", "127.0.0.1", "-cpu", "-model_dir", workdir,
         "-log_dir", workdir, "-log_name", "server", "-graceful_timeout", "2", *flags])
    srv = WKRServer(args, fault_worker.Worker)
    srv.start()
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.close(60)


def client(srv: WKRServer, timeout: int = 30_000) -> WKRClient:
    return WKRClient("127.0.0.1", srv.port, srv.port_out, timeout=timeout,
                     connect_timeout=10_000)


class Hold:
    """A request held in ``predict``: ``started()`` returns ``(pid, monotonic start)``."""

    def __init__(self, workdir: str, n: int) -> None:
        self.dir = os.path.join(workdir, f"hold-{n}")
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


def worker_died(workdir: str, repeat: int) -> dict[str, Any]:
    died, replaced = [], []
    with server(workdir, "-num_worker", "2") as srv, client(srv) as c:
        for n in range(repeat):
            hold = Hold(workdir, n)
            c.encode(hold.item, blocking=False)
            pid, _ = hold.started()
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            (reply,) = c.fetch_all(on_error="return")
            died.append(time.monotonic() - t0)
            assert isinstance(reply, WorkerDied), reply

            def new_worker(pid: int = pid) -> bool:
                s = c.server_status
                return s["ready"] and pid not in [w["pid"] for w in s["workers"]]

            wait_for(new_worker, LIMIT_S, "a replacement worker")
            replaced.append(time.monotonic() - t0)
    return {"kill_to_WorkerDied_s": died, "kill_to_replacement_ready_s": replaced}


def worker_timeout(workdir: str, repeat: int) -> dict[str, Any]:
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


def connection_lost(workdir: str, repeat: int) -> dict[str, Any]:
    lost = []
    for n in range(repeat):
        with server(_fresh_dir(workdir, n)) as srv, client(srv) as c:
            sink_pid = c.server_status["sink_pid"]
            hold = Hold(workdir, n)
            c.encode(hold.item, blocking=False)
            hold.started()
            t0 = time.monotonic()
            os.kill(sink_pid, signal.SIGKILL)
            (reply,) = c.fetch_all(on_error="return")
            lost.append(time.monotonic() - t0)
            hold.release()
            assert isinstance(reply, ConnectionLost), reply
            srv.join(LIMIT_S)
            assert srv.exit_code == 1
    return {"sink_kill_to_ConnectionLost_s": lost, "client_timeout_s": 30.0}


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


def overloaded(workdir: str, requests: int = 200) -> dict[str, Any]:
    rtt = []
    with server(workdir, "-num_worker", "1", "-max_queue_size", "4") as srv, \
            client(srv) as c, client(srv) as filler:
        hold = Hold(workdir, "q")
        c.encode(hold.item, blocking=False)
        hold.started()
        for i in range(4):
            filler.encode(i, blocking=False)
        wait_for(lambda: c.server_status["queue_items"] == 4, LIMIT_S, "a full queue")
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                c.encode(i, timeout=10_000)
            except Overloaded:
                rtt.append(time.perf_counter() - t0)
        hold.release()
        filler.fetch_all()
        c.fetch_all()
    assert len(rtt) == requests, f"{requests - len(rtt)} requests were not refused"
    return {"Overloaded_round_trip_s": rtt}


def _fresh_dir(workdir: str, n: int) -> str:
    """A model/log directory for the ``n``-th server of a scenario that stops it."""
    path = os.path.join(workdir, f"server-{n}")
    os.makedirs(path)
    return path


def summarise(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "median_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
            "max_ms": ordered[-1] * 1000, "min_ms": ordered[0] * 1000}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# wkr-serving fault reaction times", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             f"- machine: {report['machine']}", f"- wkr-serving {report['version']}", "",
             "| scenario | measured | n | median ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|"]
    for scenario, values in report["results"].items():
        for name, s in values.items():
            if isinstance(s, dict):
                lines.append(f"| {scenario} | {name} | {s['n']} | {s['median_ms']:.1f} | "
                             f"{s['p99_ms']:.1f} | {s['max_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="write JSON here, and Markdown beside it")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wkr-faults-") as workdir:
        for name, run in (("worker_died", lambda d: worker_died(d, args.repeat)),
                          ("worker_timeout", lambda d: worker_timeout(d, args.repeat)),
                          ("connection_lost", lambda d: connection_lost(d, args.repeat)),
                          ("terminate", lambda d: terminate(d, args.repeat)),
                          ("overloaded", overloaded)):
            sub = os.path.join(workdir, name)
            os.makedirs(sub)
            raw = run(sub)
            results[name] = {k: summarise(v) if isinstance(v, list) else v
                             for k, v in raw.items()}
            print(name, json.dumps(results[name]), flush=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores, Python {platform.python_version()}",
              "version": __version__, "results": results}
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
