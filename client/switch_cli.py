"""``wkr-serving-switch``: switch a running server to another model, with no request
lost (see :meth:`WKRClient.switch_model <wkr_serving.client.WKRClient.switch_model>`).

Exit status: 0 switched, 1 the switch failed (the new model did not load; the old one
keeps serving) or timed out, 2 usage error, refused or no server answering.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .cli_common import add_connection_args, connect_any
from .errors import (
    BadInput,
    ConnectTimeout,
    ServerError,
    SwitchFailed,
    Unauthorized,
    WKRError,
    WKRTimeoutError,
)

__all__ = ["build_parser", "main"]

PROG = "wkr-serving-switch"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Switch a running WKR server to another model with no request lost: "
        "one new worker at a time loads it while the others serve, then an old one "
        "retires. Returns when every worker serves the new model. Exit status: 0 "
        "switched, 1 failed (the old model keeps serving) or timed out, 2 usage error, "
        "refused or unreachable.")
    add_connection_args(parser)
    parser.add_argument("-model_dir", default=None,
                        help="directory of the new model (default: the current one); it "
                        "must exist on the server's host")
    parser.add_argument("-model_name", default=None,
                        help="file name of the new model in model_dir (default: the "
                        "current one)")
    parser.add_argument("-version", default=None,
                        help="version of the new model (default: the current one)")
    parser.add_argument("-timeout", type=float, default=600.0,
                        help="seconds to wait for the switch to end (it goes on on the "
                        "server if this runs out)")
    parser.add_argument("-token", default=os.environ.get("WKR_AUTH_TOKEN"),
                        help="the server's -auth_token (default: $WKR_AUTH_TOKEN); without "
                        "one, only a server on this host accepts the command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: {'error: ' if code == 2 else ''}{message}", file=sys.stderr)
        return code

    if args.timeout <= 0:
        return fail("-timeout must be > 0 seconds", 2)
    if args.model_dir is None and args.model_name is None and args.version is None:
        return fail("nothing to switch: give -model_dir, -model_name or -version", 2)
    where = f"{args.ip}:{args.port}/{args.port_out}"
    timeout_ms = int(args.timeout * 1000)
    try:
        client = connect_any(args, min(timeout_ms, 10_000), timeout_ms)
    except ConnectTimeout:
        return fail(f"no WKR server answered at {where}", 2)
    except (WKRError, ValueError, OSError) as exc:
        return fail(f"cannot connect to {where}: {str(exc).splitlines()[0]}", 2)
    try:
        before = client.metadata()
        print(f"switching the server at {where} from {before['model_name']} version "
              f"{before['model_version']} to {args.model_name or before['model_name']} "
              f"version {args.version or before['model_version']}", file=sys.stderr)
        result = client.switch_model(args.model_dir, args.model_name, args.version,
                                     token=args.token, timeout=timeout_ms)
    except (Unauthorized, BadInput) as exc:
        return fail(f"the server at {where} refused: {exc.message}", 2)
    except SwitchFailed as exc:
        return fail(f"switch failed: {exc.message}", 1)
    except WKRTimeoutError:
        return fail(f"the switch did not end within {args.timeout:g}s (it goes on on the "
                    "server: see its status)", 1)
    except ServerError as exc:
        return fail(f"{type(exc).__name__}: {exc.message}", 1)
    finally:
        client.close()
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
