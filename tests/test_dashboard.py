"""The live dashboard of the HTTP bridge (``server/http/dashboard.py``), end to end.

A real server with the bridge (ControlledWorker, obj protocol), real HTTP on loopback,
and the page itself in Debian's headless Chromium driven by Playwright (no browser
download: ``executable_path`` is the system ``chromium``, installed by
``scripts/test.sh``). The browser test loads ``/dashboard``, waits for the workers table
to show the worker pids that ``server_status`` reports, drives load through a
``WKRClient`` (plus a few failing requests), and checks that the displayed numbers
follow the server's counters, that the charts drew the data (their uPlot data and
their canvas pixels), and that the page logged no error. It saves a full-page
screenshot to ``tests/artifacts/dashboard.png`` (or ``$WKR_TEST_ARTIFACTS``), a directory
ignored by git, and prints its path.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    connect,
    http_call,
    http_request,
    running_server,
    serve,
    server_args,
    wait_idle,
    wait_until,
)
from playwright.sync_api import Browser, ConsoleMessage, Page, Route
from wkr_serving.client import WKRClient
from wkr_serving.client import errors as E
from wkr_serving.server import WKRServer
from wkr_serving.server.http.dashboard import STATIC_DIR
from workers import ControlledWorker

HTTP_LIMIT_S = 20.0
#: Milliseconds the page gets for each awaited change (it polls once a second; the test
#: machine is small and shared, so this is generous).
PAGE_LIMIT_MS = 45_000
ARTIFACTS = Path(os.environ.get("WKR_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent / "artifacts")

#: Colours the page draws its series with (dashboard.js COLORS): requests/s and errors.
BLUE = (0x60, 0xA5, 0xFA)
RED = (0xF8, 0x71, 0x71)

#: Counts the pixels of a chart's canvas close to one colour (any opacity but zero).
COUNT_PIXELS_JS = """([selector, rgb]) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas) return -1;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && Math.abs(d[i] - rgb[0]) < 24 && Math.abs(d[i + 1] - rgb[1]) < 24
        && Math.abs(d[i + 2] - rgb[2]) < 24) n++;
  }
  return n;
}"""


#: The page's charts (ids ``chart-<name>``).
CHARTS = ("throughput", "latency", "queue", "batches", "errors", "cpu")


def canvas_picture(page: Page, name: str) -> str:
    """What chart ``name`` shows now: its canvas as a PNG data URL."""
    return page.evaluate(
        "(sel) => document.querySelector(sel + ' canvas').toDataURL('image/png')",
        f"#chart-{name}")


def artifact(name: str) -> Path:
    """A path for a test artifact, in a directory that git ignores."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS / name


def as_int(text: str) -> int:
    return int(text.replace(",", "").strip())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WKRServer]:
    yield from serve(tmp_path_factory, "dashboard_model", ControlledWorker, "-http_port", "0",
                     "-protocol", "obj", "-num_worker", "2", "-batch_size", "8", "-cpu")


@pytest.fixture(scope="module")
def base(server: WKRServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


class PageLog:
    """Everything a page reported that would mean it is broken."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status} for {r.url}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """A plain GET of ``url``: ``(status, headers, raw body)``."""
    return http_request(url, timeout=HTTP_LIMIT_S)


def raw_get(base: str, path: str, follow: bool = False) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``); with
    ``follow``, follow up to 3 redirects within the server (Flask merges ``//``)."""
    host, port = base.removeprefix("http://").split(":")
    for _ in range(4):
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_LIMIT_S)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            status, body = response.status, response.read()
            location = response.getheader("Location") or ""
        finally:
            conn.close()
        if not (follow and status in (301, 302, 307, 308)):
            return status, body
        path = location.removeprefix(base)
        assert path.startswith("/"), f"redirected away from the server: {location}"
    raise AssertionError(f"too many redirects for {path}")


def test_page_and_static_files_are_served_from_the_package(base: str) -> None:
    status, headers, body = get(f"{base}/dashboard")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css"):
        assert f'"dashboard/static/{name}"' in page
        status, headers, body = get(f"{base}/dashboard/static/{name}")
        assert status == 200, name
        assert body == (Path(STATIC_DIR) / name).read_bytes(), name
    assert "http://" not in page and "https://" not in page, "the page must not load a CDN"
    assert get(f"{base}/dashboard/static/dashboard.js")[1]["Content-Type"].startswith(
        ("text/javascript", "application/javascript"))
    assert get(f"{base}/dashboard/static/dashboard.css")[1]["Content-Type"].startswith(
        "text/css")
    # the vendored library carries its licence
    assert b"MIT License" in get(f"{base}/dashboard/static/uPlot.LICENSE")[2]
    # /dashboard/ leads to the page (its links are relative to /dashboard)
    status, body = raw_get(base, "/dashboard/")
    assert status == 308
    assert get(f"{base}/dashboard/")[0] == 200


@pytest.mark.parametrize("path", [
    "/dashboard/static/../../httpapp.py",
    "/dashboard/static/../http_dashboard.py",
    "/dashboard/static/..%2fhttp_dashboard.py",
    "/dashboard/static/%2e%2e/%2e%2e/client/errors.py",
    "/dashboard/static/%2e%2e%2f%2e%2e%2fserver%2fconfig.py",
    "/dashboard/static//etc/passwd",
    "/dashboard/static/%2fetc%2fpasswd",
    "/dashboard/static/no-such-file.js",
])
def test_static_route_refuses_paths_outside_its_directory(base: str, path: str) -> None:
    status, body = raw_get(base, path, follow=True)
    assert status == 404, (path, status)
    assert b"import" not in body and b"root:" not in body


def test_data_reports_the_server_and_its_processes(server: WKRServer, base: str,
                                                    obj_client_of: WKRClient) -> None:
    status, headers, body = get(f"{base}/dashboard/data")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    first = json.loads(body)
    assert first["ok"] is True and first["server"]["ready"] is True
    assert first["server"]["protocol"] == "obj"
    assert first["server"]["worker_class"].endswith("ControlledWorker")
    truth = obj_client_of.server_status
    assert [w["pid"] for w in first["workers"]] == [w["pid"] for w in truth["workers"]]
    for w in first["workers"]:
        assert w["alive"] is True and w["device"] == "cpu" and w["gpu"] is None
        assert w["rss_bytes"] > 1 << 20 and w["cpu_s"] > 0 and w["threads"] >= 1
    roles = {p["role"]: p for p in first["processes"]}
    assert set(roles) == {"supervisor", "ventilator", "sink", "http"}
    assert roles["ventilator"]["pid"] == truth["ventilator_pid"]
    assert roles["sink"]["pid"] == truth["sink_pid"]
    assert all(p["alive"] and p["rss_bytes"] > 0 for p in roles.values())
    assert isinstance(first["gpus"], list)  # GPUtil: empty on a machine without NVIDIA GPUs

    obj_client_of.encode_batch(list(range(30)))
    with pytest.raises(E.ModelError):
        obj_client_of.encode({"cmd": "raise", "message": "dashboard data test"})
    wait_idle(obj_client_of)
    second = json.loads(get(f"{base}/dashboard/data")[2])
    assert second["counters"]["requests"] == first["counters"]["requests"] + 2
    assert second["counters"]["items"] == first["counters"]["items"] + 31
    assert second["counters"]["results"] == first["counters"]["results"] + 1
    assert second["errors"].get("model_error", 0) == first["errors"].get("model_error", 0) + 1
    assert sum(second["batch_size"]["counts"].values()) > sum(
        first["batch_size"]["counts"].values())
    assert second["latency_ms"]["p50"] > 0 and second["latency_ms"]["p99"] > 0
    assert second["time"] > first["time"]


@pytest.fixture
def obj_client_of(server: WKRServer) -> Iterator[WKRClient]:
    client = connect(server)
    try:
        yield client
    finally:
        client.close()


class Load:
    """Clients sending small requests in threads until stopped (at most ``limit`` each)."""

    def __init__(self, server: WKRServer, threads: int = 3, limit: int = 20_000) -> None:
        self.stop = threading.Event()
        self.sent = [0] * threads
        self.failed: list[BaseException] = []
        self.clients = [connect(server) for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i, limit), daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, limit: int) -> None:
        client = self.clients[i]
        for n in range(limit):
            if self.stop.is_set():
                return
            try:
                client.encode_batch([n, n + 1, n + 2])
            except E.ModelError:
                pass  # a failing request shared this request's batch
            except BaseException as exc:
                self.failed.append(exc)
                return
            self.sent[i] += 1

    def total(self) -> int:
        return sum(self.sent)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"
        for c in self.clients:
            c.close()


def dashboard_state(page: Page) -> dict[str, Any]:
    return page.evaluate("""() => {
      const s = window.wkrDashboard, c = s.charts;
      const max = (a) => a.reduce((m, v) => (v != null && v > m ? v : m), 0);
      return {
        polls: s.polls, rates: s.rates,
        throughputPoints: c.throughput.data[0].length,
        maxRequestRate: max(c.throughput.data[1]), maxResultRate: max(c.throughput.data[2]),
        latencyPoints: c.latency.data[1].filter((v) => v != null).length,
        maxP99: max(c.latency.data[2]),
        batchBars: c.batches.data[1].filter((v) => v > 0).length,
        errorKinds: c.errors.data[0].length, errorCounts: c.errors.data[1],
        cpuSeries: c.cpu ? c.cpu.data.length - 1 : 0,
      };
    }""")


def shown(page: Page, element_id: str) -> str:
    return page.inner_text(f"#{element_id}")


def test_dashboard_in_chromium_follows_the_server(server: WKRServer, base: str,
                                                  browser: Browser) -> None:
    probe = connect(server)
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(PAGE_LIMIT_MS)
    log = PageLog(page)
    load: Load | None = None
    try:
        page.goto(f"{base}/dashboard", wait_until="load")
        # the workers table lists exactly the workers the server reports, by pid
        truth = probe.server_status
        pids = [w["pid"] for w in truth["workers"]]
        page.wait_for_function(
            """(pids) => pids.every((pid) =>
                 document.querySelector(`#workers-body tr[data-pid="${pid}"]`))""", arg=pids)
        assert page.locator("#workers-body tr").count() == len(pids)
        assert shown(page, "status-pill").strip().lower() == "ready"
        page.wait_for_function("window.wkrDashboard.polls >= 2")
        wait_idle(probe)
        before_requests = probe.server_status["num_requests"]
        page.wait_for_function(
            "(n) => document.getElementById('stat-requests').textContent.replace(/,/g, '')"
            " === String(n)", arg=before_requests)
        shown_before = as_int(shown(page, "stat-requests"))
        pictures_before = {name: canvas_picture(page, name) for name in CHARTS}

        # load: a few hundred requests at least, until the page shows the traffic
        load = Load(server)
        failing = 0
        for _ in range(5):
            with pytest.raises(E.ModelError):
                probe.encode({"cmd": "raise", "message": "dashboard browser test"})
            failing += 1
        for n in range(20):  # and some through the bridge's own /encode
            status, _, body = http_call(server, "/encode", {"batch": [n, n]},
                                        timeout=HTTP_LIMIT_S)
            assert status == 200 and body["data"] == [n, n]
        wait_until(lambda: load.total() >= 300 or load.failed, 60, "300 requests sent")
        assert not load.failed, load.failed
        page.wait_for_function("""() => {
          const s = window.wkrDashboard, t = s.charts.throughput.data[1];
          return s.rates.requests > 0 && t.filter((v) => v > 0).length >= 6
            && document.getElementById('stat-req-rate').textContent !== '0';
        }""")
        during = dashboard_state(page)
        assert during["maxRequestRate"] > 0 and during["maxResultRate"] > 0
        assert as_int(shown(page, "stat-requests")) > shown_before
        shot = artifact("dashboard.png")
        page.screenshot(path=str(shot), full_page=True)
        print(f"\ndashboard screenshot: {shot}")
        assert shot.stat().st_size > 20_000
        load.close()
        assert not load.failed, load.failed
        sent = load.total()
        load = None

        # once idle, the page shows exactly the server's counters, and the rate falls back
        final = wait_idle(probe)
        assert final["num_requests"] >= before_requests + sent + failing + 20
        page.wait_for_function(
            "(n) => document.getElementById('stat-requests').textContent.replace(/,/g, '')"
            " === String(n)", arg=final["num_requests"])
        page.wait_for_function(
            "(n) => document.getElementById('stat-results').textContent.replace(/,/g, '')"
            " === String(n)", arg=final["num_results"])
        errors_total = sum(final["num_errors"].values())
        assert final["num_errors"].get("model_error", 0) >= failing
        page.wait_for_function(
            "(n) => document.getElementById('stat-errors').textContent.replace(/,/g, '')"
            " === String(n)", arg=errors_total)
        page.wait_for_function(
            "() => document.getElementById('stat-req-rate').textContent === '0'")
        assert shown(page, "stat-batches").replace(",", "") == str(final["num_batches"])
        assert shown(page, "stat-p99").endswith(("ms", " s"))

        after = dashboard_state(page)
        assert after["polls"] > during["polls"]
        assert after["latencyPoints"] >= 1 and after["maxP99"] > 0
        assert after["batchBars"] >= 1
        assert after["errorKinds"] == len(final["num_errors"]) >= 1
        assert sum(after["errorCounts"]) == errors_total
        assert after["cpuSeries"] == len(pids)
        assert page.is_hidden("#errors-empty")
        # the canvases really show it: the requests/s area and the error bars
        assert page.evaluate(COUNT_PIXELS_JS, ["#chart-throughput", list(BLUE)]) > 500
        assert page.evaluate(COUNT_PIXELS_JS, ["#chart-errors", list(RED)]) > 200
        changed = [name for name in CHARTS
                   if canvas_picture(page, name) != pictures_before[name]]
        # every chart but the errors' (an earlier test may have drawn its bar already:
        # bars are scaled to the largest) was redrawn with new data
        assert set(CHARTS) - {"errors"} <= set(changed), changed
        # the workers table moved too: batches done, as the server counts them
        rows = {w["pid"]: w for w in final["workers"]}
        for pid, worker in rows.items():
            row = page.locator(f'#workers-body tr[data-pid="{pid}"] td')
            page.wait_for_function(
                """([pid, n]) => {
                  const tds = document.querySelectorAll(`#workers-body tr[data-pid="${pid}"] td`);
                  return tds.length > 4 && tds[4].textContent.replace(/,/g, '') === String(n);
                }""", arg=[pid, worker["batches_done"]])
            assert row.nth(2).inner_text() == "cpu"
            assert row.nth(9).inner_text().endswith("MiB")
        assert not log.problems, log.problems
    finally:
        if load is not None:
            load.close()
        page.close()
        probe.close()


def test_page_says_when_the_server_is_gone(tmp_path: Path, browser: Browser) -> None:
    args = server_args(tmp_path, "-http_port", "0", "-protocol", "obj", "-num_worker", "1",
                       "-cpu", "-graceful_timeout", "2")
    page = browser.new_page()
    page.set_default_timeout(PAGE_LIMIT_MS)
    try:
        with running_server(args, ControlledWorker) as srv:
            page.goto(f"http://127.0.0.1:{srv.http_port}/dashboard")
            page.wait_for_function(
                "() => document.getElementById('status-pill').textContent === 'ready'")
            assert page.is_hidden("#banner")
        page.wait_for_function(
            "() => document.getElementById('status-pill').textContent === 'unreachable'")
        assert page.is_visible("#banner")
        assert "does not answer" in page.inner_text("#banner")
        # what was drawn stays on screen
        assert page.evaluate("window.wkrDashboard.charts.throughput.data[0].length") >= 1
    finally:
        page.close()


#: The page's recovery counts: element id -> (``/dashboard/data`` counter, status key).
RECOVERY = {"stat-retried": ("retried_items", "num_retried_items"),
            "stat-poisoned": ("poisoned", "num_poisoned"),
            "stat-quarantined": ("quarantined_inputs", "quarantined_inputs"),
            "stat-vent-restarts": ("ventilator_restarts", "ventilator_generation")}


def test_page_shows_what_the_server_recovered_from(tmp_path: Path, browser: Browser) -> None:
    """An input that kills its worker twice (retried alone after the first death, then
    quarantined): the data and the page show one retried item, one poisoned request and
    one quarantined input, as the server counts them."""
    args = server_args(tmp_path, "-http_port", "0", "-protocol", "obj", "-num_worker", "1",
                       "-cpu")
    page = browser.new_page()
    page.set_default_timeout(PAGE_LIMIT_MS)
    log = PageLog(page)
    try:
        with running_server(args, ControlledWorker) as srv, connect(srv) as client:
            page.goto(f"http://127.0.0.1:{srv.http_port}/dashboard")
            page.wait_for_function("window.wkrDashboard.polls >= 1")
            assert {i: shown(page, i) for i in RECOVERY} == {i: "0" for i in RECOVERY}
            assert "has-recovered" not in (page.get_attribute("#recovery", "class") or "")
            with pytest.raises(E.PoisonInput):
                client.encode({"cmd": "die"})
            truth = wait_until(lambda: (lambda s: s if s["ready"] else None)(
                client.server_status), HTTP_LIMIT_S, "the worker to be back")
            data = json.loads(get(f"http://127.0.0.1:{srv.http_port}/dashboard/data")[2])
            for counter, key in RECOVERY.values():
                assert data["counters"][counter] == truth[key]
            assert (truth["num_retried_items"], truth["num_poisoned"],
                    truth["quarantined_inputs"], truth["ventilator_generation"]) == (1, 1, 1, 0)
            page.wait_for_function(
                """(ids) => ids.every(([id, n]) => document.getElementById(id).textContent
                                                  === String(n))""",
                arg=[[i, truth[key]] for i, (_, key) in RECOVERY.items()])
            assert "has-recovered" in (page.get_attribute("#recovery", "class") or "")
            assert not log.problems, log.problems  # checked while the server still answers
    finally:
        page.close()


def test_gpu_columns_show_each_workers_gpu(base: str, browser: Browser) -> None:
    """The test machine has no GPU, so the page gets the server's real snapshot with the
    GPU part GPUtil would add on a GPU machine (worker 0 on gpu:0): the table shows
    that GPU's utilisation and memory, and hides the GPU columns again without one."""
    gpu = {"id": 0, "name": "NVIDIA H100 80GB HBM3", "load_percent": 63.0,
           "memory_used_mb": 20480.0, "memory_total_mb": 81559.0, "temperature_c": 51.0}
    with_gpu = threading.Event()
    with_gpu.set()

    def add_gpu(route: Route) -> None:
        response = route.fetch()
        body = response.json()
        if with_gpu.is_set():
            body["gpus"] = [gpu]
            body["workers"][0].update(device="gpu:0", gpu=gpu)
        route.fulfill(response=response, json=body)

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(PAGE_LIMIT_MS)
    log = PageLog(page)
    try:
        page.route("**/dashboard/data", add_gpu)
        page.goto(f"{base}/dashboard")
        page.wait_for_function("""() => {
          const tds = document.querySelectorAll('#workers-body tr[data-worker="0"] td');
          return tds.length > 11 && tds[2].textContent === 'gpu:0';
        }""")
        cells = page.locator('#workers-body tr[data-worker="0"] td')
        assert cells.nth(10).inner_text().strip() == "63%"
        assert cells.nth(11).inner_text() == "20.0 GiB / 79.6 GiB"
        assert page.locator("th.gpu-col").first.is_visible()
        assert "NVIDIA H100" in page.inner_text("#gpu-note")
        shot = artifact("dashboard_gpu.png")
        page.screenshot(path=str(shot), full_page=True)
        print(f"\ndashboard screenshot with a GPU: {shot}")
        with_gpu.clear()
        page.wait_for_function(
            "() => document.getElementById('workers').classList.contains('no-gpu')")
        assert page.locator("th.gpu-col").first.is_hidden()
        assert "no GPU" in page.inner_text("#gpu-note")
        assert not log.problems, log.problems
    finally:
        page.close()


def test_dashboard_with_a_token_takes_it_from_its_address(tmp_path, browser):
    """With -http_token the page and its files are served, /dashboard/data needs the
    token, and the page opened as /dashboard?token=... sends it and shows the workers."""
    import urllib.error
    import urllib.request

    from helpers import running_server, server_args
    from workers import EchoWorker

    args = server_args(tmp_path, "-http_port", "0", "-cpu", "-http_token", "t0ken")
    with running_server(args, EchoWorker) as server:
        url = f"http://127.0.0.1:{server.http_port}"
        for path in ("/dashboard", "/dashboard/static/dashboard.js"):
            with urllib.request.urlopen(url + path, timeout=20) as response:
                assert response.status == 200
        try:
            urllib.request.urlopen(url + "/dashboard/data", timeout=20)
            raise AssertionError("/dashboard/data answered without the token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        page = browser.new_page()
        try:
            page.goto(url + "/dashboard?token=t0ken", timeout=30_000)
            pid = str(server.supervisor.children["worker-0"].process.pid)
            page.wait_for_function(
                "pid => document.body.innerText.includes(pid)", arg=pid, timeout=30_000)
        finally:
            page.close()
