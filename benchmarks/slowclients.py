"""Slow clients for the HTTP rows of ``run.py``: idle and slowloris connections, held
open from a separate process while wrk measures a normal client.

    with SlowClients("127.0.0.1", port, idle=1000, slow=50, max_seconds=60) as attack:
        attack.wait_ready(30)   # every connection established (or the counts so far)
        attack.mark()           # the measured window starts now
        ...                     # measure
        stats = attack.report() # what was open at the end, reopens in the window, ...

The attacker is one spawned process with one ``selectors`` loop (no threads):

- **idle** connections connect and send nothing;
- **slowloris** connections send a partial request header (request line, ``Host``, the
  name of an ``X-Slow`` header) and then one more header byte every second
  (``SLOW_BYTE_EVERY_S``), never ending the header block.

A connection the server closes (EOF, reset, or any bytes it answers with, such as a 408)
is reopened at once if it had been open for at least ``SHORT_LIVED_S``; otherwise its
slot waits (50 ms, doubling up to 1 s) so a server that refuses at once does not make
the loop spin. A connect that has not completed after ``CONNECT_LIMIT_S`` is dropped and
retried. The pacing is the selector's timeout; nothing sleeps.

Bounds: the process ends after ``max_seconds`` whatever happens, opens at most
``max_opens`` connections in all (default: one per slot and per second of
``max_seconds``, plus one per slot), only connects to a loopback address (127.0.0.1 in
``run.py``; anything outside 127.0.0.0/8 is refused), and raises its RLIMIT_NOFILE soft
limit to the hard limit first.
The parent stops it with a message on the control pipe; if it does not end, the parent
terminates it by its pid (only that process).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import multiprocessing as mp
import selectors
import socket
import time
import traceback
from typing import Any

IDLE, SLOW = "idle", "slow"
#: What a slowloris connection sends when it connects: an unfinished request header.
SLOW_HEAD = (b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"X-Slow: ")
#: The bytes it then drips, one per SLOW_BYTE_EVERY_S, cycling (header lines of 64 bytes).
SLOW_DRIP = b"a" * 54 + b"\r\nX-Slow: "
SLOW_BYTE_EVERY_S = 1.0
#: A connection closed by the server after less than this is reopened only after a backoff.
SHORT_LIVED_S = 1.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
#: A connect still in progress after this long is dropped and retried.
CONNECT_LIMIT_S = 5.0
#: Seconds the parent waits for an answer on the control pipe / for the process to end.
REPLY_LIMIT_S = 10.0
STOP_LIMIT_S = 10.0


class _Conn:
    __slots__ = ("drip_at", "dripped", "kind", "opened_at", "since", "slot", "sock", "state")

    def __init__(self, sock: socket.socket, kind: str, slot: int, now: float) -> None:
        self.sock = sock
        self.kind = kind
        self.slot = slot
        self.state = "connecting"
        self.since = now  # when the connect started; then when it was established
        self.opened_at = now
        self.drip_at = 0.0
        self.dripped = 0


class _Attack:
    """The attacker's state and loop (runs in the spawned process)."""

    def __init__(self, host: str, port: int, idle: int, slow: int, max_seconds: float,
                 max_opens: int, control: Any) -> None:
        self.addr = (host, port)
        self.kinds = [IDLE] * idle + [SLOW] * slow
        self.target = {IDLE: idle, SLOW: slow}
        self.control = control
        self.start = time.monotonic()
        self.deadline = self.start + max_seconds
        self.max_opens = max_opens
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}  # slot -> connection (connecting or open)
        self.retry_at = dict.fromkeys(range(len(self.kinds)), self.start)  # empty slots
        self.backoff = dict.fromkeys(range(len(self.kinds)), 0.0)
        self.open = {IDLE: 0, SLOW: 0}
        self.connecting = {IDLE: 0, SLOW: 0}
        self.totals = {"opens": 0, "connect_failures": 0, "connect_timeouts": 0,
                       "closed_by_server": {IDLE: 0, SLOW: 0},
                       "answered_by_server": {IDLE: 0, SLOW: 0}, "bytes_dripped": 0}
        self.window: dict[str, Any] | None = None
        self.ready_sent = False
        self.stopping = False
        self.cap_reached = False
        self.errors: dict[str, int] = {}

    # -- accounting -------------------------------------------------------------------------

    def _account(self, now: float) -> None:
        """Time-weighted open counts and the minimum inside the measured window."""
        w = self.window
        if w is None:
            return
        dt = now - w["last"]
        for kind in (IDLE, SLOW):
            w["open_seconds"][kind] += self.open[kind] * dt
            w["min_open"][kind] = min(w["min_open"][kind], self.open[kind])
        w["last"] = now

    def stats(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": dict(self.target), "open": dict(self.open),
            "connecting": dict(self.connecting), "seconds": round(now - self.start, 3),
            "cap_reached": self.cap_reached, "max_opens": self.max_opens,
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.totals.items()},
            "socket_errors": dict(self.errors),
        }
        w = self.window
        if w is not None:
            span = max(now - w["t0"], 1e-9)
            out["window"] = {
                "seconds": round(now - w["t0"], 3),
                "mean_open": {k: round(v / span, 1) for k, v in w["open_seconds"].items()},
                "min_open": dict(w["min_open"]),
                "opens": self.totals["opens"] - w["opens_at_mark"],
                "closed_by_server": {k: self.totals["closed_by_server"][k]
                                     - w["closed_at_mark"][k] for k in (IDLE, SLOW)},
            }
        return out

    # -- connections ------------------------------------------------------------------------

    def _open(self, slot: int, now: float) -> None:
        if self.totals["opens"] >= self.max_opens:
            self.cap_reached = True
            self.retry_at.pop(slot, None)  # no more opens: the slot stays empty
            return
        kind = self.kinds[slot]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.totals["opens"] += 1
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(slot, now, errno.errorcode.get(err, str(err)))
            return
        conn = _Conn(sock, kind, slot, now)
        self.conns[slot] = conn
        self.connecting[kind] += 1
        self.retry_at.pop(slot, None)
        self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def _failed(self, slot: int, now: float, why: str) -> None:
        self.totals["connect_failures"] += 1
        self.errors[why] = self.errors.get(why, 0) + 1
        self._schedule(slot, now, short=True)

    def _schedule(self, slot: int, now: float, short: bool) -> None:
        if short:
            b = self.backoff[slot]
            b = BACKOFF_FIRST_S if b == 0 else min(BACKOFF_MAX_S, 2 * b)
            self.backoff[slot] = b
            self.retry_at[slot] = now + b
        else:
            self.backoff[slot] = 0.0
            self.retry_at[slot] = now

    def _drop(self, conn: _Conn, now: float) -> None:
        """Close ``conn`` (ours to close, or closed by the server) and free its slot."""
        self.sel.unregister(conn.sock)
        conn.sock.close()
        del self.conns[conn.slot]
        if conn.state == "open":
            self.open[conn.kind] -= 1
        else:
            self.connecting[conn.kind] -= 1

    def _closed_by_server(self, conn: _Conn, now: float, answered: bool) -> None:
        self._account(now)
        self.totals["closed_by_server"][conn.kind] += 1
        if answered:
            self.totals["answered_by_server"][conn.kind] += 1
        self._drop(conn, now)
        self._schedule(conn.slot, now, short=now - conn.since < SHORT_LIVED_S)

    def _established(self, conn: _Conn, now: float) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop(conn, now)
            self._failed(conn.slot, now, errno.errorcode.get(err, str(err)))
            return
        self._account(now)
        self.connecting[conn.kind] -= 1
        self.open[conn.kind] += 1
        conn.state = "open"
        conn.since = now
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.kind == SLOW:
            if not self._send(conn, SLOW_HEAD, now):
                return
            conn.drip_at = now + SLOW_BYTE_EVERY_S

    def _send(self, conn: _Conn, data: bytes, now: float) -> bool:
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0  # a full send buffer: the server reads nothing; try again next tick
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.errors[name] = self.errors.get(name, 0) + 1
            self._closed_by_server(conn, now, answered=False)
            return False
        if data is not SLOW_HEAD:
            self.totals["bytes_dripped"] += sent
            conn.dripped += sent
        return True

    def _readable(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.errors[name] = self.errors.get(name, 0) + 1
            data = b""
        self._closed_by_server(conn, now, answered=bool(data))

    # -- control ----------------------------------------------------------------------------

    def _on_control(self, now: float) -> None:
        while self.control.poll():
            try:
                msg = self.control.recv()
            except EOFError:  # the parent is gone
                self.stopping = True
                return
            if msg == "mark":
                self.window = {"t0": now, "last": now, "open_seconds": {IDLE: 0.0, SLOW: 0.0},
                               "min_open": dict(self.open),
                               "opens_at_mark": self.totals["opens"],
                               "closed_at_mark": dict(self.totals["closed_by_server"])}
            elif msg == "report":
                self._account(now)
                self.control.send(("report", self.stats(now)))
            elif msg == "stop":
                self.stopping = True

    # -- loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ctl = self.control.fileno()
        self.sel.register(ctl, selectors.EVENT_READ, None)
        want = len(self.kinds)
        while not self.stopping:
            now = time.monotonic()
            if now >= self.deadline:
                break
            for slot in [s for s, t in self.retry_at.items() if t <= now]:
                self._open(slot, now)
            for conn in list(self.conns.values()):
                if conn.state == "connecting" and now - conn.since > CONNECT_LIMIT_S:
                    self.totals["connect_timeouts"] += 1
                    self._drop(conn, now)
                    self._failed(conn.slot, now, "connect_timeout")
                elif conn.kind == SLOW and conn.state == "open" and conn.drip_at <= now:
                    byte = SLOW_DRIP[conn.dripped % len(SLOW_DRIP):][:1]
                    if self._send(conn, byte, now):
                        conn.drip_at = max(conn.drip_at + SLOW_BYTE_EVERY_S, now)
            if not self.ready_sent and self.open[IDLE] + self.open[SLOW] == want:
                self.ready_sent = True
                self.control.send(("ready", self.stats(now)))
            self._account(now)
            wake = [self.deadline, *self.retry_at.values()]
            wake += [c.drip_at for c in self.conns.values()
                     if c.kind == SLOW and c.state == "open"]
            if self.connecting[IDLE] + self.connecting[SLOW]:
                wake.append(now + 0.5)  # to notice a connect that hangs
            timeout = max(0.0, min(wake) - time.monotonic())
            for key, mask in self.sel.select(timeout):
                now = time.monotonic()
                conn = key.data
                if conn is None:
                    self._on_control(now)
                elif conn.slot not in self.conns or self.conns[conn.slot] is not conn:
                    continue  # dropped earlier in this batch
                elif conn.state == "connecting":
                    if mask & (selectors.EVENT_WRITE | selectors.EVENT_READ):
                        self._established(conn, now)
                elif mask & selectors.EVENT_READ:
                    self._readable(conn, now)
        now = time.monotonic()
        self._account(now)
        final = self.stats(now)
        for conn in list(self.conns.values()):
            self._drop(conn, now)
        self.sel.close()
        return final


def _raise_nofile() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def attacker_main(host: str, port: int, idle: int, slow: int, max_seconds: float,
                  max_opens: int, control: Any) -> None:
    """Entry point of the spawned attacker process."""
    try:
        soft, hard = _raise_nofile()
        if soft != -1 and idle + slow + 16 > soft:
            raise RuntimeError(f"RLIMIT_NOFILE {soft} (hard {hard}) is too low for "
                               f"{idle + slow} connections")
        attack = _Attack(host, port, idle, slow, max_seconds, max_opens, control)
        final = attack.run()
        final["nofile"] = [soft, hard]
        control.send(("stopped", final))
    except BaseException:
        with contextlib.suppress(OSError):
            control.send(("error", traceback.format_exc()))


class SlowClients:
    """The parent's handle on the attacker process (a context manager)."""

    def __init__(self, host: str, port: int, idle: int, slow: int, max_seconds: float,
                 max_opens: int | None = None) -> None:
        addr = ipaddress.ip_address(host)
        if addr.version != 4 or not addr.is_loopback:
            raise ValueError(f"slow clients only connect to 127.0.0.0/8, not {host}")
        if idle < 0 or slow < 0 or max_seconds <= 0:
            raise ValueError("idle, slow >= 0 and max_seconds > 0")
        self.args = (host, port, idle, slow, float(max_seconds),
                     max_opens if max_opens is not None
                     else (idle + slow) * (1 + int(max_seconds) + 1))
        self.proc: Any = None
        self.conn: Any = None
        self.final: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> SlowClients:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=attacker_main, name="wkr-bench-slowclients",
                                args=(*self.args, child), daemon=True)
        self.proc.start()
        child.close()
        return self

    def _expect(self, tag: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                return None
            got, value = self.conn.recv()
            if got == "error":
                raise RuntimeError(f"slow-client process failed:\n{value}")
            if got == "stopped":
                self.final = value
                if tag != "stopped":
                    raise RuntimeError(f"slow-client process ended early: {value}")
            if got == tag:
                return value

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until every connection is established; after ``timeout`` return the counts
        reached so far (``ready`` False)."""
        stats = self._expect("ready", timeout)
        if stats is not None:
            return {**stats, "ready": True}
        return {**self.report(), "ready": False}

    def mark(self) -> None:
        """The measured window starts now."""
        self.conn.send("mark")

    def report(self) -> dict[str, Any]:
        self.conn.send("report")
        stats = self._expect("report", REPLY_LIMIT_S)
        if stats is None:
            raise RuntimeError("slow-client process did not answer")
        return stats

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.proc.is_alive():
                try:
                    self.conn.send("stop")
                    if self.final is None:
                        self._expect("stopped", STOP_LIMIT_S)
                except (OSError, RuntimeError):
                    pass
            self.proc.join(STOP_LIMIT_S)
        finally:
            if self.proc.is_alive():  # only the process started here, by its pid
                self.proc.terminate()
                self.proc.join(5)
                if self.proc.is_alive():
                    self.proc.kill()
                    self.proc.join(5)
            self.conn.close()
