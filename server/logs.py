"""Logging setup of the server's processes (its home is :mod:`wkr_serving.client.logs`)."""

from wkr_serving.client.logs import LogThrottle, log_base, set_logger

__all__ = ["LogThrottle", "log_base", "set_logger"]
