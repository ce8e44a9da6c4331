"""Logging setup of the server's processes (its home is :mod:`wkr_serving.client.logs`)."""

from wkr_serving.client.logs import (
    LOG_FORMATS,
    JsonFormatter,
    LogThrottle,
    log_base,
    route_other_logs,
    set_logger,
)

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogThrottle", "log_base", "route_other_logs",
           "set_logger"]
