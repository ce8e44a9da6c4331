"""The route groups the HTTP bridge registers besides its core routes (``httpapp.py``).

Each group is a function ``register(app, backend)`` in its own module; adding one here
is all it takes to serve it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["all_blueprints"]


def all_blueprints() -> list[Callable[[Any, Any], None]]:
    from . import http_dashboard, http_jobs, http_metrics, http_v2

    return [http_dashboard.register, http_v2.register, http_metrics.register,
            http_jobs.register]
