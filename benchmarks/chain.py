#!/usr/bin/env python
"""The floor under a lone request: wkr-serving's four hops done by bare pyzmq processes
that do nothing but pass a message on, beside wkr-serving itself, in the same run.

    python benchmarks/chain.py                       # 3 rounds of 20,000 calls per row
    python benchmarks/chain.py --calls 2000 --rounds 1
    python benchmarks/chain.py --out benchmarks/results/chain.json

Rows (each a caller process making blocking calls one at a time, c=1, a 16-byte array):

- ``echo``: a DEALER and a ROUTER that sends every message back (one hop each way);
- ``chain``: the shape of a wkr-serving server with no Python work in it: the caller's
  DEALER sends to a ``ventilator`` ROUTER (TCP), which pushes to a ``worker`` (IPC), which
  pushes to a ``sink`` (IPC), whose ROUTER returns the message to the caller's second
  DEALER by its identity (TCP), as the sink returns results on ``port_out``;
- ``chain, sink spins``: the same, the sink looking for its next message for up to
  ``--spin-us`` before it blocks (what ``-busy_poll_us`` does);
- ``wkr-serving`` and ``wkr-serving -busy_poll_us``: ``wkr-serving-start
  example/noop_worker.Worker`` (1 worker, numpy protocol) and a default ``WKRClient``.

Rows alternate within each round, so a change in the machine's load touches them all;
the report gives each row's median p50 over the rounds, its p90/p99, and the caller's CPU
per call (every thread of the caller process). Every loop is bounded by its call count
and every receive by a timeout; only processes started here are stopped, by pid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (machine info, JSON cleaning)
import soak  # noqa: E402  (wkr-serving-start as a subprocess)

HOST = "127.0.0.1"
#: Longest wait (ms) for any one message; a row whose message does not come fails.
RECV_LIMIT_MS = 10_000
#: Calls before the measured ones in each row.
WARMUP_CALLS = 1000
#: Seconds a spawned process has to report its ports.
SPAWN_LIMIT_S = 60.0


def _spin(socket: zmq.Socket, limit_us: int) -> None:
    deadline = time.perf_counter() + limit_us / 1e6
    while not socket.get(zmq.EVENTS) & zmq.POLLIN and time.perf_counter() < deadline:
        pass


def _hop(name: str, queue: Any, spin_us: int) -> None:
    """One process of the bare chain, passing each message on until 10 s of silence."""
    context = zmq.Context()
    try:
        if name == "echo":
            router = context.socket(zmq.ROUTER)
            queue.put(("echo", router.bind_to_random_port(f"tcp://{HOST}")))
            while router.poll(RECV_LIMIT_MS):
                router.send_multipart(router.recv_multipart(copy=False), copy=False)
        elif name == "ventilator":
            front, push = context.socket(zmq.ROUTER), context.socket(zmq.PUSH)
            queue.put(("port", front.bind_to_random_port(f"tcp://{HOST}")))
            push.bind(f"ipc://@wkr-chain-{os.getpid()}-worker")
            queue.put(("worker", f"ipc://@wkr-chain-{os.getpid()}-worker"))
            while front.poll(RECV_LIMIT_MS):
                push.send_multipart(front.recv_multipart(copy=False), copy=False)
        elif name == "worker":
            pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
            pull.connect(queue.get(timeout=SPAWN_LIMIT_S))
            push.connect(queue.get(timeout=SPAWN_LIMIT_S))
            while pull.poll(RECV_LIMIT_MS):
                push.send_multipart(pull.recv_multipart(copy=False), copy=False)
        elif name == "sink":
            pull, back = context.socket(zmq.PULL), context.socket(zmq.ROUTER)
            pull.bind(f"ipc://@wkr-chain-{os.getpid()}-sink")
            queue.put(("sink", f"ipc://@wkr-chain-{os.getpid()}-sink"))
            queue.put(("port_out", back.bind_to_random_port(f"tcp://{HOST}")))
            while True:
                if spin_us:
                    _spin(pull, spin_us)
                if not pull.poll(RECV_LIMIT_MS):
                    break
                # [ventilator's id of the caller, caller's port_out id, payload]: routed
                # back by the second, as the sink routes a result by its client's id.
                back.send_multipart(pull.recv_multipart(copy=False)[1:], copy=False)
    finally:
        context.destroy(linger=0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measured(call: Any, calls: int) -> dict[str, Any]:
    for _ in range(WARMUP_CALLS):
        call()
    lat = np.empty(calls)
    cpu0 = _cpu()
    for i in range(calls):
        t = time.perf_counter()
        call()
        lat[i] = time.perf_counter() - t
    cpu = _cpu() - cpu0
    return {"calls": calls, "p50_ms": float(np.percentile(lat, 50)) * 1e3,
            "p90_ms": float(np.percentile(lat, 90)) * 1e3,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3,
            "caller_cpu_us": cpu / calls * 1e6}


def _bare_caller(kind: str, ports: dict[str, int], calls: int, queue: Any) -> None:
    try:
        context = zmq.Context()
        out = context.socket(zmq.DEALER)
        x = np.zeros(4, np.float32)
        if kind == "echo":
            out.connect(f"tcp://{HOST}:{ports['echo']}")
            back = out
        else:
            back = context.socket(zmq.DEALER)
            back.setsockopt(zmq.IDENTITY, b"caller")
            back.connect(f"tcp://{HOST}:{ports['port_out']}")
            out.connect(f"tcp://{HOST}:{ports['port']}")
        back.setsockopt(zmq.RCVTIMEO, RECV_LIMIT_MS)
        if kind != "echo":  # the sink's ROUTER must know the caller before it answers
            deadline = time.monotonic() + SPAWN_LIMIT_S
            while back.get(zmq.EVENTS) & zmq.POLLIN == 0:
                out.send_multipart([b"caller", b"hello"])
                if back.poll(100):
                    back.recv_multipart()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the chain never answered")
            while back.poll(100):  # answers to repeated hellos
                back.recv_multipart()

        if kind == "echo":
            def call() -> None:
                out.send_multipart([b"h", x])
                back.recv_multipart()
        else:
            def call() -> None:
                out.send_multipart([b"caller", x])
                back.recv_multipart()

        out.send_multipart([b"caller" if kind != "echo" else b"h", b"check"])
        if back.recv_multipart()[-1] != b"check":  # the chain passes the message on whole
            raise RuntimeError(f"the {kind} returned another message")
        queue.put(_measured(call, calls))
        context.destroy(linger=0)
    except Exception:
        queue.put(traceback.format_exc())


def bare(kind: str, calls: int, spin_us: int = 0) -> dict[str, Any]:
    """A bare row: its hop processes, then a caller process; all stopped by pid."""
    ctx = mp.get_context("spawn")
    queue, worker_q = ctx.Queue(), ctx.Queue()
    procs = []
    try:
        if kind == "echo":
            procs.append(ctx.Process(target=_hop, args=("echo", queue, 0), daemon=True))
        else:
            procs += [ctx.Process(target=_hop, args=("ventilator", queue, 0), daemon=True),
                      ctx.Process(target=_hop, args=("sink", queue, spin_us), daemon=True)]
        for proc in procs:
            proc.start()
        ports: dict[str, Any] = {}
        want = {"echo"} if kind == "echo" else {"port", "worker", "sink", "port_out"}
        while not want <= ports.keys():
            key, value = queue.get(timeout=SPAWN_LIMIT_S)
            ports[key] = value
        if kind != "echo":
            worker_q.put(ports["worker"])
            worker_q.put(ports["sink"])
            procs.append(ctx.Process(target=_hop, args=("worker", worker_q, 0), daemon=True))
            procs[-1].start()
        caller = ctx.Process(target=_bare_caller, args=(kind, ports, calls, queue),
                             daemon=True)
        procs.append(caller)
        caller.start()
        result = queue.get(timeout=SPAWN_LIMIT_S + calls * RECV_LIMIT_MS / 1000)
        if isinstance(result, str):
            raise RuntimeError(f"{kind} caller failed:\n{result}")
        return result
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def _server_caller(port: int, port_out: int, calls: int, queue: Any) -> None:
    try:
        from wkr_serving.client import WKRClient

        x = np.zeros(4, np.float32)
        with WKRClient(HOST, port, port_out, protocol="numpy", timeout=RECV_LIMIT_MS) as client:
            if not np.array_equal(client.encode(np.arange(4, dtype=np.float32)), np.arange(4)):
                raise RuntimeError("the server returned another result")
            queue.put(_measured(lambda: client.encode(x), calls))
    except Exception:
        queue.put(traceback.format_exc())


def served(calls: int, flags: list[str]) -> dict[str, Any]:
    """A wkr-serving row: the server as soak.py starts it, plus ``flags``; a caller process
    with a default WKRClient."""
    with tempfile.TemporaryDirectory(prefix="wkr-chain-") as workdir:
        server = soak.Server(workdir, flags)
        try:
            server.connect().close()
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            caller = ctx.Process(target=_server_caller, daemon=True,
                                 args=(server.port, server.port_out, calls, queue))
            caller.start()
            try:
                result = queue.get(timeout=SPAWN_LIMIT_S + calls * RECV_LIMIT_MS / 1000)
            finally:
                if caller.is_alive():
                    caller.terminate()
                    caller.join(5)
            if isinstance(result, str):
                raise RuntimeError(f"wkr-serving caller failed:\n{result}")
            return result
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="measured calls per row")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all rows")
    parser.add_argument("--spin-us", type=int, default=300,
                        help="the sink's spin in the spinning rows (-busy_poll_us)")
    parser.add_argument("--out", default=None, help="JSON results (a .md beside it)")
    args = parser.parse_args(argv)
    rows: dict[str, Any] = {
        "bare echo, 2 processes": lambda: bare("echo", args.calls),
        "bare chain, 4 processes": lambda: bare("chain", args.calls),
        f"bare chain, sink spins {args.spin_us} us": lambda: bare("chain", args.calls,
                                                                  args.spin_us),
        "wkr-serving": lambda: served(args.calls, []),
        f"wkr-serving -busy_poll_us {args.spin_us}": lambda: served(
            args.calls, ["-busy_poll_us", str(args.spin_us)]),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for n in range(args.rounds):
        for name, row in rows.items():
            r = row()
            results[name].append(r)
            print(f"round {n + 1} {name:34s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} "
                  f"ms  caller {r['caller_cpu_us']:.1f} us CPU/call", flush=True)
    summary = []
    for name, runs in results.items():
        summary.append({"row": name,
                        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                        "p50_ms_all": [r["p50_ms"] for r in runs],
                        "p90_ms": statistics.median(r["p90_ms"] for r in runs),
                        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                        "caller_cpu_us": statistics.median(r["caller_cpu_us"] for r in runs)})
    lines = [f"# A lone request: bare pyzmq chain vs wkr-serving ({args.rounds} rounds x "
             f"{args.calls} calls, medians)", "",
             "| row | p50 ms | p50 each round | p90 ms | p99 ms | caller CPU us/call |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        each = ", ".join(f"{v:.3f}" for v in s["p50_ms_all"])
        lines.append(f"| {s['row']} | {s['p50_ms']:.3f} | {each} | {s['p90_ms']:.3f} | "
                     f"{s['p99_ms']:.3f} | {s['caller_cpu_us']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        report = {"machine": bench.machine_info(), "calls": args.calls,
                  "rounds": args.rounds, "spin_us": args.spin_us, "rows": summary,
                  "runs": results}
        Path(args.out).write_text(json.dumps(bench._clean(report), indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
