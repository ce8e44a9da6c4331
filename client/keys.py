"""CurveZMQ keys: load the key files made by ``wkr-serving-keygen`` (``zmq.auth`` format).

A key pair is two files: ``NAME.key`` holds the public key and may be shared;
``NAME.key_secret`` holds both keys and must stay private. Keys may also be given
directly as their 40-character Z85 text.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth
from zmq.utils import z85

from .errors import ClientUsageError

__all__ = ["load_key_pair", "load_public_key"]

Z85_KEY_LENGTH = 40


def _as_z85(value: str | bytes) -> bytes | None:
    """``value`` as a Z85 key if it looks like one (40 characters, not a file name)."""
    raw = value.encode() if isinstance(value, str) else value
    if (len(raw) != Z85_KEY_LENGTH or os.path.exists(raw)
            or raw.endswith((b".key", b".key_secret"))):  # a key file's name, mistyped
        return None
    if not _is_z85_key(raw):
        raise ClientUsageError(f"{value!r} is neither a key file nor a 40-character Z85 key")
    return raw


def _is_z85_key(raw: bytes) -> bool:
    if len(raw) != Z85_KEY_LENGTH:
        return False
    try:
        z85.decode(raw)
    except (KeyError, ValueError, TypeError, IndexError):
        return False
    return True


def load_public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A public key from a key file (``.key`` or ``.key_secret``) or Z85 text."""
    _check_curve()
    if not isinstance(value, os.PathLike):
        key = _as_z85(value)
        if key is not None:
            return key
    public, _ = _load(os.fspath(value) if not isinstance(value, bytes) else value.decode())
    return public


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a ``.key_secret`` file."""
    public, secret = _load(os.fspath(path))
    if not secret:
        raise ClientUsageError(f"{path} holds no secret key: give the .key_secret file")
    return public, secret


def _check_curve() -> None:
    if not zmq.has("curve"):
        raise ClientUsageError("this libzmq was built without CURVE support")


def _load(path: str) -> tuple[bytes, bytes | None]:
    _check_curve()
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ClientUsageError(f"cannot read CurveZMQ key file {path}: {exc}") from None
    if not _is_z85_key(public) or (secret is not None and not _is_z85_key(secret)):
        raise ClientUsageError(f"{path} is not a CurveZMQ key file: its keys are not "
                               f"{Z85_KEY_LENGTH}-character Z85 text")
    return public, secret
