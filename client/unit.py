"""The processing unit of the decentralized pool: the class a user subclasses.

A unit is one process of the pool (``wkr-decentral-start``). It is built in the pool's
central process with plain data only; :meth:`WKRWorker.get_model` runs once inside the
unit's own process, then :meth:`WKRWorker.do_work` in a loop until the pool stops it,
then :meth:`WKRWorker.off_model` once. The lifecycle is that of the original package::

    class ProcessingModel(WKRWorker):
        def get_model(self, ip, port, port_out):     # once: connect to the server
            return WKRClient(ip=ip, port=port, port_out=port_out)
        def do_work(self, model, logger):            # in a loop: one unit of work
            ...
        def off_model(self, model):                  # once, at exit: release
            model.close()

A unit may take its own command-line options: a classmethod ``add_arguments(parser)``
adds ``-flags`` to ``wkr-decentral-start``'s parser, and their values arrive in
:attr:`WKRWorker.options` (an ``argparse.Namespace``).
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections import Counter
from typing import Any

from .base import DEFAULT_PORT, DEFAULT_PORT_OUT

__all__ = ["WKRWorker"]


class WKRWorker:
    """Base class of a pool's processing unit. Override the three lifecycle methods."""

    def __init__(self, index: int = 0,
                 server: tuple[str, int, int] = ("localhost", DEFAULT_PORT, DEFAULT_PORT_OUT),
                 options: argparse.Namespace | None = None) -> None:
        #: This unit's number in the pool (0-based, unique while the pool runs).
        self.index = index
        #: ``(ip, port, port_out)`` of the remote server this unit serves.
        self.server = server
        #: The unit's own command-line options (see ``add_arguments``).
        self.options = options if options is not None else argparse.Namespace()
        #: Set when the pool asks the unit to stop; ``do_work`` may check it to return
        #: early from a long wait. The loop stops calling ``do_work`` once it is set.
        self.stopping = threading.Event()
        #: Counters shown in the pool's status (per unit) and ``/metrics``.
        self.counters: Counter[str] = Counter()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this unit's own ``-flags`` to the pool's command line (none by default)."""

    def get_model(self, ip: str, port: int, port_out: int) -> Any:
        """Connect to the remote server (and anything else); return what ``do_work`` gets."""
        raise NotImplementedError("a WKRWorker subclass must override get_model")

    def do_work(self, model: Any, logger: logging.Logger) -> Any:
        """One iteration of work (called in a loop). An exception is logged with its
        traceback and counted; the loop goes on."""
        raise NotImplementedError("a WKRWorker subclass must override do_work")

    def off_model(self, model: Any) -> None:
        """Release what ``get_model`` made (called once when the unit stops)."""

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to this unit's counter ``name`` (shown in the pool's status)."""
        self.counters[name] += n
