"""Who may call the bridge: the bearer token and the CORS policy, each decided here once.

**Token.** With ``-http_token`` every route needs ``Authorization: Bearer <token>`` (the
scheme in any case, as RFC 7235 says), except what is open:

- the health checks (``/health``, ``/health/...``, ``/v2/health/...``): orchestrators
  probe them without secrets, and they tell nothing but up / ready;
- the dashboard's page and static files: no data, the page asks for the token and its
  data route needs it;
- CORS preflight requests (``OPTIONS`` with ``Access-Control-Request-Method``): browsers
  never send credentials with them, so a preflight that needed the token could never
  succeed; it only says which origins, methods and headers are allowed.

**CORS** is off unless ``-cors`` is given: no ``Access-Control-Allow-Origin`` on any
answer, so a web page on another origin cannot read anything from the bridge (with no
token set, any page could otherwise drive ``/encode`` and read status from a browser on
the same network). With ``-cors``, the origins of ``-cors_origins`` (``*``: any) get the
headers on every answer and on preflights.
"""

from __future__ import annotations

import hmac

__all__ = ["OPEN_EXACT", "OPEN_PREFIXES", "CORSPolicy", "bearer_ok", "is_open"]

#: Paths served without the token (see the module docstring).
OPEN_PREFIXES = ("/health/", "/v2/health/", "/dashboard/static/")
OPEN_EXACT = frozenset(("/health", "/dashboard", "/dashboard/"))

#: What a preflight allows: the bridge's methods and the headers its clients send.
ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = (b"Authorization, Content-Type, Content-Encoding, X-Request-ID, "
                 b"Inference-Header-Content-Length")
EXPOSE_HEADERS = b"X-Request-ID, Inference-Header-Content-Length"
#: Seconds a browser may cache a preflight answer.
MAX_AGE = b"600"


def is_open(path: str) -> bool:
    """Whether ``path`` is served without the token."""
    return path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)


def bearer_ok(authorization: bytes | str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (always, without one).

    The scheme is matched case-insensitively; the token in constant time."""
    if token is None:
        return True
    if not authorization:
        return False
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    scheme, _, given = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


class CORSPolicy:
    """The CORS headers of every answer, from ``-cors`` / ``-cors_origins``."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.encode("latin-1", "replace") for o in origins if o != "*")
        self.enabled = bool(origins)

    def allowed(self, origin: bytes | None) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin`` (None: none)."""
        if not self.enabled or not origin:
            return None
        if self.any:
            return b"*"
        return origin if origin in self.origins else None

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers to add to an answer to a request from ``origin``."""
        allow = self.allowed(origin)
        if allow is None:
            return []
        out = [(b"access-control-allow-origin", allow),
               (b"access-control-expose-headers", EXPOSE_HEADERS)]
        if allow != b"*":
            out.append((b"vary", b"Origin"))
        return out

    def preflight(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers of the answer to a preflight from ``origin`` ([]: not allowed)."""
        out = self.headers(origin)
        if out:
            out += [(b"access-control-allow-methods", ALLOW_METHODS),
                    (b"access-control-allow-headers", ALLOW_HEADERS),
                    (b"access-control-max-age", MAX_AGE)]
        return out
