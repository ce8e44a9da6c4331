"""``wkr-serving-start``: parse the options, print them, serve until SIGTERM/Ctrl-C."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from wkr_serving.client.process import serve_until_signalled

from .config import SECRET_FIELDS, ConfigError, ServerConfig, load_config
from .supervisor import Supervisor
from .worker import load_worker_class

__all__ = ["main"]


def format_config(config: ServerConfig, worker_class: str) -> str:
    rows = [("worker_class", worker_class), *sorted(config.as_dict(redact=True).items())]
    return "\n".join(f"{name:>22} = {value}" for name, value in rows)


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret option (``-http_token T``,
    ``-auth_token=T``...) replaced by ``<redacted>``."""
    flags = {f"-{name}" for name in SECRET_FIELDS}
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
        elif arg in flags:
            out.append(arg)
            hide_next = True
        elif arg.partition("=")[0] in flags:
            out.append(f"{arg.partition('=')[0]}=<redacted>")
        else:
            out.append(arg)
    return out


def hide_secrets_in_title(argv: Sequence[str]) -> None:
    """Show the command line without its secrets in ``ps`` and /proc (a token given on
    the command line would otherwise be readable by every user of the machine)."""
    shown = redacted_argv(argv)
    if list(shown) == list(argv):
        return
    import setproctitle

    setproctitle.setproctitle(" ".join(["wkr-serving-start", *shown]))


def main(argv: Sequence[str] | None = None) -> int:
    hide_secrets_in_title(sys.argv[1:] if argv is None else argv)
    try:
        config, spec = load_config(argv)
        config.check_model_dir()  # here, not in the config: wkr-serving-make builds one too
    except ConfigError as exc:
        print(f"wkr-serving-start: error: {exc}", file=sys.stderr)
        return 2
    if not spec:
        print("wkr-serving-start: error: the worker class (<file>.<Class>) is required",
              file=sys.stderr)
        return 2
    try:
        worker_class = load_worker_class(spec)
    except Exception as exc:
        print(f"wkr-serving-start: error: cannot load {spec}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    if config.log_format == "json":  # stderr carries only JSON lines then
        print(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"), "level": "INFO", "role": "SUPERVISOR", "pid": os.getpid(),
            "worker": None, "message": "settings", "worker_class": spec,
            "settings": config.as_dict(redact=True)}, default=str), file=sys.stderr,
            flush=True)
    else:
        print(format_config(config, spec), file=sys.stderr, flush=True)
    return serve_until_signalled(Supervisor(config, worker_class))


if __name__ == "__main__":
    sys.exit(main())
