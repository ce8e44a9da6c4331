"""wkr-serving client: call a WKR server from Python (blocking, threaded or asyncio)."""

from .aio import AsyncWKRClient
from .base import Response
from .client import ConcurrentWKRClient, WKRClient
from .errors import (
    BadInput,
    ClientUsageError,
    ConnectionLost,
    ConnectTimeout,
    DeadlineExceeded,
    ModelError,
    Overloaded,
    ProtocolError,
    ProtocolMismatch,
    ServerError,
    ShuttingDown,
    Unauthorized,
    UnknownCommand,
    VersionMismatch,
    WKRError,
    WKRTimeoutError,
    WorkerDied,
)
from .version import __version__

__all__ = [
    "AsyncWKRClient",
    "BadInput",
    "ClientUsageError",
    "ConcurrentWKRClient",
    "ConnectTimeout",
    "ConnectionLost",
    "DeadlineExceeded",
    "ModelError",
    "Overloaded",
    "ProtocolError",
    "ProtocolMismatch",
    "Response",
    "ServerError",
    "ShuttingDown",
    "Unauthorized",
    "UnknownCommand",
    "VersionMismatch",
    "WKRClient",
    "WKRError",
    "WKRTimeoutError",
    "WorkerDied",
    "__version__",
]
