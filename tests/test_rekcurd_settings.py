"""Rekcurd's ``settings.yml`` as a ``-config`` file (server/config.py ``REKCURD_KEYS``).

Units of :func:`load_config`: the seed's settings.yml maps to the settings it means
here (``app.modeldir``/``app.name`` is the model directory); its database keys are an
error naming them; ``DRUCKER_*`` variables replace their keys, ``WKR_*`` variables
override the file and flags override both; a setting given by its name and by its
Rekcurd alias, a bad service level and an unknown key are errors.

End to end: ``wkr-serving-start`` with a Rekcurd settings.yml serves on the file's
``app.port``, logs to ``<app.name>.log`` and loads from ``{app.modeldir}/{app.name}``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PORT_IN_USE,
    TESTS_DIR,
    CLIServer,
    PortInUse,
    start_command,
    start_on_free_ports,
)
from wkr_serving.server import ServerConfig
from wkr_serving.server.config import ConfigError, load_config

DEFAULTS = ServerConfig()

#: The seed's settings.yml (Rekcurd's README), comments shortened.
SEED_SETTINGS = """\
# Debug flag
test: True
# It can be overwritten with the environment variable "DRUCKER_APPLICATION_NAME".
app.name: drucker-sample
# It can be overwritten with the environment variable "DRUCKER_SERVICE_PORT".
app.port: 5000
app.service.name: dev-001
# This must be one of [development/beta/staging/sandbox/production].
app.service.level: development
# Put your model file under "{app.modeldir}/{app.name}/{app.modelfile}".
app.modeldir: ./model
app.modelfile: default.model
"""
SEED_DB = """\
use.db: sqlite
db.mysql.host: localhost
db.mysql.port: 3306
db.mysql.dbname: assignment
db.mysql.user: user
db.mysql.password: pass
"""


def load(tmp_path: Path, text: str, *argv: str, environ: dict[str, str] | None = None,
         ) -> ServerConfig:
    path = tmp_path / "settings.yml"
    path.write_text(text)
    config, spec = load_config(["w.W", "-config", str(path), *argv], environ=environ or {})
    assert spec == "w.W"
    return config


def test_seed_settings_map_to_the_settings_they_mean(tmp_path):
    config = load(tmp_path, SEED_SETTINGS)
    assert config.port == 5000
    assert config.model_dir == os.path.join("./model", "drucker-sample")
    assert config.model_name == "default.model"
    assert config.log_name == "drucker-sample"
    assert config.verbose is True
    mapped = {"port", "model_dir", "model_name", "log_name", "verbose"}
    assert {k: v for k, v in config.as_dict().items() if k not in mapped} == {
        k: v for k, v in DEFAULTS.as_dict().items() if k not in mapped}


def test_nested_rekcurd_keys_are_the_dotted_ones(tmp_path):
    nested = ("test: false\napp:\n  name: svc\n  port: 6100\n  modeldir: /srv/models\n"
              "  modelfile: m.bin\n  service:\n    name: prod-1\n    level: production\n")
    config = load(tmp_path, nested)
    assert (config.port, config.model_dir, config.model_name, config.log_name,
            config.verbose) == (6100, "/srv/models/svc", "m.bin", "svc", False)


def test_modeldir_without_a_name_is_the_model_dir(tmp_path):
    config = load(tmp_path, "app.modeldir: /srv/models\napp.port: 6200\n")
    assert config.model_dir == "/srv/models" and config.log_name is None


def test_rekcurd_keys_beside_native_ones(tmp_path):
    config = load(tmp_path, SEED_SETTINGS + "num_worker: 3\nport_out: 5001\n")
    assert config.num_worker == 3 and (config.port, config.port_out) == (5000, 5001)


def test_database_keys_are_an_error_naming_them(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, SEED_SETTINGS + SEED_DB)
    message = str(caught.value)
    assert "settings.yml: db.mysql.dbname, db.mysql.host, db.mysql.password, db.mysql.port, " \
           "db.mysql.user, use.db: Rekcurd's model database has no meaning here" in message
    assert "wkr-serving keeps no database" in message and "remove these keys" in message
    with pytest.raises(ConfigError, match=r"use\.db: .*no database.*remove this key"):
        load(tmp_path, SEED_SETTINGS + "use.db: sqlite\n")


def test_wkr_environment_overrides_the_file(tmp_path):
    env = {"WKR_PORT": "7100", "WKR_MODEL_DIR": "/elsewhere", "WKR_LOG_NAME": "svc",
           "WKR_NUM_WORKER": "2"}
    config = load(tmp_path, SEED_SETTINGS, environ=env)
    assert (config.port, config.model_dir, config.log_name, config.num_worker) == (
        7100, "/elsewhere", "svc", 2)
    assert config.model_name == "default.model"  # still the file's


def test_drucker_environment_replaces_its_keys_below_wkr(tmp_path):
    env = {"DRUCKER_SERVICE_PORT": "7200", "DRUCKER_APPLICATION_NAME": "other-app",
           "DRUCKER_SERVICE_MODEL_DIR": "/models", "DRUCKER_SERVICE_MODEL_FILE": "v2.model",
           "DRUCKER_SERVICE_LEVEL": "staging", "DRUCKER_DB_MODE": "mysql"}
    config = load(tmp_path, SEED_SETTINGS, environ=env)
    assert (config.port, config.log_name, config.model_dir, config.model_name) == (
        7200, "other-app", "/models/other-app", "v2.model")
    config = load(tmp_path, SEED_SETTINGS, environ={**env, "WKR_PORT": "7300"})
    assert config.port == 7300


def test_drucker_environment_is_ignored_without_rekcurd_keys(tmp_path):
    config = load(tmp_path, "num_worker: 2\n", environ={"DRUCKER_SERVICE_PORT": "7200"})
    assert config.port == DEFAULTS.port
    config, _ = load_config(["w.W"], environ={"DRUCKER_SERVICE_PORT": "7200"})
    assert config.port == DEFAULTS.port


def test_flags_override_file_and_environment(tmp_path):
    config = load(tmp_path, SEED_SETTINGS, "-port", "7400", "-model_dir", "/flag",
                  "-log_name", "flagged",
                  environ={"WKR_PORT": "7100", "DRUCKER_SERVICE_MODEL_DIR": "/models"})
    assert (config.port, config.model_dir, config.log_name) == (7400, "/flag", "flagged")
    assert config.model_name == "default.model" and config.verbose is True


@pytest.mark.parametrize(("extra", "environ", "message"), [
    ("port: 5001\n", {}, r"settings.yml: port and app.port \(.*settings.yml\) both set port"),
    ("model_dir: /m\n", {}, "model_dir and app.modeldir .* both set model_dir"),
    ("verbose: false\n", {}, "verbose and test .* both set verbose .test is Rekcurd's name"),
    ("log_name: x\n", {}, "log_name and app.name"),
])
def test_a_setting_and_its_rekcurd_alias_are_an_error(tmp_path, extra, environ, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, SEED_SETTINGS + extra, environ=environ)


def test_a_native_setting_and_a_drucker_variable_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model_name and DRUCKER_SERVICE_MODEL_FILE "
                                          r"\(environment\) both set model_name"):
        load(tmp_path, "app.port: 5000\nmodel_name: a\n",
             environ={"DRUCKER_SERVICE_MODEL_FILE": "b"})


@pytest.mark.parametrize(("text", "environ", "message"), [
    ("app.service.level: live\n", {},
     r"app.service.level \(.*settings.yml\): must be one of development, beta, staging, "
     r"sandbox, production, got 'live'"),
    ("app.port: 5000\n", {"DRUCKER_SERVICE_LEVEL": "qa"},
     r"DRUCKER_SERVICE_LEVEL \(environment\): must be one of"),
    ("app.name: a\napp.version: 3\n", {}, r"unknown keys in .*settings.yml: app.version"),
    ("app.port: many\n", {}, r"port: cannot read 'many' as int"),
    ("app.port: 5556\n", {}, r"-port and -port_out must differ"),
])
def test_bad_rekcurd_values_are_config_errors(tmp_path, text, environ, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text, environ=environ)


# -- end to end ----------------------------------------------------------------------------


class SettingsServer(CLIServer):
    """``wkr-serving-start`` with exactly ``args`` (no port flags added: the ports come
    from the settings file and the environment), in tests/; ``log_path`` is its log."""

    def __init__(self, args: list[str], tmp_path: Path, log_path: Path,
                 env: dict[str, str]) -> None:
        self._open_outputs(tmp_path, f"rekcurd-{len(list(tmp_path.glob('*.stderr.txt')))}",
                           args)
        self.log_path = log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("WKR_", "DRUCKER_"))}
        self.proc = subprocess.Popen([*start_command(), *args], cwd=TESTS_DIR,
                                     stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env={**clean, **env})


def test_server_started_with_rekcurd_settings_serves_on_app_port(tmp_path):
    model_dir = tmp_path / "model" / "drucker-sample"
    model_dir.mkdir(parents=True)
    log_dir = tmp_path / "logs"
    log_path = log_dir / "drucker-sample.log"

    def start(ports: list[int]) -> tuple[SettingsServer, list[int]]:
        settings = tmp_path / "settings.yml"
        settings.write_text(SEED_SETTINGS.replace("app.port: 5000", f"app.port: {ports[0]}")
                            .replace("./model", str(tmp_path / "model")))
        # the file gives the port, the environment port_out, flags the rest
        server = SettingsServer(["workers.EchoWorker", "-config", str(settings), "-bind",
                                 "127.0.0.1", "-cpu", "-log_dir", str(log_dir)], tmp_path,
                                log_path, {"WKR_PORT_OUT": str(ports[1]),
                                           "DRUCKER_SERVICE_NAME": "dev-002"})
        try:
            server.ports()
        except AssertionError:
            server.close()
            said = server.stderr() + (log_path.read_text() if log_path.exists() else "")
            if PORT_IN_USE.search(said):
                raise PortInUse(said[-2000:]) from None
            raise
        return server, ports

    server, ports = start_on_free_ports(2, start)
    try:
        assert (server.port, server.port_out) == (ports[0], ports[1])
        with server.client() as client:
            assert client.encode({"rekcurd": [1, 2]}) == {"rekcurd": [1, 2]}
            config: dict[str, Any] = client.server_status["config"]
        assert config["port"] == ports[0] and config["port_out"] == ports[1]
        assert config["model_dir"] == str(model_dir)
        assert config["model_name"] == "default.model"
        assert config["log_name"] == "drucker-sample" and config["verbose"] is True
        assert f"ready: port {ports[0]}, port_out {ports[1]}" in log_path.read_text()
    finally:
        server.close()
    assert server.proc.returncode == 0, server.stderr()[-4000:]
