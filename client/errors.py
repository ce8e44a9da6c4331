"""The exception hierarchy shared by client and server.

Errors raised inside the server cross process boundaries as data (a code, a message and
traceback text, see :func:`ServerError.to_wire`) and are rebuilt here as typed
exceptions, so a caller can ``except Overloaded`` instead of parsing strings.
"""

from __future__ import annotations

__all__ = [
    "BadInput",
    "ClientUsageError",
    "ConnectTimeout",
    "ConnectionLost",
    "DeadLettered",
    "DeadlineExceeded",
    "JobCancelled",
    "ModelError",
    "Overloaded",
    "PoisonInput",
    "ProtocolError",
    "ProtocolMismatch",
    "ServerError",
    "ShuttingDown",
    "SwitchFailed",
    "Unauthorized",
    "UnknownCommand",
    "VersionMismatch",
    "WKRError",
    "WKRTimeoutError",
    "WorkerDied",
    "error_from_wire",
]


class WKRError(Exception):
    """Base of every error this package raises on purpose.

    ``http_status`` is the status the HTTP bridge answers this error with. Each class
    states its own, so the status is decided where the error is defined rather than in
    a separate table: 4xx when the request itself is at fault, 5xx when the server
    could not serve it.
    """

    http_status: int = 500


class ClientUsageError(WKRError, ValueError):
    """The client was called in a way it cannot honour (bad argument, closed client)."""

    http_status = 400


class ProtocolError(WKRError, ValueError):
    """A message does not follow the wire protocol."""

    http_status = 400


class WKRTimeoutError(WKRError, TimeoutError):
    """No reply arrived before the call's deadline."""

    http_status = 504


class ConnectTimeout(WKRTimeoutError):
    """The server did not answer the connection handshake in time (down or unreachable)."""

    http_status = 504


class ProtocolMismatch(WKRError, AttributeError):
    """Client and server were configured with different ``protocol`` values."""

    http_status = 500


class VersionMismatch(WKRError, AttributeError):
    """Client and server versions differ and ``check_version`` was requested."""

    http_status = 500


class ServerError(WKRError):
    """An error reported by the server for one request.

    ``code`` names the cause, ``message`` is the server's message and ``traceback`` the
    server-side traceback text (empty when there is none).
    """

    code = "server_error"
    http_status = 500

    def __init__(self, message: str, traceback: str = "", request_id: int | None = None):
        super().__init__(message)
        self.message = message
        self.traceback = traceback
        self.request_id = request_id

    def __str__(self) -> str:
        if self.traceback:
            return f"{self.message}\n--- server traceback ---\n{self.traceback}"
        return self.message

    def to_wire(self) -> list[str]:
        return [self.code, self.message, self.traceback]


class ModelError(ServerError):
    """The model's ``predict`` (or its pre/post-processing) raised for this request."""

    code = "model_error"
    http_status = 500


class BadInput(ServerError):
    """The request could not be decoded or validated."""

    code = "bad_input"
    http_status = 400


class UnknownCommand(BadInput):
    """The request named a control command the server does not know."""

    code = "unknown_command"
    http_status = 400


class Unauthorized(ServerError):
    """A command that stops or changes the server came without the right token (or,
    when the server has no token, from another host)."""

    code = "unauthorized"
    http_status = 403


class ConnectionLost(ServerError):
    """The connection to the server dropped while this request was outstanding (the
    server stopped or crashed, or closed the connection because a frame was over its
    ``-max_msg_size``); its result, if any, is lost."""

    code = "connection_lost"
    http_status = 503


class DeadlineExceeded(ServerError):
    """The request's deadline passed before it could be computed."""

    code = "deadline_exceeded"
    http_status = 504


class Overloaded(ServerError):
    """The server's queue is full; retry later."""

    code = "overloaded"
    http_status = 429


class WorkerDied(ServerError):
    """The worker process holding this request died."""

    code = "worker_died"
    http_status = 500


class PoisonInput(ServerError):
    """An input of this request was in the batch of a worker that died, and died again
    when it was computed alone: it is quarantined (answered with this error at once and
    never given to a worker again while the server runs). The rest of the batch it
    came in was retried without it."""

    code = "poison_input"
    #: 422 Unprocessable Content: the request is valid, but the model cannot compute this
    #: input, and retrying it will not help (unlike a 500 or 503).
    http_status = 422


class ShuttingDown(ServerError):
    """The server is stopping and accepts no new work."""

    code = "shutting_down"
    http_status = 503


class SwitchFailed(ServerError):
    """A model switch stopped: the new model failed to load (the message says why), or
    another switch is under way. The model served before keeps serving."""

    code = "switch_failed"
    #: 409 Conflict: the server's state does not allow it; the request itself was valid.
    http_status = 409


class JobCancelled(ServerError):
    """The queued job was cancelled (:meth:`JobQueue.cancel`) before a result existed."""

    code = "cancelled"
    http_status = 500


class DeadLettered(ServerError):
    """The queued job was moved to its queue's dead-letter stream instead of being
    computed: it was malformed, too large, or delivered more than ``-max_attempts``
    times (it kept failing transiently or kept killing the units holding it). The
    message names the last error seen."""

    code = "dead_lettered"
    http_status = 500


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        ServerError,
        ModelError,
        BadInput,
        UnknownCommand,
        Unauthorized,
        ConnectionLost,
        DeadlineExceeded,
        Overloaded,
        WorkerDied,
        PoisonInput,
        ShuttingDown,
        SwitchFailed,
        JobCancelled,
        DeadLettered,
    )
}


def error_from_wire(info: object, request_id: int | None = None) -> ServerError:
    """Rebuild a typed exception from ``[code, message, traceback]``.

    Anything malformed becomes a plain :class:`ServerError` that still carries the text.
    """
    if isinstance(info, (list, tuple)) and len(info) == 3:
        code, message, tb = info
        cls = _BY_CODE.get(code, ServerError) if isinstance(code, str) else ServerError
        return cls(str(message), str(tb), request_id)
    return ServerError(f"malformed error reply: {info!r}", "", request_id)
