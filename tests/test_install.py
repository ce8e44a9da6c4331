"""The ways to install (issue 8), each in a fresh virtual environment with real pip.

- ``pip install ./client``: the client alone, with only pyzmq, numpy and msgpack.
- ``pip install -e .`` in ``server/``, then in ``client/``: the original Getting Started
  page's steps; the server works from any directory.
- ``pip install -e .`` at the root (what CI uses) is the environment of the whole suite;
  the checks here only compare its metadata with the server's.

The installs read a copy of ``client/`` and ``server/`` (the working tree as it is, less
build outputs), so that they never leave ``build/`` or ``*.egg-info`` in the repository.
pip may use its cache and PyPI; every command is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_DIR, reserved_ports

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the TOML reader that pip vendors
    from pip._vendor import tomli as tomllib

#: Seconds one pip or python command of these tests may take (a cold cache downloads).
COMMAND_LIMIT_S = 480
#: The client's own dependencies: all that ``pip install ./client`` may bring.
CLIENT_DEPENDENCIES = {"pyzmq", "numpy", "msgpack"}
#: Server-side dependencies that a client-only install must not bring.
SERVER_ONLY = {"flask", "uvicorn", "httptools", "uvloop", "a2wsgi", "orjson", "setproctitle",
               "gputil", "psutil", "prometheus-client",
               "termcolor", "pyyaml", "threadpoolctl", "redis"}

pytestmark = pytest.mark.timeout(900)


def _version() -> str:
    text = (Path(REPO_DIR) / "client" / "version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match, "client/version.py has no __version__"
    return match.group(1)


def _pyproject(*parts: str) -> dict:
    with open(os.path.join(REPO_DIR, *parts, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


class Venv:
    """A virtual environment under ``root``; commands run with it first on PATH, in
    ``cwd`` (never the repository), bounded by COMMAND_LIMIT_S."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "venv"
        self.bin = self.dir / "bin"
        self.python = str(self.bin / "python")
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER",
                            "PYTHONSTARTUP")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                   VIRTUAL_ENV=str(self.dir), PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_NO_INPUT="1")
        self.env = env
        self.elsewhere = root / "elsewhere"
        self.elsewhere.mkdir()
        # No pip inside (ensurepip takes seconds): this interpreter's pip installs into the
        # environment with ``--python``.
        self.run(sys.executable, "-m", "venv", "--without-pip", str(self.dir))
        self.baseline = self.packages()

    def run(self, *cmd: str, cwd: Path | str | None = None) -> str:
        proc = subprocess.run(cmd, cwd=str(cwd or self.elsewhere), env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_LIMIT_S)
        assert proc.returncode == 0, (f"{' '.join(cmd)} (in {cwd or self.elsewhere}) exited "
                                      f"{proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
        return proc.stdout

    def pip(self, *args: str, cwd: Path | str | None = None) -> str:
        return self.run(sys.executable, "-m", "pip", "--python", self.python, *args, cwd=cwd)

    def packages(self) -> dict[str, dict]:
        """``pip list``: normalised name -> its entry."""
        entries = json.loads(self.pip("list", "--format=json"))
        return {e["name"].lower().replace("_", "-"): e for e in entries}


def _copy_tree(dest: Path) -> Path:
    """``client/`` and ``server/`` of the working tree, side by side under ``dest``."""
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
    for name in ("client", "server"):
        shutil.copytree(os.path.join(REPO_DIR, name), dest / name, ignore=ignore)
    return dest


#: Run in an environment with only the client: import it and every module in it, and
#: report what got imported beyond the standard library.
CLIENT_IMPORTS = r"""
import importlib, json, pkgutil, sys
import wkr_serving.client
from wkr_serving.client import AsyncWKRClient, WKRClient
first = sorted(m for m in sys.modules if m.startswith(("wkr_serving.server", "flask", "uvicorn",
    "psutil", "GPUtil", "prometheus_client", "termcolor", "yaml", "redis")))
for info in pkgutil.iter_modules(wkr_serving.client.__path__, "wkr_serving.client."):
    importlib.import_module(info.name)
tops = {m.split(".")[0] for m in sys.modules}
foreign = sorted(t for t in tops - set(sys.stdlib_module_names)
                 if not t.startswith("_") and t != "cython_runtime")
print(json.dumps({"file": wkr_serving.client.__file__, "version": wkr_serving.client.__version__,
                  "first": first, "foreign": foreign,
                  "server": [m for m in sys.modules if m.startswith("wkr_serving.server")]}))
"""


def test_client_alone_needs_only_pyzmq_numpy_msgpack(tmp_path):
    """``pip install ./client`` (a regular install, from a root-like directory): pip brings
    only pyzmq, numpy and msgpack; the whole client package imports with them and never
    imports the server package."""
    src = _copy_tree(tmp_path / "src")
    venv = Venv(tmp_path)
    venv.pip("install", "./client", cwd=src)

    added = set(venv.packages()) - set(venv.baseline)
    assert added == {"wkr-serving-client", *CLIENT_DEPENDENCIES}, added
    assert not added & SERVER_ONLY

    report = json.loads(venv.run(venv.python, "-c", CLIENT_IMPORTS).strip().splitlines()[-1])
    assert report["file"].startswith(str(venv.dir)), report["file"]
    assert report["version"] == _version()
    assert report["first"] == [], f"import wkr_serving.client pulled {report['first']}"
    assert set(report["foreign"]) <= {"wkr_serving", "zmq", "numpy", "msgpack"}, report
    assert report["server"] == [], report["server"]
    # The pool's commands run with the client alone (here: a clean timeout, no pool).
    help_text = venv.run(str(venv.bin / "wkr-decentral-start"), "--help")
    assert "-remote_servers" in help_text
    with reserved_ports(1) as (port,):
        proc = subprocess.run([str(venv.bin / "wkr-decentral-status"), "-ip", "127.0.0.1",
                               "-port", str(port), "-timeout", "0.3"], env=venv.env,
                              capture_output=True, text=True, timeout=COMMAND_LIMIT_S,
                              stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "no answer from the pool" in proc.stderr, proc.stderr


def test_getting_started_page_install_server_then_client_editable(tmp_path):
    """The page's steps: ``pip install -e .`` in ``server/``, then in ``client/``; from a
    directory outside the source tree the console script and both packages work."""
    src = _copy_tree(tmp_path / "src")
    venv = Venv(tmp_path)
    venv.pip("install", "-e", ".", cwd=src / "server")
    venv.pip("install", "-e", ".", cwd=src / "client")

    packages = venv.packages()
    for name, folder in (("wkr-serving-server", "server"), ("wkr-serving-client", "client")):
        assert packages[name]["version"] == _version()
        assert packages[name].get("editable_project_location") == str(src / folder), \
            packages[name]
    venv.pip("check")

    out = venv.run(str(venv.bin / "wkr-serving-start"), "-version")
    assert _version() in out, out
    files = venv.run(venv.python, "-c", "import wkr_serving.server, wkr_serving.client; "
                     "print(wkr_serving.server.__file__); print(wkr_serving.client.__file__)")
    assert files.split() == [str(src / "server" / "__init__.py"),
                             str(src / "client" / "__init__.py")], files
    for script in ("wkr-serving-make", "wkr-serving-keygen", "wkr-serving-terminate"):
        assert (venv.bin / script).exists(), script


def test_client_import_in_this_environment_stays_client_side():
    """In the full environment too, ``import wkr_serving.client`` and its names never load
    the server package nor a server-only dependency."""
    code = ("import json, sys; import wkr_serving.client; "
            "from wkr_serving.client import AsyncWKRClient, WKRClient; "
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith("wkr_serving.server")], loaded
    tops = {m.split(".")[0] for m in loaded}
    assert not tops & {"flask", "flask_cors", "uvicorn", "a2wsgi", "orjson", "GPUtil", "psutil",
                       "prometheus_client", "termcolor", "yaml", "redis"}, tops


def test_three_distributions_share_version_scripts_and_dependencies():
    """Distinct names; one version source; the root and the server install the same
    dependencies and console scripts; the client depends on pyzmq, numpy, msgpack only."""
    root, server, client = _pyproject(), _pyproject("server"), _pyproject("client")
    names = [p["project"]["name"] for p in (root, server, client)]
    assert names == ["wkr-serving", "wkr-serving-server", "wkr-serving-client"]
    for p in (root, server, client):
        assert p["project"]["dynamic"] == ["version"]
        assert p["tool"]["setuptools"]["dynamic"]["version"] == {
            "attr": "wkr_serving.client.version.__version__"}
    assert root["project"]["dependencies"] == server["project"]["dependencies"]
    server_scripts = server["project"]["scripts"]
    client_scripts = client["project"]["scripts"]
    pool_control = {f"wkr-decentral-{c}" for c in ("start", "status", "switch", "idle",
                                                    "restart", "terminate")}
    # the pool, evaluating and switching run with the client alone
    assert set(client_scripts) == pool_control | {"wkr-serving-evaluate",
                                                  "wkr-serving-switch"}
    assert set(server_scripts) == {"wkr-serving-start", "wkr-serving-make",
                                   "wkr-serving-keygen", "wkr-serving-terminate",
                                   "wkr-decentral-make", *client_scripts}
    assert {k: server_scripts[k] for k in client_scripts} == client_scripts
    assert root["project"]["scripts"] == server_scripts
    deps = {re.split(r"[<>=!~ \[;]", d)[0].lower() for d in client["project"]["dependencies"]}
    assert deps == CLIENT_DEPENDENCIES
    assert client["project"]["optional-dependencies"]["pool"] == ["redis>=5.0",
                                                                  "prometheus-client>=0.20"]
    assert set(server["tool"]["setuptools"]["packages"]) == {
        "wkr_serving.server", "wkr_serving.server.http", "wkr_serving.client"}
    assert server["tool"]["setuptools"]["package-dir"]["wkr_serving.client"] == "../client"
