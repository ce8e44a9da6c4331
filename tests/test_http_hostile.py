"""Hostile HTTP clients against the bridge's event-driven front, through real
``wkr-serving-start`` subprocesses on 127.0.0.1 (``-http_port 0``: the bridge's port is
found as the one its processes listen on).

Covered: slow and idle clients do not starve a normal request, and are cut after
``-http_read_timeout`` / ``-http_keepalive``; the per-process connection cap
(``-http_max_connections``); bodies over ``-http_max_body`` (declared or chunked) get 413
at once with bounded memory; amplification (``dtype`` inflating a tiny body) and
``-max_request_items``; strict JSON in and out (``NaN`` refused, a model's ``nan``
written as ``null``, deep nesting refused); JSON error envelopes for 404/405; a taken
port at boot; CORS and the bearer token (case-insensitive scheme, preflight without it,
never shown); and the supervisor restarting a SIGKILLed bridge on the same port while
ZeroMQ clients keep working.

Every wait is bounded; slow attackers are paced with ``Event.wait`` / ``select`` (pacing
the attacker, not synchronisation). Servers are shared per module where their options
allow it; each test uses small limits so that the file stays fast.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from helpers import (
    START_LIMIT_S,
    TESTS_DIR,
    CLIServer,
    gone,
    start_command,
    wait_until,
)

WORKER = "workers.NonFiniteWorker"
MODEL = "NonFiniteWorker"  # the v2 model name: the last part of the worker class
MAX_BODY = 1_000_000
MAX_ITEMS = 50
MAX_MSG = 1_000_000
MAX_CONNECTIONS = 50
MB = 1024 * 1024
#: Flags of every server here: one CPU worker, few clients to the server per bridge
#: process (fast to start), a short drain on stop.
BASE_FLAGS = ["-cpu", "-num_worker", "1", "-http_port", "0", "-http_max_connect", "16",
              "-graceful_timeout", "3"]
#: Longest a single well-behaved HTTP call may take before it counts as "no answer".
CALL_LIMIT_S = 10.0
#: Generous bound for answers that must be prompt.
PROMPT_S = 2.0
ROUTES = ["/encode", "/jobs", f"/v2/models/{MODEL}/infer"]


# -- servers --------------------------------------------------------------------------------


def tree(cli: CLIServer) -> list[psutil.Process]:
    """The server process and all its descendants (those still there)."""
    top = psutil.Process(cli.proc.pid)
    return [top, *top.children(recursive=True)]


def listening_ports(proc: psutil.Process) -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {c.laddr.port for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN}
    return set()


def bridge_processes(cli: CLIServer, port: int) -> list[psutil.Process]:
    """The processes of the server's tree that listen on the HTTP port."""
    return [p for p in tree(cli) if port in listening_ports(p)]


def top_bridges(cli: CLIServer, port: int) -> list[psutil.Process]:
    """The bridge processes whose parent is not itself a bridge process (the ones the
    supervisor started)."""
    procs = bridge_processes(cli, port)
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid() not in pids]


def established(procs: list[psutil.Process], port: int) -> int:
    """Connections to ``port`` the processes have accepted (an fd each) and not closed."""
    count = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            count += sum(1 for c in proc.net_connections(kind="tcp")
                         if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
                         and c.status != psutil.CONN_CLOSE)
    return count


def get_live(port: int, timeout: float = 2.0) -> int | None:
    """The status of ``GET /health/live`` on a new connection, None if no answer."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/health/live", timeout=timeout).status_code
    except requests.RequestException:
        return None


@dataclass
class Served:
    cli: CLIServer
    http_port: int
    token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def bridges(self) -> list[psutil.Process]:
        return bridge_processes(self.cli, self.http_port)


def start(tmp: Path, *flags: str, env: dict[str, str] | None = None, name: str = "server",
          token: str | None = None) -> Served:
    """A ready server with its bridge answering; its HTTP port found by psutil."""
    cli = CLIServer([WORKER, *BASE_FLAGS, *flags], tmp, env=env, name=name)
    try:
        cli.client().close()

        def http_port() -> int | None:
            if cli.proc.poll() is not None:
                raise AssertionError(f"server exited with {cli.proc.returncode}:\n"
                                     f"{cli.stderr()[-4000:]}")
            ports = set().union(*(listening_ports(p) for p in tree(cli)))
            ports -= {cli.port, cli.port_out}
            assert len(ports) <= 1, f"several unknown listening ports: {ports}"
            return ports.pop() if ports else None

        port = wait_until(http_port, START_LIMIT_S, "the HTTP bridge to listen", 0.05)
        wait_until(lambda: get_live(port) == 200, START_LIMIT_S, "the HTTP bridge to answer",
                   0.05)
    except BaseException:
        cli.close(5)
        raise
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Served(cli, port, token, headers)


@pytest.fixture(scope="module")
def main_server(tmp_path_factory) -> Iterator[Served]:
    """No token, no CORS, small body, item and frame limits."""
    served = start(tmp_path_factory.mktemp("hostile_main"), "-http_max_body", str(MAX_BODY),
                   "-max_request_items", str(MAX_ITEMS), "-max_msg_size", str(MAX_MSG))
    yield served
    served.cli.close()


@pytest.fixture(scope="module")
def quick_server(tmp_path_factory) -> Iterator[Served]:
    """Short header/body read timeout and keep-alive; one bridge process."""
    served = start(tmp_path_factory.mktemp("hostile_quick"), "-http_read_timeout", "1",
                   "-http_keepalive", "1", "-http_workers", "1")
    yield served
    served.cli.close()


ENV_TOKEN = f"envtok-{uuid.uuid4().hex}"
CLI_TOKEN = f"clitok-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def star_server(tmp_path_factory) -> Iterator[Served]:
    """``-cors`` alone (any origin), the token from WKR_HTTP_TOKEN, one bridge process
    holding at most 50 connections."""
    served = start(tmp_path_factory.mktemp("hostile_star"), "-cors", "-http_workers", "1",
                   "-http_max_connections", str(MAX_CONNECTIONS),
                   env={"WKR_HTTP_TOKEN": ENV_TOKEN}, token=ENV_TOKEN)
    yield served
    served.cli.close()


@pytest.fixture(scope="module")
def origin_server(tmp_path_factory) -> Iterator[Served]:
    """``-cors -cors_origins https://good.example``, the token given as -http_token."""
    served = start(tmp_path_factory.mktemp("hostile_origin"), "-cors", "-cors_origins",
                   "https://good.example", "-http_token", CLI_TOKEN, token=CLI_TOKEN)
    yield served
    served.cli.close()


# -- HTTP by hand ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    elapsed: float = 0.0

    def json(self) -> Any:
        return strict_json(self.body)


def strict_json(data: bytes) -> Any:
    """RFC 8259 JSON only: ``NaN``/``Infinity`` literals are an error."""
    def refuse(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(data, parse_constant=refuse)


def call(served: Served, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None, timeout: float = CALL_LIMIT_S,
         auth: bool = True) -> Answer:
    """One request on a new connection; bytes bodies are sent as they are, others as
    JSON. No answer within ``timeout`` is a test failure."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(served.headers if auth else {}),
            **(headers or {})}
    started = time.monotonic()
    try:
        response = requests.request(method, served.url(path), data=data, headers=sent,
                                    timeout=timeout)
    except requests.RequestException as exc:
        raise AssertionError(f"{method} {path}: no answer within {timeout}s "
                             f"({type(exc).__name__}: {exc})") from None
    return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                  response.content, time.monotonic() - started)


def assert_envelope(answer: Answer, status: int, error_type: str | None = None) -> dict:
    """The JSON error envelope with ``status`` (and ``error_type``)."""
    shown = f"{answer.status} {answer.headers.get('content-type')} {answer.body[:300]!r}"
    assert answer.status == status, shown
    assert answer.headers.get("content-type", "").split(";")[0].strip() == \
        "application/json", shown
    try:
        body = answer.json()
    except ValueError as exc:
        raise AssertionError(f"not JSON ({exc}): {shown}") from None
    assert isinstance(body, dict), shown
    assert body.get("error_code") == status, shown
    assert isinstance(body.get("error_type"), str) and body["error_type"], shown
    assert isinstance(body.get("error_message"), str), shown
    assert "data" in body and body["data"] is None, shown
    if error_type is not None:
        assert body["error_type"] == error_type, shown
    return body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response(buf: bytes, closed: bool) -> Answer | None:
    """An HTTP/1.1 response from the start of ``buf``, None while incomplete."""
    top, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if "content-length" in headers:
        size = int(headers["content-length"])
        return Answer(status, headers, rest[:size]) if len(rest) >= size else None
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, pos = b"", 0
        while True:
            end = rest.find(b"\r\n", pos)
            if end < 0:
                return None
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0:
                return Answer(status, headers, body)
            if len(rest) < end + 2 + size + 2:
                return None
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
    return Answer(status, headers, rest) if closed or status in (204, 304) else None


def recv_response(sock: socket.socket, limit: float, buf: bytes = b"") -> tuple[Answer, bool]:
    """Read one response (bounded by ``limit`` seconds); ``(answer, closed)``, closed
    telling whether the server closed the connection while it was read."""
    deadline = time.monotonic() + limit
    closed = False
    while True:
        answer = parse_response(buf, closed)
        if answer is not None:
            return answer, closed
        if closed:
            raise AssertionError(f"connection closed before a whole response: {buf[:300]!r}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no whole response within {limit}s: {buf[:300]!r}")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            data = b""
        closed = not data
        buf += data


def closed_within(sock: socket.socket, limit: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``limit`` seconds; and what it sent
    before closing."""
    deadline = time.monotonic() + limit
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, got
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False, got
        except ConnectionError:
            return True, got
        if not data:
            return True, got
        got += data


def check_cut(closed: bool, took: float, got: bytes, limit: float) -> None:
    """A connection the server cut within ``limit`` seconds: silently, or after a 408
    JSON envelope."""
    assert closed and took < limit, \
        f"the connection was still open after {took:.1f}s (limit {limit}s); got {got[:200]!r}"
    if got:
        answer = parse_response(got, True)
        assert answer is not None, got[:300]
        assert_envelope(answer, 408)


# -- processes ------------------------------------------------------------------------------


def rss(proc: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return int(proc.memory_info().rss)
    return 0


def reset_peak(proc: psutil.Process) -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``proc`` to its current RSS."""
    with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
        fh.write("5")


def peak(proc: psutil.Process) -> int:
    """Peak RSS (bytes) since the last :func:`reset_peak` (the current RSS if unknown)."""
    with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss(proc)


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"pid {proc.pid} {' '.join(proc.cmdline())[:80]}"
    return f"pid {proc.pid}"


# -- 1. slow and idle clients ---------------------------------------------------------------


class Slowloris:
    """``count`` connections each sending one byte of a never-ending request head every
    ``interval`` seconds, from a background thread, for at most ``limit`` seconds."""

    HEAD = (b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Slow: " + b"s" * 400)

    def __init__(self, port: int, count: int = 20, interval: float = 0.5,
                 limit: float = 60.0) -> None:
        self.port, self.count, self.interval, self.limit = port, count, interval, limit
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.socks: list[socket.socket] = []
        self.cut = 0  # connections the server closed
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def __enter__(self) -> Slowloris:
        self.thread.start()
        assert self.ready.wait(20), "the slow connections did not open"
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()

    def _run(self) -> None:
        try:
            self.socks = [connect(self.port, 2.0) for _ in range(self.count)]
        except BaseException as exc:  # reported by __enter__
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        deadline = time.monotonic() + self.limit
        for i in range(len(self.HEAD)):  # bounded: the head is never finished
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            for s in list(self.socks):
                try:
                    s.send(self.HEAD[i:i + 1])
                except OSError:
                    self.socks.remove(s)
                    s.close()
                    self.cut += 1
            self.stop.wait(self.interval)  # the attacker's pace


@pytest.mark.timeout(180)
def test_slow_and_idle_clients_do_not_starve_a_normal_request(main_server):
    port = main_server.http_port
    keep_alive: list[http.client.HTTPConnection] = []
    idle: list[socket.socket] = []
    try:
        for _ in range(50):  # one request done, then silent
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_LIMIT_S)
            keep_alive.append(conn)
            conn.request("GET", "/health/live")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        for _ in range(200):  # opened, nothing sent
            idle.append(connect(port))
        with Slowloris(port) as slow:
            for i in range(20):
                answer = call(main_server, "POST", "/encode", {"data": [1, 2, 3]},
                              timeout=PROMPT_S * 3)
                assert answer.status == 200, (i, answer)
                assert answer.json()["data"] == [1, 2, 3]
                assert answer.elapsed < PROMPT_S, \
                    f"request {i} took {answer.elapsed:.2f}s with slow and idle clients open"
            assert slow.error is None
    finally:
        for conn in keep_alive:
            conn.close()
        for s in idle:
            s.close()


def test_incomplete_headers_are_cut_after_the_read_timeout(quick_server):
    """-http_read_timeout 1: a head that stops coming is cut within a few seconds."""
    with connect(quick_server.http_port) as s:
        s.sendall(b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
        started = time.monotonic()
        closed, got = closed_within(s, 6.0)
        check_cut(closed, time.monotonic() - started, got, 5.0)


def test_a_head_dripping_byte_by_byte_is_cut_after_the_read_timeout(quick_server):
    """-http_read_timeout bounds the whole head, not the gap between two bytes."""
    head_bytes = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: " + b"d" * 200
    with connect(quick_server.http_port) as s:
        started = time.monotonic()
        closed, got = False, b""
        for i in range(len(head_bytes)):  # bounded: the head is never finished
            if time.monotonic() - started > 8.0:
                break
            try:
                s.send(head_bytes[i:i + 1])
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([s], [], [], 0.3)  # the attacker's pace
            if readable:
                closed, got = closed_within(s, 2.0)
                break
        check_cut(closed, time.monotonic() - started, got, 5.0)


def test_a_stalled_body_is_cut_after_the_read_timeout(quick_server):
    """-http_read_timeout is also the longest gap between two parts of a body."""
    with connect(quick_server.http_port) as s:
        s.sendall(head("POST", "/encode", {"Content-Type": "application/json",
                                           "Content-Length": "100"}) + b'{"data": [1')
        started = time.monotonic()
        closed, got = closed_within(s, 6.0)
        check_cut(closed, time.monotonic() - started, got, 5.0)


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive(quick_server):
    conn = http.client.HTTPConnection("127.0.0.1", quick_server.http_port, timeout=CALL_LIMIT_S)
    try:
        conn.request("GET", "/health/live")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert conn.sock is not None, "the server did not keep the connection open at all"
        started = time.monotonic()
        closed, got = closed_within(conn.sock, 6.0)
        took = time.monotonic() - started
        assert closed and took < 4.0, \
            f"an idle keep-alive connection was still open after {took:.1f}s " \
            "(-http_keepalive 1)"
        assert got == b"", got[:300]
    finally:
        conn.close()


# -- 2. connection cap ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_connections_over_the_cap_get_503_and_the_server_recovers(star_server):
    port = star_server.http_port
    bridges = star_server.bridges()
    wait_until(lambda: established(bridges, port) == 0, 10,
               "earlier connections to be closed by the bridge")
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(connect(port))
        wait_until(lambda: established(bridges, port) >= MAX_CONNECTIONS, 10,
                   f"the bridge to accept {MAX_CONNECTIONS} connections")
        refused = False
        try:
            extra = connect(port)
        except ConnectionRefusedError:
            refused = True
        if not refused:
            with extra:
                with contextlib.suppress(OSError):
                    extra.sendall(head("GET", "/health/live", {}))
                closed, got = closed_within(extra, 5.0)
                assert closed, (f"connection {MAX_CONNECTIONS + 1} (over the cap) was neither "
                                f"answered and closed nor refused within 5s: {got[:300]!r}")
                if got:  # else closed unanswered: refused
                    answer = parse_response(got, True)
                    assert answer is not None, got[:300]
                    assert_envelope(answer, 503, "too_many_connections")
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: get_live(port) == 200, 10, "the bridge to answer once the idle "
               "connections closed")
    assert call(star_server, "POST", "/encode", {"data": 5}).json()["data"] == 5


# -- 3. bodies ------------------------------------------------------------------------------


def assert_too_large(answer: Answer, path: str) -> None:
    if path.startswith("/v2/"):
        shown = f"{answer.status} {answer.body[:300]!r}"
        assert answer.status == 413, shown
        body = answer.json()
        assert body.get("error_type") == "body_too_large" or "error" in body, shown
    else:
        assert_envelope(answer, 413, "body_too_large")


@pytest.mark.parametrize("path", ROUTES)
def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(main_server, path):
    with connect(main_server.http_port) as s:
        s.sendall(head("POST", path, {"Content-Type": "application/json",
                                      "Content-Length": str(500 * 1000 * 1000)}))
        s.sendall(b'{"data": "' + b"a" * 4000)
        started = time.monotonic()
        answer, _ = recv_response(s, PROMPT_S * 2)
        took = time.monotonic() - started
    assert_too_large(answer, path)
    assert took < PROMPT_S, f"413 came after {took:.2f}s"


@pytest.mark.parametrize("path", ROUTES)
def test_an_endless_chunked_body_is_413_with_bounded_memory(main_server, path):
    bridges = main_server.bridges()
    assert bridges
    before = {p.pid: rss(p) for p in bridges}
    for p in bridges:
        reset_peak(p)
    chunk = b"%x\r\n" % (64 * 1024) + b"a" * (64 * 1024) + b"\r\n"
    with connect(main_server.http_port) as s:
        s.sendall(head("POST", path, {"Content-Type": "application/json",
                                      "Transfer-Encoding": "chunked"}))
        got = b""
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 3.0:  # until the server answers, or 3 s
            readable, writable, _ = select.select([s], [s], [], 0.5)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionError:
                    data = b""
                got += data
                if not data or parse_response(got, False) is not None:
                    break
            elif writable:
                s.settimeout(1.0)
                try:
                    s.send(chunk)
                    sent += len(chunk)
                except (TimeoutError, ConnectionError, BrokenPipeError):
                    break
        answer, closed = recv_response(s, 3.0, got)
        assert_too_large(answer, path)
        if not closed:
            closed, _ = closed_within(s, 3.0)
        assert closed, "the connection stayed open after the 413"
        grown = {p.pid: peak(p) - before[p.pid] for p in bridges}
    assert max(grown.values()) < 100 * MB, \
        f"bridge RSS grew by {max(grown.values()) / MB:.0f} MB after {sent / MB:.0f} MB sent"

    def settled() -> bool:
        return all(rss(p) - before[p.pid] < 100 * MB for p in bridges)

    wait_until(settled, 5, "the bridge's memory to stay bounded after the client left")


# -- 4. amplification -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_dtype_that_inflates_a_tiny_body_is_refused_with_bounded_memory(main_server):
    procs = tree(main_server.cli)
    before = {p.pid: rss(p) for p in procs}
    for p in procs:
        reset_peak(p)
    answer = call(main_server, "POST", "/encode",
                  {"batch": ["a", "a", "a", "a"], "dtype": "U25000000"})
    body = assert_envelope(answer, 400, "bad_input")
    assert "-max_msg_size" in body["error_message"], body
    assert answer.elapsed < PROMPT_S, f"the 400 came after {answer.elapsed:.2f}s"
    grown = {describe(p): peak(p) - before[p.pid] for p in procs}
    worst = max(grown, key=lambda k: grown[k])
    assert grown[worst] < 200 * MB, f"{worst} grew by {grown[worst] / MB:.0f} MB"


def test_max_request_items_is_enforced_over_http(main_server):
    answer = call(main_server, "POST", "/encode", {"batch": list(range(MAX_ITEMS + 1))})
    body = assert_envelope(answer, 400, "bad_input")
    assert "-max_request_items" in body["error_message"], body
    answer = call(main_server, "POST", "/encode", {"batch": list(range(MAX_ITEMS))})
    assert answer.status == 200, answer
    assert answer.json()["data"] == list(range(MAX_ITEMS))


# -- 5. strict JSON and odd errors ----------------------------------------------------------


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_literals_are_400(main_server, literal):
    answer = call(main_server, "POST", "/encode", b'{"data": [1, ' + literal + b"]}")
    assert_envelope(answer, 400, "bad_input")


def test_a_non_finite_model_output_is_null_in_valid_json(main_server):
    expected = {"list": [None, None, None], "array": [None, None, None]}
    answer = call(main_server, "POST", "/encode", {"data": "nonfinite"})
    assert answer.status == 200, answer
    try:
        body = answer.json()
    except ValueError as exc:
        raise AssertionError(f"/encode answered invalid JSON ({exc}): {answer.body!r}") \
            from None
    assert body["data"] == expected


def test_a_job_result_with_non_finite_values_is_null_in_valid_json(main_server):
    expected = {"list": [None, None, None], "array": [None, None, None]}
    answer = call(main_server, "POST", "/jobs", {"data": "nonfinite"})
    assert answer.status == 202, answer
    job = answer.json()["job_id"]

    def done() -> Answer | None:
        got = call(main_server, "GET", f"/jobs/{job}")
        return got if b'"pending"' not in got.body else None

    answer = wait_until(done, 20, "the job to finish", 0.05)
    try:
        body = answer.json()
    except ValueError as exc:
        raise AssertionError(f"GET /jobs/<id> answered invalid JSON ({exc}): {answer.body!r}") \
            from None
    assert body.get("data") == expected, body


@pytest.mark.parametrize("path", ["/encode", "/jobs"])
def test_json_nested_100000_deep_is_400(main_server, path):
    depth = 100_000
    answer = call(main_server, "POST", path, b'{"data": ' + b"[" * depth + b"]" * depth + b"}")
    assert_envelope(answer, 400, "bad_input")


def test_a_wrong_method_is_405_json(main_server):
    assert_envelope(call(main_server, "GET", "/jobs"), 405, "method_not_allowed")


def test_an_unknown_path_is_404_json(main_server):
    assert_envelope(call(main_server, "GET", "/no/such/route"), 404)
    assert_envelope(call(main_server, "POST", "/no/such/route", {"data": 1}), 404)


@pytest.mark.timeout(120)
def test_a_taken_http_port_stops_the_boot_with_a_clear_message(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        flags = [a for a in BASE_FLAGS if a not in ("-http_port", "0")]
        boot_deadline = 20
        cli = CLIServer([WORKER, *flags, "-http_port", str(port), "-startup_timeout",
                         str(boot_deadline)], tmp_path, name="taken")
        try:
            code = cli.wait_exit(boot_deadline + 10)  # the deadline, then a bounded stop
        finally:
            cli.close(5)
    stderr = cli.stderr_path.read_text(errors="replace")
    assert code != 0, stderr[-3000:]
    # The settings printed at start (``http_port = N``) do not count as naming the port.
    said = "\n".join(line for line in stderr.splitlines()
                     if not re.match(r"\s*[a-z_]+ = ", line))
    assert str(port) in said, f"the port {port} is not named:\n{stderr[-3000:]}"
    assert re.search(r"already in use", stderr, re.IGNORECASE), stderr[-3000:]
    assert stderr.count("Traceback") <= 1, \
        f"{stderr.count('Traceback')} tracebacks:\n{stderr[-6000:]}"


@pytest.mark.parametrize("flag", ["-port", "-port_out"])
def test_a_taken_zeromq_port_stops_the_boot_with_one_clear_line(tmp_path, flag):
    """The same for the public ZeroMQ ports: the flag and the port named, no traceback."""
    other = "-port_out" if flag == "-port" else "-port"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*start_command(), WORKER, "-cpu", "-num_worker", "1", "-bind", "127.0.0.1",
             flag, str(port), other, "0", "-model_dir", str(tmp_path),
             "-startup_timeout", "20"],
            cwd=TESTS_DIR, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"({flag} {port}) is already in use" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]


# -- 6. access: CORS and the token ----------------------------------------------------------


PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_without_cors_no_response_allows_an_origin(main_server):
    evil = {"Origin": "https://evil.example"}
    answers = [call(main_server, "POST", "/encode", {"data": 1}, evil),
               call(main_server, "GET", "/status/server", headers=evil),
               call(main_server, "OPTIONS", "/encode", headers={**evil, **PREFLIGHT})]
    for answer in answers:
        assert "access-control-allow-origin" not in answer.headers, answer.headers
    assert answers[0].status == 200 and answers[1].status == 200


def test_cors_origins_allow_only_the_listed_origin(origin_server):
    good = call(origin_server, "POST", "/encode", {"data": 1}, {"Origin": "https://good.example"})
    assert good.status == 200, good
    assert good.headers.get("access-control-allow-origin") == "https://good.example", \
        good.headers
    assert "origin" in good.headers.get("vary", "").lower(), good.headers
    evil = call(origin_server, "POST", "/encode", {"data": 1}, {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers, evil.headers
    preflight = call(origin_server, "OPTIONS", "/encode",
                     headers={"Origin": "https://evil.example", **PREFLIGHT}, auth=False)
    assert "access-control-allow-origin" not in preflight.headers, preflight.headers


def check_preflight(served: Served, origin: str, allowed: str) -> None:
    answer = call(served, "OPTIONS", "/encode", headers={"Origin": origin, **PREFLIGHT},
                  auth=False)
    assert answer.status in (200, 204), answer
    assert answer.headers.get("access-control-allow-origin") == allowed, answer.headers
    allow_headers = answer.headers.get("access-control-allow-headers", "").lower()
    assert "authorization" in allow_headers, answer.headers


def check_token(served: Served) -> None:
    token = served.token
    assert token
    for scheme in ("bearer", "BEARER", "Bearer"):
        answer = call(served, "POST", "/encode", {"data": 3},
                      {"Authorization": f"{scheme} {token}"}, auth=False)
        assert answer.status == 200, (scheme, answer)
    for given in (f"Bearer {token}x", "Bearer wrong", ""):
        answer = call(served, "POST", "/encode", {"data": 3},
                      {"Authorization": given} if given else {}, auth=False)
        assert_envelope(answer, 401)
    assert_envelope(call(served, "GET", "/status/server", auth=False), 401)


def check_token_secret(served: Served, *, skip_top_cmdline: bool) -> None:
    token = served.token
    assert token
    for path in ("/status/server", "/status/client", "/metadata"):
        answer = call(served, "GET", path)
        assert answer.status == 200, (path, answer)
        assert token.encode() not in answer.body, f"{path} shows the token"
    top = served.cli.proc.pid
    for proc in tree(served.cli):
        if proc.pid == top and skip_top_cmdline:
            continue  # the user's own command line
        with contextlib.suppress(psutil.NoSuchProcess):
            shown = " ".join(proc.cmdline()) + " " + proc.name()
            assert token not in shown, f"pid {proc.pid} shows the token: {shown[:300]}"
    assert token not in served.cli.stderr(), "the server's log shows the token"


def test_cors_alone_allows_any_origin_and_the_env_token_works(star_server):
    answer = call(star_server, "POST", "/encode", {"data": 1}, {"Origin": "https://any.example"})
    assert answer.status == 200, answer
    assert answer.headers.get("access-control-allow-origin") == "*", answer.headers
    check_preflight(star_server, "https://any.example", "*")
    check_token(star_server)
    check_token_secret(star_server, skip_top_cmdline=False)


def test_token_with_cors_origins_preflight_and_secrecy(origin_server):
    check_preflight(origin_server, "https://good.example", "https://good.example")
    check_token(origin_server)
    check_token_secret(origin_server, skip_top_cmdline=False)  # hidden by setproctitle


# -- 7. supervision -------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_killed_bridge_is_restarted_on_the_same_port_while_zeromq_serves(quick_server):
    served = quick_server
    port = served.http_port
    victims = top_bridges(served.cli, port)
    assert victims, "no bridge process listens on the HTTP port"
    stop = threading.Event()
    zmq_ok: list[float] = []
    zmq_errors: list[BaseException] = []
    http_ok: list[float] = []
    client = served.cli.client()

    def zeromq_load() -> None:
        deadline = time.monotonic() + 60
        for i in range(100_000):  # bounded by count, time and the stop event
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                assert client.encode(i) == i
                zmq_ok.append(time.monotonic())
            except BaseException as exc:
                zmq_errors.append(exc)
                return

    def http_load() -> None:
        deadline = time.monotonic() + 60
        for i in range(100_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                response = requests.post(served.url("/encode"), json={"data": i}, timeout=2)
                if response.status_code == 200:
                    http_ok.append(time.monotonic())
            except requests.RequestException:
                stop.wait(0.05)  # the bridge is down: the load's own pace

    threads = [threading.Thread(target=zeromq_load, name="zmq-load", daemon=True),
               threading.Thread(target=http_load, name="http-load", daemon=True)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: (len(zmq_ok) >= 20 and len(http_ok) >= 5) or zmq_errors, 20,
                   "both loads to run")
        killed_at = time.monotonic()
        for victim in victims:
            os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: all(gone(p.pid) for p in victims), 10, "the bridge to die")

        def answers_again() -> bool:  # on a new connection: a request the old bridge
            return get_live(port, 1.0) == 200  # finished may be counted after the kill

        wait_until(answers_again, 10, "HTTP to answer again after the bridge was killed")
        took = time.monotonic() - killed_at
        count = len(zmq_ok)
        wait_until(lambda: len(zmq_ok) >= count + 20 or zmq_errors, 20,
                   "more ZeroMQ calls after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        client.close()
    assert not zmq_errors, f"a ZeroMQ call failed: {zmq_errors[0]!r}"
    assert took < 10
    assert served.cli.proc.poll() is None, served.cli.stderr()[-4000:]
    now = top_bridges(served.cli, port)
    assert now and not {p.pid for p in now} & {p.pid for p in victims}, \
        "no new bridge process listens on the same port"
    assert call(served, "POST", "/encode", {"data": 9}).json()["data"] == 9


def test_a_bridge_that_keeps_dying_stops_the_server_with_the_reason(tmp_path):
    """Supervision has a limit: more than 5 deaths of a bridge process in 60 s stop the
    whole server (exit 1) with an error naming the bridge, instead of looping."""
    served = start(tmp_path, "-http_workers", "1", name="dying")
    try:
        port = served.http_port
        for kill in range(6):  # bounded: the sixth death is one too many
            victims = top_bridges(served.cli, port)
            assert victims, f"no bridge listens before kill {kill + 1}"
            for victim in victims:
                os.kill(victim.pid, signal.SIGKILL)
            wait_until(lambda v=victims: all(gone(p.pid) for p in v), 10, "the bridge to die")
            if kill < 5:
                wait_until(lambda v=victims: bool(top_bridges(served.cli, port)) and not {
                    p.pid for p in top_bridges(served.cli, port)} & {p.pid for p in v},
                    START_LIMIT_S, f"the bridge to be restarted ({kill + 1})", 0.05)
        code = served.cli.wait_exit(30)
        assert code == 1, served.cli.stderr()[-3000:]
        assert "http-0 died 6 times" in served.cli.stderr(), served.cli.stderr()[-3000:]
    finally:
        served.cli.close(5)
