"""A worker that logs, for the structured log tests (tests/test_json_logs.py).

It lives in an importable module, like tests/workers.py, because the server starts its
workers with multiprocessing *spawn*: the child re-imports this module by name.
"""

from __future__ import annotations

import logging
import warnings

from workers import ControlledWorker

#: The Python logger name of the "library" the model uses (a logger with no handler of
#: its own: its records reach the root logger).
LIBRARY_LOGGER = "some_library.loader"


class LoggingWorker(ControlledWorker):
    """:class:`~workers.ControlledWorker`, which logs as a model does: through
    ``new_logger()`` when the model loads, through a library's own logger and a Python
    warning; and the input ``{"cmd": "log_raise", "message": m}`` makes predict log the
    ``ValueError(m)`` it raises with its traceback (``logger.exception``), then raise it.
    """

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        self.new_logger().info("user model loaded")
        logging.getLogger(LIBRARY_LOGGER).warning("library warning while loading")
        warnings.warn("a deprecated option of the model", UserWarning, stacklevel=1)
        return super().get_model(envs, model_dir, model_name, tmp_dir)

    def predict(self, model, input):
        for item in input:
            if isinstance(item, dict) and item.get("cmd") == "log_raise":
                try:
                    raise ValueError(item["message"])
                except ValueError:
                    self.new_logger().exception("predict failed on %r", item["message"])
                    raise
        return super().predict(model, input)
