"""The documentation site: ``scripts/docs.sh`` builds it with warnings as errors.

One real build of the repository's ``docs/`` (Sphinx, furo, autodoc, sphinx-argparse)
into a temporary directory; the tests read the HTML it wrote. Two more runs of the
script on copies of the sources check that it fails, and says why, when an included
file is missing or a page makes Sphinx warn.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from wkr_serving.client import errors
from wkr_serving.server import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS_SH = ROOT / "scripts" / "docs.sh"
BUILD_TIMEOUT_S = 100  # under pytest-timeout's 120 s (pyproject.toml)
#: Set in the build's environment: the parsers read $WKR_AUTH_TOKEN for a default, and
#: the script must keep it out of the pages.
SECRET = "docs-test-secret-7f3a9c"

#: The console scripts of pyproject.toml, each with a section in the CLI reference.
COMMANDS = [
    "wkr-serving-start", "wkr-serving-make", "wkr-serving-terminate", "wkr-serving-keygen",
    "wkr-serving-evaluate", "wkr-serving-switch", "wkr-decentral-start",
    "wkr-decentral-make", "wkr-decentral-status", "wkr-decentral-switch",
    "wkr-decentral-idle", "wkr-decentral-restart", "wkr-decentral-terminate",
]
#: Files outside docs/ that pages of the site include.
INCLUDED = [
    "README.rst", "example/iris/README.rst", "example/keras/README.rst",
    "example/sentence_embedding/README.rst", "example/async_jobs/README.rst",
    "deploy/README.rst",
]


def run_docs_sh(root: Path, out: Path, extra_env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WKR_DOCS_OUT": str(out), **(extra_env or {})}
    return subprocess.run(["bash", str(root / "scripts" / "docs.sh")], cwd="/",
                          env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)


def text_of(page: Path) -> str:
    """The text of an HTML page: tags removed, entities decoded, spaces collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))
    return " ".join(text.split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    result = run_docs_sh(ROOT, out, {"WKR_AUTH_TOKEN": SECRET})
    assert result.returncode == 0, f"docs.sh failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    return out


def test_every_page_is_built(site: Path) -> None:
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    expected = {f"{name}.html" for name in (
        "index", "quickstart", "architecture", "protocol", "configuration", "http",
        "client", "lifecycle", "security", "pool", "production", "benchmarks",
        "performance", "examples", "deployment", "cli", "api/index", "api/client",
        "api/server", "api/pool", "api/errors", "examples/iris", "examples/keras",
        "examples/sentence_embedding", "examples/async_jobs")}
    assert expected <= pages, f"missing: {sorted(expected - pages)}"
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in sorted(expected - {"index.html"}):
        assert f'href="{page}"' in index, f"index.html does not link to {page}"


def test_cli_reference_is_generated_from_the_parsers(site: Path) -> None:
    page = site / "cli.html"
    source = page.read_text(encoding="utf-8")
    text = text_of(page)
    for command in COMMANDS:
        assert f'<section id="{command}">' in source, command
        assert f"usage: {command}" in text, command
    # Flags of wkr-serving-start, QueueWorker's own and the control commands'.
    for flag in ("-max_request_items", "-model_version", "-http_jobs_ttl", "-redis_url",
                 "-max_attempts", "-remote_servers", "-label_column", "-client_key"):
        assert flag in text, flag
    # Help text and defaults come from the parsers.
    assert "most items in one batch given to predict" in text
    assert "Default: 10000" in text


def test_api_reference_has_the_public_classes(site: Path) -> None:
    client = text_of(site / "api" / "client.html")
    for name in ("WKRClient.encode", "WKRClient.encode_batch", "WKRClient.fetch_all",
                 "ConcurrentWKRClient", "AsyncWKRClient.encode", "Response"):
        assert name in (site / "api" / "client.html").read_text(encoding="utf-8"), name
    assert "milliseconds a call waits for its reply" in client  # a :param: of WKRClient
    server = (site / "api" / "server.html").read_text(encoding="utf-8")
    for name in ("WKRHardWorker.predict", "WKRHardWorker.get_metadata", "WKRServer.wait_ready",
                 "ServerConfig", "StartupError", "load_config", "import_tf"):
        assert name in server, name
    pool = (site / "api" / "pool.html").read_text(encoding="utf-8")
    for name in ("WKRWorker.do_work", "WKRDecentralizeCentral", "QueueWorker",
                 "JobQueue.submit", "JobQueue.results", "RedisHandler.pop", "PoolConfig"):
        assert name in pool, name


def test_api_reference_has_every_error_class(site: Path) -> None:
    page = (site / "api" / "errors.html").read_text(encoding="utf-8")
    classes = [name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, errors.WKRError)
               and value.__module__ == errors.__name__]
    assert len(classes) >= 20
    for name in classes:
        assert f'id="wkr_serving.client.errors.{name}"' in page, name
    assert "model_error" in page and "422" in page  # codes and HTTP statuses shown


def test_option_table_is_generated_from_server_config(site: Path) -> None:
    text = text_of(site / "configuration.html")
    for f in dataclasses.fields(ServerConfig):
        assert f"-{f.name}" in text, f.name
        assert f"WKR_{f.name.upper()}" in text, f.name


def test_included_readmes_are_pages(site: Path) -> None:
    quick = text_of(site / "quickstart.html")
    assert "pip install . && wkr-serving-start example/noop_worker.Worker" in quick
    assert "-bind 127.0.0.1" in quick
    pages = {"example/iris/README.rst": "examples/iris",
             "example/keras/README.rst": "examples/keras",
             "example/sentence_embedding/README.rst": "examples/sentence_embedding",
             "example/async_jobs/README.rst": "examples/async_jobs",
             "deploy/README.rst": "deployment"}
    for readme, page in pages.items():
        lines = (ROOT / readme).read_text(encoding="utf-8").splitlines()
        # The README's title (the line above the first ===== underline) titles the page.
        title = next(lines[i - 1].strip() for i in range(1, len(lines))
                     if re.fullmatch(r"=+", lines[i].strip()) and lines[i - 1].strip())
        body = text_of(site / f"{page}.html")
        assert f"{title} - wkr-serving" in body, (readme, title)


def test_links_between_pages_resolve(site: Path) -> None:
    """Every relative link of every page names a file of the site, and its #anchor an
    id of that file: no link to a .rst source or to a file outside the site."""
    ids: dict[Path, set[str]] = {}

    def ids_of(page: Path) -> set[str]:
        if page not in ids:
            ids[page] = set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
        return ids[page]

    broken = []
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    for page in pages:
        if page.relative_to(site).parts[0] == "_modules":
            continue  # the highlighted sources (viewcode): links back into the API pages
        for href in re.findall(r'href="([^"]*)"', page.read_text(encoding="utf-8")):
            href = html.unescape(href)
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith("mailto:"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {href}")
            elif parts.fragment and target.suffix == ".html" and \
                    unquote(parts.fragment) not in ids_of(target):
                broken.append(f"{page.relative_to(site)}: {href} (no such anchor)")
    assert not broken, "\n".join(broken[:40])


def test_no_secret_from_the_environment_in_the_pages(site: Path) -> None:
    leaked = [p.name for p in site.rglob("*") if p.is_file() and p.suffix in (".html", ".js")
              and SECRET in p.read_text(encoding="utf-8", errors="replace")]
    assert not leaked, leaked


def _copy_sources(dest: Path) -> Path:
    """A copy of what the build reads: docs/, scripts/, README.rst, the included files."""
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=shutil.ignore_patterns("_build"))
    shutil.copytree(ROOT / "scripts", dest / "scripts")
    for rel in INCLUDED:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, dest / rel)
    return dest


def test_missing_included_file_fails_with_its_name(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path / "repo")
    (root / "example" / "keras" / "README.rst").unlink(missing_ok=True)
    result = run_docs_sh(root, tmp_path / "out")
    assert result.returncode != 0
    assert "example/keras/README.rst is missing" in result.stderr
    assert not (tmp_path / "out" / "index.html").exists()


def test_a_warning_fails_the_build(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path / "repo")
    with open(root / "docs" / "performance.rst", "a", encoding="utf-8") as page:
        page.write("\nSee :doc:`no-such-page` and `an unknown target`_.\n")
    result = run_docs_sh(root, tmp_path / "out")
    assert result.returncode != 0
    assert "no-such-page" in result.stderr and "WARNING" in result.stderr
    assert "an unknown target" in result.stderr
