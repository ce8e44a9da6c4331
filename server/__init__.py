"""wkr-serving server: turn a ``WKRHardWorker`` subclass into a batching network service."""

from wkr_serving.client.version import __version__

from .config import ServerConfig
from .service import WKRServer
from .supervisor import StartupError
from .worker import WKRHardWorker

__all__ = ["ServerConfig", "StartupError", "WKRHardWorker", "WKRServer", "__version__"]
