"""Import a user's class from ``<file>.<Class>`` (the seed's way of naming it)."""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["import_class"]


def import_class(spec: str, base: type, directory: str | None = None) -> type:
    """Import ``<file>.<Class>`` from ``directory`` (default: the current one) and check
    that it subclasses ``base``.

    ``spec`` may start with a directory (``example/noop_worker.Worker``) or name an
    installed module (``wkr_serving.client.QueueWorker``).
    """
    path, _, dotted = spec.rpartition("/")
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"the class must be given as <file>.<Class>, got {spec!r}")
    directory = os.path.abspath(os.path.join(directory or os.getcwd(), path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{spec} is not a subclass of {base.__name__}")
    return cls
