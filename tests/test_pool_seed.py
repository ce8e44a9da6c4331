"""The Getting Started page's own decentralized client (issue 8, Part B point 1).

tests/seed_page/decentralize.py is the page's ``decentralize.py`` verbatim. The test
changes only its addresses (Redis on a free loopback port) and defines ``PUSH_API`` (the
page uses it without defining it), then runs it with the page's command line
(``-remote_servers`` in the page's unquoted form) against a real server and a real
redis-server, and drains a :class:`RedisHandler` queue in FIFO order.

The page's step 3 calls ``request.post`` (a typo for ``requests``): as written, every job
is popped and computed, then raises NameError, which the page wraps in its "THIS IS
CUSTOM EXCEPTION" message. The first test shows the pool running that code as it is
(each failure logged with its traceback and counted, the loop going on, the queue
drained in order); the second fixes the typo, the only other change, and checks that
every result reaches ``PUSH_API``, in order.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import wait_until
from poolhelp import CLIPool
from wkr_serving.client.helper import RedisHandler

PAGE_CODE = (Path(__file__).parent / "seed_page" / "decentralize.py").read_text()
JOBS = [f"job-{i}" for i in range(20)]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the page's code exactly once"
    return text.replace(old, new)


def _page_code(redis_port: int, push_api: str, fix_typo: bool = False) -> str:
    code = _replace_once(PAGE_CODE, "REDIS_IP = '10.40.34.14'", "REDIS_IP = '127.0.0.1'")
    code = _replace_once(code, "REDIS_PORT = 12345", f"REDIS_PORT = {redis_port}")
    code = _replace_once(code, "class ProcessingModel(WKRWorker):",
                         f"PUSH_API = {push_api!r}\n\nclass ProcessingModel(WKRWorker):")
    if fix_typo:
        code = _replace_once(code, "request.post(", "requests.post(")
    return code


class _Receiver:
    """The ``PUSH_API`` endpoint: a loopback HTTP server recording each JSON body."""

    def __init__(self) -> None:
        received: list = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/push"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    rec = _Receiver()
    yield rec
    rec.close()


def _start_page_pool(tmp_path, obj_server, code: str) -> CLIPool:
    workdir = tmp_path / "page"
    workdir.mkdir()
    (workdir / "decentralize.py").write_text(code)
    servers = f"[[127.0.0.1, {obj_server.port}, {obj_server.port_out}]]".split()
    return CLIPool("decentralize.ProcessingModel",
                   ["-num_client", "1", "-remote_servers", *servers,
                    "-log_dir", str(tmp_path / "log_dir")],
                   tmp_path, cwd=str(workdir))


def test_the_pages_decentralize_py_as_written_drains_the_queue_in_order(
        tmp_path, redis_server, obj_server, receiver):
    queue = RedisHandler("EXAMPLE_QUEUE", "127.0.0.1", redis_server.port)
    pool = _start_page_pool(tmp_path, obj_server, _page_code(redis_server.port,
                                                             receiver.url))
    try:
        pool.wait_running(1)
        for job in JOBS:
            queue.push(job)
        pool.wait_status(lambda s: s["errors"] >= len(JOBS), "every job to be processed",
                         limit=120)
        assert queue.pop() is None  # drained
        errors = (tmp_path / "log_dir" / "WKRDecentralize.err").read_text()
        seen = re.findall(r"do_work failed \(\d+ in a row\): .*\n"
                          r"THIS IS CUSTOM EXCEPTION for input: (job-\d+)", errors)
        assert seen == JOBS  # first in, first out
        assert "NameError: name 'request' is not defined" in errors
        assert receiver.received == []
        status = pool.status()
        assert status["units"][0]["restarts"] == 0 and status["units_running"] == 1
    finally:
        queue.close()
        pool.close()
    assert pool.proc.returncode == 0


def test_the_pages_decentralize_py_with_its_typo_fixed_pushes_every_result(
        tmp_path, redis_server, obj_server, receiver):
    queue = RedisHandler("EXAMPLE_QUEUE", "127.0.0.1", redis_server.port)
    for job in JOBS:
        queue.push(job)
    pool = _start_page_pool(tmp_path, obj_server, _page_code(
        redis_server.port, receiver.url, fix_typo=True))
    try:
        wait_until(lambda: len(receiver.received) >= len(JOBS), 120,
                   "every result to reach PUSH_API")
        assert receiver.received == JOBS  # the echo server's results, in FIFO order
        log = tmp_path / "log_dir" / "WKRDecentralize.log"
        # The unit logs DONE after PUSH_API answered: wait for the last line too.
        wait_until(lambda: log.read_text().count("DONE job with input: job-") == len(JOBS),
                   30, "every job's DONE line")
        assert pool.status()["errors"] == 0
    finally:
        queue.close()
        pool.close()
    assert pool.proc.returncode == 0
