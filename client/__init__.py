"""wkr-serving client: call a WKR server from Python (blocking, threaded or asyncio)."""

from .aio import AsyncWKRClient
from .base import Response
from .client import ConcurrentWKRClient, WKRClient
from .errors import (
    BadInput,
    ClientUsageError,
    ConnectionLost,
    ConnectTimeout,
    DeadLettered,
    DeadlineExceeded,
    JobCancelled,
    ModelError,
    Overloaded,
    PoisonInput,
    ProtocolError,
    ProtocolMismatch,
    ServerError,
    ShuttingDown,
    SwitchFailed,
    Unauthorized,
    UnknownCommand,
    VersionMismatch,
    WKRError,
    WKRTimeoutError,
    WorkerDied,
)
from .jobqueue import JobQueue
from .pool import WKRDecentralizeCentral
from .queueworker import QueueWorker
from .unit import WKRWorker
from .version import __version__

__all__ = [
    "AsyncWKRClient",
    "BadInput",
    "ClientUsageError",
    "ConcurrentWKRClient",
    "ConnectTimeout",
    "ConnectionLost",
    "DeadLettered",
    "DeadlineExceeded",
    "JobCancelled",
    "JobQueue",
    "ModelError",
    "Overloaded",
    "PoisonInput",
    "ProtocolError",
    "ProtocolMismatch",
    "QueueWorker",
    "Response",
    "ServerError",
    "ShuttingDown",
    "SwitchFailed",
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
