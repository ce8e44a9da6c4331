"""CurveZMQ on the public ports, and ``wkr-serving-keygen`` to make key pairs.

The server's two public sockets (requests and results) become CURVE servers with the
key pair from ``-curve_secret_key``: traffic is encrypted, and a client must know the
server's public key to connect at all. With ``-curve_client_keys DIR`` the ZAP handler
(``zmq.auth``) also checks the client's own public key against the ``*.key`` files in
``DIR``, so only listed clients get in.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.auth
from wkr_serving.client.keys import load_key_pair
from zmq.auth.thread import ThreadAuthenticator

from .config import ServerConfig

__all__ = ["build_keygen_parser", "load_server_key", "main_keygen", "start_authenticator"]


def load_server_key(path: str) -> tuple[bytes, bytes]:
    return load_key_pair(path)


def start_authenticator(context: zmq.Context, config: ServerConfig,
                        logger: logging.Logger) -> Any:
    """Start the ZAP handler of this process's context (one thread; it answers each new
    connection's handshake, never individual messages)."""
    auth = ThreadAuthenticator(context, log=logger.getChild("zap"))
    auth.start()
    if config.curve_client_keys:
        if not os.path.isdir(config.curve_client_keys):
            auth.stop()
            raise FileNotFoundError(f"-curve_client_keys {config.curve_client_keys} is not a "
                                    "directory")
        auth.configure_curve(domain="*", location=config.curve_client_keys)
        listed = [n for n in os.listdir(config.curve_client_keys) if n.endswith(".key")]
        if not listed:
            logger.warning("-curve_client_keys %s holds no .key file: no client can connect",
                           config.curve_client_keys)
    else:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return auth


def build_keygen_parser() -> argparse.ArgumentParser:
    """The ``wkr-serving-keygen`` parser."""
    parser = argparse.ArgumentParser(
        prog="wkr-serving-keygen",
        description="Make a CurveZMQ key pair for a WKR server or client. NAME.key is the "
        "public key (give the server's to clients; put clients' in the server's "
        "-curve_client_keys directory); NAME.key_secret must stay private.")
    parser.add_argument("directory", help="where to write the two files (created if needed)")
    parser.add_argument("name", help="base name of the files, e.g. server or client-1")
    parser.add_argument("-force", action="store_true", help="overwrite existing files")
    return parser


def main_keygen(argv: Sequence[str] | None = None) -> int:
    """``wkr-serving-keygen DIR NAME``: write ``DIR/NAME.key`` and ``DIR/NAME.key_secret``."""
    args = build_keygen_parser().parse_args(argv)
    if not zmq.has("curve"):
        print("wkr-serving-keygen: error: this libzmq has no CURVE support", file=sys.stderr)
        return 2
    name = args.name
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        print(f"wkr-serving-keygen: error: NAME must be a plain file name, got {name!r}",
              file=sys.stderr)
        return 2
    public = os.path.join(args.directory, f"{name}.key")
    secret = public + "_secret"
    if not args.force and any(os.path.exists(p) for p in (public, secret)):
        print(f"wkr-serving-keygen: error: {public} or {secret} exists (use -force)",
              file=sys.stderr)
        return 2
    os.makedirs(args.directory, exist_ok=True)
    public_key, secret_key = zmq.curve_keypair()
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    # The secret file is private from its creation on (never briefly world-readable), and
    # each file appears complete, by rename, or not at all.
    _write_key_file(secret, _SECRET_BANNER.format(now), public_key, secret_key, 0o600)
    _write_key_file(public, _PUBLIC_BANNER.format(now), public_key, None, 0o644)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


# The zmq.auth certificate format, so zmq.auth.load_certificate(s) read these files.
_SECRET_BANNER = """#   ****  Generated on {} by wkr-serving-keygen  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {} by wkr-serving-keygen  ****
#   ZeroMQ CURVE Public Certificate
#   Give this file to the clients of this server (server key), or put it in the
#   server's -curve_client_keys directory (client key).

"""


def _write_key_file(path: str, banner: str, public_key: bytes, secret_key: bytes | None,
                    mode: int) -> None:
    lines = [banner, "metadata\n", "curve\n", f'    public-key = "{public_key.decode()}"\n']
    if secret_key is not None:
        lines.append(f'    secret-key = "{secret_key.decode()}"\n')
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(lines))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main_keygen())
