"""The server's configuration: one frozen, validated object and the CLI generated from it.

Every option is a field of :class:`ServerConfig`; its flag is ``-<field name>`` (single
dash, as in the seed), with the seed's aliases where it had them. Values come, lowest
precedence first, from the field default, a YAML file (``-config``), ``WKR_<NAME>``
environment variables, and the command line. The YAML file may also be a Rekcurd
``settings.yml``: its keys are mapped through :data:`REKCURD_KEYS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wkr_serving.client.base import DEFAULT_PORT, DEFAULT_PORT_OUT
from wkr_serving.client.logs import LOG_FORMATS
from wkr_serving.client.protocol import PROTOCOL_NAMES, normalize_protocol
from wkr_serving.client.version import __version__

__all__ = ["ConfigError", "ServerConfig", "build_parser", "config_from_args", "load_config"]

ENV_PREFIX = "WKR_"
#: ``-cors`` given without a value: allow the origins of ``-cors_origins``.
CORS_ON = "on"
CORS_YES = ("on", "true", "yes", "1")
CORS_OFF = ("", "off", "false", "no", "0", "none")
#: Longest spin -busy_poll_us allows (one second).
MAX_BUSY_POLL_US = 1_000_000


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def _opt(default: Any, help: str, *aliases: str, kind: type = str, **extra: Any) -> Any:
    return field(default=default,
                 metadata={"help": help, "aliases": aliases, "kind": kind, **extra})


@dataclass(frozen=True)
class ServerConfig:
    """All server settings. Times are in the unit their name or help states."""

    model_dir: str = _opt(".", "directory of the model files; must exist (the server "
                          "itself writes nothing there)")
    model_name: str | None = _opt(None, "file name of the model inside model_dir")
    model_version: str | None = _opt(
        None, "version of the served model, shown in status, /metadata, /metrics and the "
        "prediction log (wkr-serving-switch sets a new one)")
    tmp_folder: str = _opt(
        "tmp_wkr", "the workers' scratch folder (their tmp_dir): a name is made inside a "
        "directory of this server under the system temp dir, removed when it stops; an "
        "absolute path is used as is (created if missing, never removed)")
    port: int = _opt(DEFAULT_PORT, "port receiving requests from clients (0: any free port)",
                     "-port_in", "-port_data", kind=int)
    port_out: int = _opt(DEFAULT_PORT_OUT, "port returning results to clients (0: any free port)",
                         "-port_result", kind=int)
    bind: str = _opt("0.0.0.0", "address the public ports bind to")
    protocol: str = _opt("obj", "wire protocol: 'obj' (any msgpack-able value) or 'numpy' "
                         "(ndarrays only; 'npy' is another name of it)", choices=PROTOCOL_NAMES)
    num_worker: int = _opt(1, "number of worker processes", kind=int)
    batch_size: int = _opt(10, "most items in one batch given to predict", kind=int)
    batch_group_timeout: int = _opt(
        5, "most extra time (ms), from the first queued item, to wait for a batch to fill",
        kind=int)
    device_map: tuple[int, ...] | None = _opt(
        None, "GPU ids assigned to workers round-robin, -1 for CPU (default: free GPUs, "
        "else CPU)", nargs="+", kind=int)
    cpu: bool = _opt(False, "run every worker on the CPU", kind=bool)
    num_threads: int = _opt(
        0, "BLAS/OpenMP threads per worker; 0: auto (one core left for the pipeline, the "
        "rest shared by the workers), -1: leave the libraries' defaults", kind=int)
    gpu_memory_fraction: float = _opt(0.2, "fraction of GPU memory a worker may use",
                                      kind=float)
    startup_timeout: float = _opt(600.0, "seconds to wait for every worker to load its model",
                                  kind=float)
    graceful_timeout: float = _opt(30.0, "seconds to drain in-flight work when stopping",
                                   kind=float)
    log_dir: str | None = _opt(None, "write <log_name>.log and <log_name>.err here "
                               "instead of stderr")
    log_name: str | None = _opt(None, "base name of the log files (default: WKRServer)")
    verbose: bool = _opt(False, "debug logging", kind=bool)
    log_format: str = _opt("text", "system log lines: 'text' (default) or 'json' (one JSON "
                           "object per line, for log collectors)", choices=LOG_FORMATS)
    log_predictions: bool = _opt(
        False, "write one JSON line per request (time, ids, latency, batch, worker, outcome, "
        "input and output) to <log_dir>/<log_name>.predictions.jsonl; needs -log_dir",
        kind=bool)
    max_queue_size: int = _opt(
        10_000, "most items waiting for a worker; beyond it requests get an immediate "
        "Overloaded error", kind=int)
    max_request_items: int = _opt(
        10_000, "most items in one request (ZeroMQ or HTTP), checked from its header before "
        "any item is decoded", kind=int)
    max_msg_size: int = _opt(
        256 * 1024 * 1024, "largest frame (bytes) accepted on the public ports, enforced by "
        "ZeroMQ: a peer sending a bigger one is disconnected (-1: no limit)", kind=int)
    worker_timeout: float = _opt(
        0.0, "seconds a batch may run in predict before its worker is killed and restarted "
        "and its requests get WorkerDied (0: no limit)", kind=float)
    busy_poll_us: int = _opt(
        0, "for latency-critical deployments with a core to spare: the sink spins up to "
        "this many microseconds looking for its next message before it blocks, so it is "
        "running when a result comes (0: never spin; an idle server spins only this long "
        "after its last message)", kind=int)
    max_requests: int = _opt(
        0, "recycle a worker after it answered about this many requests: a replacement "
        "loads the model, then the old worker finishes its batch and leaves, so no "
        "request fails (0: never; see -max_requests_jitter)", kind=int)
    max_requests_jitter: int = _opt(
        0, "add a random 0..N to each worker's -max_requests, so the workers are not all "
        "recycled at once", kind=int)
    max_worker_rss: int = _opt(
        0, "recycle a worker, as with -max_requests, once its resident memory is over "
        "this many MiB (checked between batches, at most once a second; 0: never)",
        kind=int)
    auth_token: str | None = _opt(
        None, "token required by commands that stop or change the server (terminate); "
        "without one, only clients on this host may send them", secret=True)
    allow_pickle: bool = _opt(
        False, "accept pickled items from clients and pickle results msgpack cannot "
        "encode. UNSAFE: unpickling runs code chosen by the sender; trusted clients only",
        kind=bool)
    curve_secret_key: str | None = _opt(
        None, "this server's CurveZMQ secret key file (from wkr-serving-keygen): encrypts "
        "both public ports; clients then need the server's public key")
    curve_client_keys: str | None = _opt(
        None, "directory of client public key files: with -curve_secret_key, only clients "
        "whose key is there may connect (default: any client that knows the server key)")
    http_port: int | None = _opt(None, "port of the HTTP bridge (0: any free port; default: "
                                 "no bridge)",
                                 kind=int)
    http_max_connect: int = _opt(
        256, "requests one HTTP bridge process has in flight to the server at once; more "
        "wait their turn (within their timeout)", kind=int)
    http_workers: int = _opt(1, "HTTP bridge processes (each event-driven, on the same "
                             "port, restarted alone if it dies)", kind=int)
    http_max_connections: int = _opt(
        4096, "open HTTP connections one bridge process holds; beyond it a new connection "
        "gets 503 and is closed", kind=int)
    http_max_body: int = _opt(
        64 * 1024 * 1024, "largest HTTP request body (bytes) on every route: a bigger one "
        "gets 413 as soon as its Content-Length, or the bytes read so far, exceed it",
        kind=int)
    http_read_timeout: float = _opt(
        10.0, "seconds an HTTP client has to send a request's headers, and at most between "
        "two parts of its body; then the connection is closed", kind=float)
    http_keepalive: float = _opt(
        5.0, "seconds an idle keep-alive HTTP connection is kept open", kind=float)
    cors: str | None = _opt(
        None, "serve CORS headers (off by default): -cors alone allows the origins of "
        "-cors_origins; -cors ORIGINS (the seed's form) allows those; an empty value, "
        "'off' or 'false' keeps CORS off", nargs="?", const=CORS_ON)
    cors_origins: str = _opt(
        "*", "comma-separated origins CORS allows when -cors is given (* : any)")
    http_token: str | None = _opt(
        None, "bearer token the HTTP bridge requires on every route but the health checks",
        secret=True)
    http_jobs_max: int = _opt(
        10_000, "most jobs (POST /jobs) the HTTP bridge keeps; when all are pending, new "
        "jobs get 429", kind=int)
    http_jobs_ttl: float = _opt(
        300.0, "seconds the HTTP bridge keeps a finished job's result for GET /jobs/<id>",
        kind=float)

    def __post_init__(self) -> None:
        for name, value in (("num_worker", self.num_worker), ("batch_size", self.batch_size),
                            ("http_max_connect", self.http_max_connect),
                            ("http_workers", self.http_workers),
                            ("http_max_connections", self.http_max_connections),
                            ("http_max_body", self.http_max_body),
                            ("max_request_items", self.max_request_items),
                            ("max_queue_size", self.max_queue_size)):
            if value < 1:
                raise ConfigError(f"-{name} must be at least 1, got {value}")
        try:  # the canonical name from here on ("npy" is "numpy")
            object.__setattr__(self, "protocol", normalize_protocol(self.protocol))
        except ValueError as exc:
            raise ConfigError(f"-{exc}") from None
        if self.num_threads < -1:
            raise ConfigError("-num_threads must be >= -1")
        if self.batch_group_timeout < 0:
            raise ConfigError("-batch_group_timeout must be >= 0 ms")
        for name, port in (("port", self.port), ("port_out", self.port_out),
                           ("http_port", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"-{name} must be a TCP port number, got {port}")
        if self.port and self.port == self.port_out:
            raise ConfigError("-port and -port_out must differ")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError("-gpu_memory_fraction must be in (0, 1]")
        if self.max_msg_size == 0 or self.max_msg_size < -1:
            raise ConfigError("-max_msg_size must be a positive number of bytes, or -1")
        if self.http_jobs_max < 1 or self.http_jobs_ttl <= 0:
            raise ConfigError("-http_jobs_max must be at least 1 and -http_jobs_ttl > 0 s")
        if self.http_read_timeout <= 0 or self.http_keepalive <= 0:
            raise ConfigError("-http_read_timeout and -http_keepalive must be > 0 seconds")
        if self.worker_timeout < 0:
            raise ConfigError("-worker_timeout must be >= 0 seconds (0: no limit)")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ConfigError(f"-busy_poll_us must be 0..{MAX_BUSY_POLL_US} microseconds "
                              "(0: never spin)")
        if min(self.max_requests, self.max_requests_jitter, self.max_worker_rss) < 0:
            raise ConfigError("-max_requests, -max_requests_jitter and -max_worker_rss "
                              "must be >= 0 (0: off)")
        if self.auth_token is not None and not self.auth_token:
            raise ConfigError("-auth_token must not be empty")
        if self.log_format not in LOG_FORMATS:  # a YAML or WKR_ value skips argparse's check
            raise ConfigError(f"-log_format must be one of {', '.join(LOG_FORMATS)}, "
                              f"got {self.log_format!r}")
        if self.log_predictions and not self.log_dir:
            raise ConfigError("-log_predictions needs -log_dir (the file it writes goes there)")
        if self.curve_client_keys and not self.curve_secret_key:
            raise ConfigError("-curve_client_keys needs -curve_secret_key")
        if self.startup_timeout <= 0 or self.graceful_timeout < 0:
            raise ConfigError("-startup_timeout must be > 0 and -graceful_timeout >= 0")
        self._check_tmp_folder()
        if self.device_map is not None:
            if not self.device_map or any(d < -1 for d in self.device_map):
                raise ConfigError("-device_map takes GPU ids >= 0, or -1 for CPU")
            object.__setattr__(self, "device_map", tuple(self.device_map))

    def _check_tmp_folder(self) -> None:
        """A relative -tmp_folder is made inside the server's own temporary directory,
        which is removed at stop: it must stay inside it."""
        if self.tmp_folder and os.path.isabs(self.tmp_folder):
            return
        normal = os.path.normpath(self.tmp_folder) if self.tmp_folder else ""
        if normal in ("", ".") or normal.split(os.sep)[0] == "..":
            raise ConfigError(f"-tmp_folder must be a folder name or an absolute path, "
                              f"got {self.tmp_folder!r}")

    def check_model_dir(self) -> None:
        """Raise :class:`ConfigError` (naming the flag and the path) unless -model_dir is a
        directory. Checked where a server starts, not in :meth:`__post_init__`: a config
        is also built where the model is not (wkr-serving-make on another machine, a run
        script's stop and status, tests)."""
        if os.path.isdir(self.model_dir):
            return
        path = self.model_dir
        shown = path if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"
        why = "not a directory" if os.path.exists(path) else "no such directory"
        raise ConfigError(f"-model_dir {shown}: {why}")

    def cors_allowed(self) -> list[str]:
        """The origins CORS allows ([]: CORS is off); ``*`` allows any."""
        value = (self.cors or "").strip()
        if value.lower() in CORS_OFF:
            return []
        given = self.cors_origins if value == CORS_ON or value.lower() in CORS_YES else value
        return [o.strip() for o in given.split(",") if o.strip()]

    def worker_threads(self, cpu_count: int | None = None) -> int | None:
        """BLAS/OpenMP threads each worker should use (None: leave library defaults)."""
        if self.num_threads == -1:
            return None
        if self.num_threads > 0:
            return self.num_threads
        cores = cpu_count or os.cpu_count() or 1
        return max(1, (cores - 1) // self.num_worker)

    @property
    def tmp_dir(self) -> str:
        """The workers' scratch folder. A server hands its workers a config whose
        -tmp_folder it made absolute (see :mod:`.scratch`); a relative one, in a config no
        server resolved, is named under the system temp dir (not created)."""
        if os.path.isabs(self.tmp_folder):
            return self.tmp_folder
        return os.path.join(tempfile.gettempdir(), self.tmp_folder)

    def as_dict(self, redact: bool = False) -> dict[str, Any]:
        """All settings; ``redact`` hides secrets (for status replies and logs)."""
        values = dataclasses.asdict(self)
        if redact:
            for name in SECRET_FIELDS:
                if values.get(name) is not None:
                    values[name] = "<redacted>"
        return values

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
#: Settings never shown in status replies or logs.
SECRET_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata.get("secret"))


def _coerce(name: str, raw: Any) -> Any:
    """Turn a YAML or environment value into the field's type."""
    f = _FIELDS[name]
    kind = f.metadata["kind"]
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        return None
    try:
        if f.metadata.get("nargs") == "+":
            items = raw.replace(",", " ").split() if isinstance(raw, str) else raw
            return tuple(int(x) for x in items)
        if kind is bool:
            if isinstance(raw, str):
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(raw)
                return raw.lower() in ("1", "true", "yes", "on")
            return bool(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind.__name__}") from None


#: Rekcurd's ``settings.yml`` keys (its drucker-era template) that mean something here, and
#: the setting each gives (docs/configuration.rst, "Rekcurd settings", has the table).
#: Rekcurd's model is ``{app.modeldir}/{app.name}/{app.modelfile}``: with ``app.modeldir``
#: and ``app.name`` both given, ``model_dir`` is ``{app.modeldir}/{app.name}``, so a
#: Rekcurd model tree serves unchanged.
REKCURD_KEYS = {
    "app.name": "log_name",
    "app.port": "port",
    "app.modeldir": "model_dir",
    "app.modelfile": "model_name",
    "test": "verbose",
}
#: Rekcurd keys accepted and ignored: how its dashboard names a deployment.
#: ``app.service.level`` must still be one of Rekcurd's levels.
REKCURD_IGNORED = ("app.service.name", "app.service.level")
REKCURD_SERVICE_LEVELS = ("development", "beta", "staging", "sandbox", "production")
#: Rekcurd keys (``db.`` is a prefix) that cannot mean anything here: an error names them.
REKCURD_UNMAPPABLE = ("use.db", "db.")
#: Rekcurd's environment variables, honoured when the ``-config`` file uses Rekcurd keys:
#: each replaces its key's value, as in Rekcurd (``WKR_*`` variables and flags still win).
#: ``DRUCKER_DB_*`` and the others are ignored.
REKCURD_ENV = {
    "DRUCKER_APPLICATION_NAME": "app.name",
    "DRUCKER_SERVICE_PORT": "app.port",
    "DRUCKER_SERVICE_NAME": "app.service.name",
    "DRUCKER_SERVICE_LEVEL": "app.service.level",
    "DRUCKER_SERVICE_MODEL_DIR": "app.modeldir",
    "DRUCKER_SERVICE_MODEL_FILE": "app.modelfile",
}
#: The top-level names of Rekcurd's dotted keys: ``app: {port: 5000}`` is ``app.port``.
_REKCURD_GROUPS = ("app", "db", "use")


def _is_rekcurd(key: str) -> bool:
    return (key in REKCURD_KEYS or key in REKCURD_IGNORED or key == "use.db"
            or key.startswith("db."))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"app": {"port": 1}}`` -> ``{"app.port": 1}`` (for Rekcurd's groups only)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and (prefix or name in _REKCURD_GROUPS):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _from_rekcurd(loaded: Mapping[str, Any], source: str,
                  environ: Mapping[str, str]) -> dict[str, Any]:
    """The file's values with Rekcurd's keys (:data:`REKCURD_KEYS`) turned into settings.
    A key that cannot be mapped, a bad service level, or a setting given both by its
    name and by its Rekcurd alias is a :class:`ConfigError`."""
    values = _flatten(loaded)
    if not any(_is_rekcurd(str(key)) for key in values):
        return values
    unmappable = sorted(k for k in values if k == "use.db" or k.startswith("db."))
    if unmappable:
        raise ConfigError(
            f"{source}: {', '.join(unmappable)}: Rekcurd's model database has no meaning "
            f"here (wkr-serving keeps no database: the model is app.modeldir/app.name/"
            f"app.modelfile, or -model_dir and -model_name, and wkr-serving-switch changes "
            f"it); remove {'these keys' if len(unmappable) > 1 else 'this key'}")
    origin = {key: f"{key} ({source})" for key in values}
    for var, key in REKCURD_ENV.items():
        if var in environ:
            values[key] = environ[var]
            origin[key] = f"{var} (environment)"
    level = values.get("app.service.level")
    if level is not None and level not in REKCURD_SERVICE_LEVELS:
        raise ConfigError(f"{origin['app.service.level']}: must be one of "
                          f"{', '.join(REKCURD_SERVICE_LEVELS)}, got {level!r}")
    if values.get("app.modeldir") is not None and values.get("app.name") is not None:
        values["app.modeldir"] = os.path.join(str(values["app.modeldir"]),
                                              str(values["app.name"]))
    for key, name in REKCURD_KEYS.items():
        if key not in values:
            continue
        if name in values:
            raise ConfigError(f"{source}: {name} and {origin[key]} both set {name} "
                              f"({key} is Rekcurd's name for it): keep one")
        values[name] = values.pop(key)
    for key in REKCURD_IGNORED:
        values.pop(key, None)
    return values


def _file_and_env_values(config_file: str | None, environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if config_file:
        import yaml

        try:
            with open(config_file, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping")
        loaded = _from_rekcurd(loaded, config_file, environ)
        unknown = sorted(set(loaded) - set(_FIELDS) - {"worker_class"})
        if unknown:
            raise ConfigError(f"unknown keys in {config_file}: {', '.join(unknown)}")
        values.update({k: _coerce(k, v) for k, v in loaded.items() if k in _FIELDS})
        if "worker_class" in loaded:
            values["worker_class"] = str(loaded["worker_class"])
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key])
    return values


def build_parser(with_worker_class: bool = True, defaults: Mapping[str, Any] | None = None,
                 ) -> argparse.ArgumentParser:
    """The ``wkr-serving-start`` parser, generated from :class:`ServerConfig`."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(
        prog="wkr-serving-start", description="Start a WKRServer serving a worker class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if with_worker_class:
        parser.add_argument("worker_class", nargs="?" if "worker_class" in defaults else None,
                            default=defaults.get("worker_class"),
                            help="<file>.<Class> of the worker, file in the current directory")
    parser.add_argument("-config", default=None, help="YAML file with any of these options")
    for name, f in _FIELDS.items():
        kind = f.metadata["kind"]
        flags = [f"-{name}", *f.metadata["aliases"]]
        default = defaults.get(name, f.default)
        if kind is bool:
            parser.add_argument(*flags, dest=name, action="store_true", default=default,
                                help=f.metadata["help"])
            continue
        kwargs: dict[str, Any] = {"dest": name, "type": kind, "default": default,
                                  "help": f.metadata["help"]}
        for key in ("choices", "nargs", "const"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("-version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                ) -> tuple[ServerConfig, str | None]:
    """Parse a command line into ``(config, worker_class)``, applying YAML and env values."""
    environ = os.environ if environ is None else environ
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-config", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = _file_and_env_values(known.config, environ)
    args = build_parser(defaults=defaults).parse_args(argv)
    return config_from_args(args), getattr(args, "worker_class", None)


def config_from_args(args: Any) -> ServerConfig:
    """Build a config from an argparse namespace, a mapping or a config (seed compatibility)."""
    if isinstance(args, ServerConfig):
        return args
    source = args if isinstance(args, Mapping) else vars(args)
    values = {k: v for k, v in source.items() if k in _FIELDS}
    if values.get("device_map") is not None:
        values["device_map"] = tuple(values["device_map"])
    return ServerConfig(**values)
