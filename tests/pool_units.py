"""Pool units (WKRWorker subclasses) used by the pool tests; imported by name in the
units' spawned processes, so they live in a module of tests/."""

from __future__ import annotations

import os
import threading

import numpy as np
from wkr_serving.client import WKRClient, WKRWorker


class Echo(WKRWorker):
    """Sends one small array per iteration; ``-marker_dir`` gets a file per off_model."""

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("-marker_dir", default=None)
        parser.add_argument("-fail_every", type=int, default=0,
                            help="raise in every Nth do_work")

    def get_model(self, ip, port, port_out):
        self.calls = 0
        return WKRClient(ip=ip, port=port, port_out=port_out, protocol="numpy",
                         connect_timeout=1000, timeout=10_000)

    def do_work(self, model, logger):
        self.calls += 1
        if self.options.fail_every and self.calls % self.options.fail_every == 0:
            raise ValueError(f"planned failure {self.calls}")
        result = model.encode(np.full(4, self.calls, dtype=np.float32))
        assert float(result[0]) == float(self.calls)
        self.count("done")
        self.stopping.wait(0.005)  # a light load: the test runs several pools

    def off_model(self, model):
        model.close()
        if self.options.marker_dir:
            path = os.path.join(self.options.marker_dir, f"off-{self.index}-{os.getpid()}")
            with open(path, "w") as fh:
                fh.write(str(self.calls))


class Stubborn(WKRWorker):
    """A do_work that ignores the stop request (for the kill after -graceful_timeout)."""

    def get_model(self, ip, port, port_out):
        return None

    def do_work(self, model, logger):
        threading.Event().wait(300)


class NoModel(WKRWorker):
    """get_model always fails."""

    def get_model(self, ip, port, port_out):
        raise RuntimeError(f"cannot reach {ip}:{port}")

    def do_work(self, model, logger):
        raise AssertionError("never called")
