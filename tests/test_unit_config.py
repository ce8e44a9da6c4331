"""Unit tests of configuration (server/config.py): flags, aliases, env, YAML, validation."""

from __future__ import annotations

import dataclasses

import pytest
from wkr_serving.server import ServerConfig
from wkr_serving.server.config import ConfigError, config_from_args, load_config
from wkr_serving.server.helper import get_args_parser

DEFAULTS = ServerConfig()


def test_seed_command_line_with_single_dash_flags():
    argv = ["server.Worker", "-model_dir", "/models", "-model_name", "m.bin", "-port_in",
            "8996", "-port_out", "8998", "-http_port", "8900", "-num_worker", "2",
            "-batch_size", "8", "-device_map", "-1", "-gpu_memory_fraction", "0.25",
            "-log_dir", "/tmp/log_dir", "-protocol", "numpy", "-cpu", "-batch_group_timeout",
            "7", "-cors", "http://x", "-verbose"]
    config, spec = load_config(argv, environ={})
    assert spec == "server.Worker"
    assert config.model_dir == "/models" and config.model_name == "m.bin"
    assert config.port == 8996 and config.port_out == 8998 and config.http_port == 8900
    assert config.num_worker == 2 and config.batch_size == 8
    assert config.device_map == (-1,)
    assert config.gpu_memory_fraction == 0.25 and config.log_dir == "/tmp/log_dir"
    assert config.protocol == "numpy" and config.cpu is True and config.verbose is True
    assert config.batch_group_timeout == 7 and config.cors == "http://x"


@pytest.mark.parametrize("flag", ["-port", "-port_in", "-port_data"])
def test_port_aliases(flag):
    config, _ = load_config(["w.W", flag, "7001"], environ={})
    assert config.port == 7001


def test_port_out_alias():
    config, _ = load_config(["w.W", "-port_result", "7002"], environ={})
    assert config.port_out == 7002


def test_defaults_when_nothing_is_given():
    config, spec = load_config(["w.W"], environ={})
    assert spec == "w.W"
    assert config == DEFAULTS


def test_device_map_takes_several_ids():
    config, _ = load_config(["w.W", "-device_map", "0", "1", "0"], environ={})
    assert config.device_map == (0, 1, 0)


def test_get_args_parser_has_no_positional_and_builds_a_config():
    args = get_args_parser().parse_args(["-port", "0", "-port_out", "0", "-num_worker", "3"])
    config = config_from_args(args)
    assert isinstance(config, ServerConfig)
    assert (config.port, config.port_out, config.num_worker) == (0, 0, 3)
    assert config_from_args(config) is config
    assert config_from_args({"batch_size": 3, "unrelated": 1}).batch_size == 3


def test_env_var_overrides_default():
    config, _ = load_config(["w.W"], environ={"WKR_BATCH_SIZE": "33"})
    assert config.batch_size == 33


def test_env_vars_of_several_types():
    env = {"WKR_CPU": "true", "WKR_GPU_MEMORY_FRACTION": "0.5", "WKR_DEVICE_MAP": "0,1",
           "WKR_PROTOCOL": "numpy", "WKR_LOG_DIR": "none"}
    config, _ = load_config(["w.W"], environ=env)
    assert config.cpu is True and config.gpu_memory_fraction == 0.5
    assert config.device_map == (0, 1) and config.protocol == "numpy"
    assert config.log_dir is None


@pytest.mark.parametrize("env", [{"WKR_BATCH_SIZE": "many"}, {"WKR_CPU": "maybe"},
                                 {"WKR_BATCH_SIZE": "0"}, {"WKR_PROTOCOL": "pickle"}])
def test_bad_env_values_are_config_errors(env):
    with pytest.raises((ConfigError, SystemExit)):
        load_config(["w.W"], environ=env)


def test_cli_beats_env():
    config, _ = load_config(["w.W", "-batch_size", "5"], environ={"WKR_BATCH_SIZE": "33"})
    assert config.batch_size == 5


def test_yaml_config_file(tmp_path):
    path = tmp_path / "wkr.yaml"
    path.write_text("worker_class: mymod.MyWorker\nbatch_size: 12\nnum_worker: 3\n"
                    "device_map: [0, 1]\nprotocol: numpy\ncpu: true\n")
    config, spec = load_config(["-config", str(path)], environ={})
    assert spec == "mymod.MyWorker"
    assert config.batch_size == 12 and config.num_worker == 3
    assert config.device_map == (0, 1) and config.protocol == "numpy" and config.cpu is True


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    path = tmp_path / "wkr.yaml"
    path.write_text("batch_size: 12\nnum_worker: 3\nbatch_group_timeout: 40\n")
    env = {"WKR_BATCH_SIZE": "20", "WKR_NUM_WORKER": "4"}
    config, _ = load_config(["w.W", "-config", str(path), "-batch_size", "30"], environ=env)
    assert config.batch_size == 30  # CLI
    assert config.num_worker == 4  # env over YAML
    assert config.batch_group_timeout == 40  # YAML over default
    assert config.port == DEFAULTS.port  # default


def test_positional_worker_class_beats_yaml(tmp_path):
    path = tmp_path / "wkr.yaml"
    path.write_text("worker_class: a.A\n")
    _, spec = load_config(["b.B", "-config", str(path)], environ={})
    assert spec == "b.B"


@pytest.mark.parametrize("text", ["batch_sise: 3\n", "- just\n- a list\n", "port: eighty\n"])
def test_bad_yaml_is_a_config_error(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(["w.W", "-config", str(path)], environ={})


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["w.W", "-config", str(tmp_path / "missing.yaml")], environ={})


@pytest.mark.parametrize("changes,needle", [
    ({"num_worker": 0}, "num_worker"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -3}, "batch_size"),
    ({"protocol": "pickle"}, "protocol"),
    ({"batch_group_timeout": -1}, "batch_group_timeout"),
    ({"port": 70000}, "port"),
    ({"port_out": -1}, "port_out"),
    ({"port": 6000, "port_out": 6000}, "differ"),
    ({"gpu_memory_fraction": 0.0}, "gpu_memory_fraction"),
    ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
    ({"device_map": (-2,)}, "device_map"),
    ({"device_map": ()}, "device_map"),
    ({"startup_timeout": 0}, "startup_timeout"),
    ({"http_max_connect": 0}, "http_max_connect"),
])
def test_validation_errors(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**changes)


def test_port_zero_twice_is_allowed():
    config = ServerConfig(port=0, port_out=0)
    assert config.port == config.port_out == 0


def test_bad_flag_value_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["w.W", "-batch_size", "lots"], environ={})
    assert info.value.code == 2
    assert "batch_size" in capsys.readouterr().err


def test_config_is_frozen_and_replace_validates():
    config = ServerConfig(batch_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 5  # type: ignore[misc]
    assert config.replace(batch_size=9).batch_size == 9
    with pytest.raises(ConfigError):
        config.replace(batch_size=0)
    assert config.as_dict()["batch_size"] == 4
    assert config.tmp_dir.endswith(config.tmp_folder)


# -- limits and security settings (queue, message size, worker timeout, token, CURVE) ------


def test_limit_and_security_defaults():
    config = ServerConfig()
    assert config.max_queue_size == 10_000
    assert config.max_msg_size == 256 * 1024 * 1024
    assert config.worker_timeout == 0.0
    assert config.auth_token is None and config.allow_pickle is False
    assert config.curve_secret_key is None and config.curve_client_keys is None


@pytest.mark.parametrize("changes, message", [
    ({"max_queue_size": 0}, "max_queue_size"),
    ({"max_msg_size": 0}, "max_msg_size"),
    ({"max_msg_size": -2}, "max_msg_size"),
    ({"worker_timeout": -1.0}, "worker_timeout"),
    ({"auth_token": ""}, "auth_token"),
    ({"curve_client_keys": "/keys"}, "curve_secret_key"),
])
def test_limit_and_security_settings_are_validated(changes, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**changes)


def test_auth_token_from_environment_and_redacted():
    config, _ = load_config(["w.W", "-max_msg_size", "-1", "-worker_timeout", "2.5"],
                            environ={"WKR_AUTH_TOKEN": "s3cret"})
    assert config.auth_token == "s3cret"
    assert config.max_msg_size == -1 and config.worker_timeout == 2.5
    shown = config.as_dict(redact=True)
    assert shown["auth_token"] == "<redacted>"
    assert "s3cret" not in repr(shown)
    assert config.as_dict()["auth_token"] == "s3cret"
    assert ServerConfig().as_dict(redact=True)["auth_token"] is None
