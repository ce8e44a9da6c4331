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
from .pool import WKRDecentralizeCentral
from .unit import WKRWorker
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
    "WKRDecentralizeCentral",
    "WKRError",
    "WKRTimeoutError",
    "WKRWorker",
    "WorkerDied",
    "__version__",
]
