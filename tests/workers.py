"""Worker classes used by the process tests.

They live in an importable module (not in a test file) because the server starts its
roles with multiprocessing *spawn*: the child re-imports this module by name.

Slowness is never simulated with sleeps: a worker that must be slow waits, with a
deadline, until a file named in its input exists (the test creates it to release it).
"""

from __future__ import annotations

import os
import threading
import time

from wkr_serving.server import WKRHardWorker

#: Longest a blocked predict waits for its release file (a test that forgets to release
#: it must not hang the server forever).
BLOCK_LIMIT_S = 60.0


def wait_for_file(path: str, limit: float = BLOCK_LIMIT_S) -> bool:
    """Wait until ``path`` exists, at most ``limit`` seconds; return whether it does."""
    deadline = time.monotonic() + limit
    pause = threading.Event()
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.005)
    return True


def touch(path: str) -> None:
    with open(path, "w", encoding="utf-8"):
        pass


class EchoWorker(WKRHardWorker):
    """Returns every input unchanged."""

    def predict(self, model, input):
        return input


class NonFiniteWorker(EchoWorker):
    """Echo, except the input ``"nonfinite"`` -> ``{"list": [nan, inf, -inf], "array":
    float32 array of the same}``: a model output that JSON cannot carry as numbers."""

    def predict(self, model, input):
        import numpy as np

        values = [float("nan"), float("inf"), float("-inf")]
        return [{"list": values, "array": np.array(values, dtype=np.float32)}
                if isinstance(x, str) and x == "nonfinite" else x for x in input]


class ControlledWorker(WKRHardWorker):
    """Echo, except for dict inputs carrying a ``"cmd"`` key (obj protocol):

    - ``{"cmd": "pid", "value": v}`` -> ``{"pid": <worker pid>, "value": v}``
    - ``{"cmd": "block", "started": p1, "release": p2, "value": v}`` -> creates ``p1``,
      waits until ``p2`` exists, then ``{"pid": ..., "value": v, "released": bool}``
    - ``{"cmd": "raise", "message": m}`` -> the whole predict raises ``RuntimeError(m)``
    - ``{"cmd": "stat", "values": {...}}`` -> ``record_statistic(values)``, echoes values
    - ``{"cmd": "wrong_count"}`` -> predict returns one result too many
    - ``{"cmd": "die"}`` -> the worker process exits at once (a crash, as by kill -9)
    """

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        return {"pid": os.getpid()}

    def predict(self, model, input):
        out = []
        extra = False
        for item in input:
            cmd = item.get("cmd") if isinstance(item, dict) else None
            if cmd is None:
                out.append(item)
            elif cmd == "pid":
                out.append({"pid": model["pid"], "value": item.get("value")})
            elif cmd == "block":
                touch(item["started"])
                released = wait_for_file(item["release"])
                out.append({"pid": model["pid"], "value": item.get("value"),
                            "released": released})
            elif cmd == "raise":
                raise RuntimeError(item["message"])
            elif cmd == "stat":
                self.record_statistic(item["values"])
                out.append(item["values"])
            elif cmd == "die":
                os._exit(13)
            elif cmd == "wrong_count":
                extra = True
                out.append(None)
            else:
                out.append(item)
        if extra:
            out.append("one result too many")
        return out


class FailingLoadWorker(WKRHardWorker):
    """A model that cannot be loaded."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        raise ValueError("boom-load")


class ThreadsWorker(WKRHardWorker):
    """Returns how many threads the BLAS library numpy loaded is allowed to use."""

    def predict(self, model, input):
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        return [max(blas) if blas else -1 for _ in input]


class Opaque:
    """A value msgpack cannot encode (pickle tests). Defined here so the worker processes,
    which import this module, can unpickle it."""

    def __init__(self, payload):
        self.payload = payload

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.payload == self.payload

    __hash__ = None


class FractionWorker(WKRHardWorker):
    """Echo, except ``{"fraction": [n, d]}`` -> ``fractions.Fraction(n, d)``: a result that
    only pickle can carry back (for the ``-allow_pickle`` tests)."""

    def predict(self, model, input):
        from fractions import Fraction

        return [Fraction(*x["fraction"]) if isinstance(x, dict) and "fraction" in x else x
                for x in input]


class CrashWorker(ControlledWorker):
    """ControlledWorker plus ``{"cmd": "segv"}``: the worker process is killed by SIGSEGV,
    as by a segfault in native code (supervision tests)."""

    def predict(self, model, input):
        for item in input:
            if isinstance(item, dict) and item.get("cmd") == "segv":
                import signal

                os.kill(os.getpid(), signal.SIGSEGV)
                raise RuntimeError("SIGSEGV did not end the worker")
        return super().predict(model, input)


class BootOnceWorker(ControlledWorker):
    """Loads its model once; every later load in the same ``model_dir`` fails (as after a
    model file got corrupted). Each load attempt appends its pid to
    ``<model_dir>/boots-<worker_id>.txt``, so a test can count the attempts."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        path = os.path.join(model_dir, f"boots-{self.worker_id}.txt")
        first = not os.path.exists(path)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        if not first:
            raise RuntimeError("boot-again: this model can only be loaded once")
        return super().get_model(envs, model_dir, model_name, tmp_dir)


class GateLoadWorker(EchoWorker):
    """Echo, but ``get_model`` waits (bounded) until ``<model_dir>/load-release`` exists,
    so a test can watch a server whose model is still loading."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        wait_for_file(os.path.join(model_dir, "load-release"))
        return []


class ScratchWorker(EchoWorker):
    """Answers every input with where its scratch folder is, as each hook saw it:
    ``{"tmp_dir": self.tmp_dir, "env": get_env's tmp_dir, "model": get_model's tmp_dir,
    "exists": whether it is a directory now, "pid": the worker's pid}``."""

    def get_env(self, device_id, tmp_dir):
        self.env_tmp_dir = tmp_dir
        return []

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        self.model_tmp_dir = tmp_dir
        return []

    def predict(self, model, input):
        return [{"tmp_dir": self.tmp_dir, "env": self.env_tmp_dir, "model": self.model_tmp_dir,
                 "exists": os.path.isdir(self.tmp_dir), "pid": os.getpid()} for _ in input]


class LifecycleWorker(ControlledWorker):
    """ControlledWorker plus, for the recycling and exit-code tests:

    - ``{"cmd": "exit", "code": c}`` -> ``sys.exit(c)`` inside predict (a model that calls
      exit; code 3 is also the server's "boot failed" code)
    - ``{"cmd": "grow", "mb": n}`` -> keeps ``n`` MiB more allocated (touched, so they
      count in the resident set) and returns the process's RSS in MiB
    - ``{"cmd": "whoami"}`` -> ``{"pid": ..., "worker_id": ...}``
    """

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        model = super().get_model(envs, model_dir, model_name, tmp_dir)
        model["ballast"] = []
        return model

    def predict(self, model, input):
        out = []
        rest = []
        for item in input:
            cmd = item.get("cmd") if isinstance(item, dict) else None
            if cmd == "exit":
                import sys

                sys.exit(item["code"])
            if cmd == "grow":
                import psutil

                model["ballast"].append(bytearray(b"x" * (item["mb"] * 1024 * 1024)))
                out.append(psutil.Process().memory_info().rss / (1024 * 1024))
            elif cmd == "whoami":
                out.append({"pid": os.getpid(), "worker_id": self.worker_id})
            else:
                out.append(None)
                rest.append((len(out) - 1, item))
        if rest:
            computed = super().predict(model, [item for _, item in rest])
            for (pos, _), value in zip(rest, computed, strict=True):
                out[pos] = value
        return out


class DyingWorker(ControlledWorker):
    """ControlledWorker plus more ways to die while holding a batch, for the fault
    policy's "a worker that dies mid-batch is a crash, whatever its exit code":

    - ``{"cmd": "signal", "signal": name}`` -> the worker sends itself that signal
      (``"SIGSEGV"``: as a crash in native code; ``"SIGKILL"``: as the OOM killer)
    - ``{"cmd": "exit", "code": c}`` -> ``sys.exit(c)`` inside predict: SystemExit leaves
      through the worker's own exit path (code 3 is also the "boot failed" code)
    - ``{"cmd": "exit_now", "code": c}`` -> ``os._exit(c)``, skipping every cleanup, even
      with code 0
    """

    def predict(self, model, input):
        for item in input:
            cmd = item.get("cmd") if isinstance(item, dict) else None
            if cmd == "signal":
                import signal

                os.kill(os.getpid(), signal.Signals[item["signal"]])
                raise RuntimeError(f"{item['signal']} did not end the worker")
            if cmd == "exit":
                import sys

                sys.exit(item["code"])
            if cmd == "exit_now":
                os._exit(item["code"])
        return super().predict(model, input)


#: Longest an IdleDeathWorker's watcher thread waits for its death file (bounded, so a
#: worker of a test that never creates it does not poll for ever).
IDLE_DEATH_LIMIT_S = 120.0
#: The exit code of an IdleDeathWorker that died idle.
IDLE_DEATH_CODE = 21


class IdleDeathWorker(EchoWorker):
    """Echo; a daemon thread started with the model waits (bounded) until
    ``<model_dir>/die-<its pid>`` exists, then ends the process with
    ``os._exit(IDLE_DEATH_CODE)``: a worker dying with no request in hand, as in a broken
    environment (a driver fault, a crashing background thread), not because of an input.
    The file is named by pid so a test triggers each death only once it has seen that
    process registered (after it became ready)."""

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        path = os.path.join(model_dir, f"die-{os.getpid()}")

        def watch() -> None:
            if wait_for_file(path, IDLE_DEATH_LIMIT_S):
                os._exit(IDLE_DEATH_CODE)

        threading.Thread(target=watch, name="idle-death", daemon=True).start()
        return []
