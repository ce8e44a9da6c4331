"""The dashboard's model card, end to end in Debian's headless Chromium (Playwright), like
tests/test_dashboard.py: the page shows the served model (name, version, epoch, each
worker's version) and the latest switch, and its form switches the model through
``POST /v2/repository/models/{name}/load``; a failed switch is shown and the old model
keeps serving; with ``-http_token`` the page asks for the token and uses it.
"""

from __future__ import annotations

from pathlib import Path

from helpers import http_call, running_server, server_args
from lifecycle_workers import CENTROIDS, LifecycleModelWorker, write_model
from playwright.sync_api import Browser, Page
from test_dashboard import PAGE_LIMIT_MS, PageLog, artifact

#: Seconds a switch may take in these tests (a new worker process loads the model).
SWITCH_LIMIT_MS = 120_000


def models(directory: Path) -> str:
    write_model(directory, "a.json")
    write_model(directory, "b.json", centroids=[CENTROIDS[2], CENTROIDS[0], CENTROIDS[1]])
    write_model(directory, "bad.json", fail="boom-dashboard-model")
    return str(directory)


def shown(page: Page, element_id: str) -> str:
    """The text of element ``element_id`` (as written, before CSS capitalises it)."""
    return (page.locator(f"#{element_id}").text_content() or "").strip()


def wait_text(page: Page, element_id: str, text: str, limit: int = PAGE_LIMIT_MS) -> None:
    """Wait until element ``element_id`` shows ``text`` (contains it)."""
    page.wait_for_function(
        "([id, text]) => { const el = document.getElementById(id);"
        " return el && el.textContent.includes(text); }", arg=[element_id, text],
        timeout=limit)


def worker_versions(page: Page) -> list[str]:
    return page.evaluate("""() => Array.from(
        document.querySelectorAll('#workers-body tr')).map(tr => tr.lastChild.textContent)""")


def unexpected(log: PageLog, *allowed: str) -> list[str]:
    """The page's problems, but for the error answers the test provoked."""
    return [p for p in log.problems if not any(a in p for a in allowed)]


def test_switch_from_the_dashboard(tmp_path: Path, browser: Browser) -> None:
    args = server_args(models(tmp_path), "-http_port", "0", "-cpu", "-num_worker", "2",
                       "-model_name", "a.json", "-model_version", "v1")
    with running_server(args, LifecycleModelWorker) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        log = PageLog(page)
        try:
            page.goto(f"http://127.0.0.1:{server.http_port}/dashboard", timeout=30_000)
            wait_text(page, "model-name", "a.json")
            assert shown(page, "model-version") == "v1" and shown(page, "model-epoch") == "0"
            assert shown(page, "switch-state") == "none"
            assert page.locator("#switch-token-label").is_hidden()  # no -http_token
            page.wait_for_function(
                "() => document.querySelectorAll('#workers-body tr').length === 2",
                timeout=PAGE_LIMIT_MS)
            assert worker_versions(page) == ["v1", "v1"]
            # the form starts with the current name: a new version needs only the version
            assert page.input_value("#switch-name") == "a.json"
            page.fill("#switch-name", "b.json")
            page.fill("#switch-version", "v2")
            page.click("#switch-submit")
            wait_text(page, "switch-message", "Now serving b.json v2", SWITCH_LIMIT_MS)
            wait_text(page, "model-version", "v2")
            wait_text(page, "switch-state", "done")
            assert shown(page, "model-name") == "b.json" and shown(page, "model-epoch") == "1"
            assert "to b.json v2" in shown(page, "switch-detail")
            wait_text(page, "model", "b.json v2")  # the header too
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('#workers-body tr'))"
                ".map(tr => tr.lastChild.textContent).join() === 'v2,v2'",
                timeout=PAGE_LIMIT_MS)
            status, _, meta = http_call(server, "/metadata")
            assert status == 200 and meta["model_name"] == "b.json"
            assert meta["model_version"] == "v2" and meta["tag"] == "b.json"

            # a model that fails to load: the page says why, the old model keeps serving
            page.fill("#switch-name", "bad.json")
            page.fill("#switch-version", "v3")
            page.click("#switch-submit")
            wait_text(page, "switch-message", "Switch failed", SWITCH_LIMIT_MS)
            assert "boom-dashboard-model" in shown(page, "switch-message")
            wait_text(page, "switch-state", "failed")
            assert "boom-dashboard-model" in shown(page, "switch-detail")
            assert shown(page, "model-name") == "b.json" and shown(page, "model-version") == "v2"
            status, _, reply = http_call(server, "/predict", {"data": [[5.1, 3.5, 1.4, 0.2]]})
            assert status == 200 and reply["tag"] == "b.json"
            path = artifact("dashboard-switch.png")
            page.screenshot(path=str(path), full_page=True)
            print(f"dashboard screenshot: {path}")
            assert unexpected(log, "HTTP 409", "status of 409") == []
        finally:
            page.close()


def test_dashboard_asks_for_the_token_and_switches_with_it(tmp_path: Path,
                                                           browser: Browser) -> None:
    args = server_args(models(tmp_path), "-http_port", "0", "-cpu", "-num_worker", "1",
                       "-model_name", "a.json", "-http_token", "t0ken")
    with running_server(args, LifecycleModelWorker) as server:
        page = browser.new_page()
        log = PageLog(page)
        try:
            page.goto(f"http://127.0.0.1:{server.http_port}/dashboard", timeout=30_000)
            # refused for want of the token: the field appears; typing it fixes the polls
            page.wait_for_selector("#switch-token-label", state="visible",
                                   timeout=PAGE_LIMIT_MS)
            page.fill("#switch-token", "t0ken")
            wait_text(page, "model-name", "a.json")
            page.fill("#switch-name", "b.json")
            page.click("#switch-submit")
            wait_text(page, "switch-message", "Now serving b.json", SWITCH_LIMIT_MS)
            wait_text(page, "model-name", "b.json")
            status, _, meta = http_call(server, "/metadata",
                                        headers={"Authorization": "Bearer t0ken"})
            assert status == 200 and meta["model_name"] == "b.json" and meta["epoch"] == 1
            assert unexpected(log, "HTTP 401", "status of 401") == []
        finally:
            page.close()
