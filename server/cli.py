"""``wkr-serving-start``: parse the options, print them, serve until SIGTERM/Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from wkr_serving.client.process import serve_until_signalled

from .config import ConfigError, ServerConfig, load_config
from .supervisor import Supervisor
from .worker import load_worker_class

__all__ = ["main"]


def format_config(config: ServerConfig, worker_class: str) -> str:
    rows = [("worker_class", worker_class), *sorted(config.as_dict(redact=True).items())]
    return "\n".join(f"{name:>22} = {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, spec = load_config(argv)
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
    print(format_config(config, spec), file=sys.stderr, flush=True)
    return serve_until_signalled(Supervisor(config, worker_class))


if __name__ == "__main__":
    sys.exit(main())
