"""Device mapping: which GPU (or the CPU, ``-1``) each worker gets."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

__all__ = ["CPU", "DeviceError", "assign_devices", "describe", "discover_gpus", "pin_device"]

CPU = -1


class DeviceError(ValueError):
    """A requested device does not exist."""


def discover_gpus(logger: logging.Logger | None = None) -> tuple[list[int], list[int]]:
    """Return ``(all_gpu_ids, free_gpu_ids)`` as seen by GPUtil; empty without a GPU."""
    try:
        import GPUtil

        gpus = GPUtil.getGPUs()
        free = GPUtil.getAvailable(order="memory", limit=len(gpus), maxLoad=0.9, maxMemory=0.9)
    except Exception as exc:  # no driver, no nvidia-smi, or GPUtil unusable on this Python
        if logger:
            logger.debug("GPU discovery unavailable: %s", exc)
        return [], []
    return [int(g.id) for g in gpus], [int(i) for i in free]


def assign_devices(num_worker: int, device_map: Sequence[int] | None, cpu: bool,
                   existing_gpus: Sequence[int], free_gpus: Sequence[int]) -> list[int]:
    """Assign a device to each worker, round-robin over ``device_map`` (or free GPUs).

    ``cpu`` forces every worker to the CPU. An explicit GPU id that does not exist is an
    error rather than a silent fallback to the CPU.
    """
    if num_worker < 1:
        raise ValueError("num_worker must be >= 1")
    if cpu:
        return [CPU] * num_worker
    if device_map:
        missing = sorted({d for d in device_map if d != CPU and d not in existing_gpus})
        if missing:
            seen = list(existing_gpus) or "none"
            raise DeviceError(
                f"-device_map asks for GPU {', '.join(map(str, missing))}, but this machine's "
                f"GPUs are: {seen}; use -device_map -1 or -cpu for the CPU")
        pool = list(device_map)
    else:
        pool = list(free_gpus) or [CPU]
    return [pool[i % len(pool)] for i in range(num_worker)]


def pin_device(device_id: int) -> None:
    """Make only GPU ``device_id`` visible to this process (``-1``: none, the CPU). It
    must run before any framework initialises CUDA: the worker calls it before the
    user's ``get_env``, and ``import_tf``/``import_torch`` before their import."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(device_id) if device_id >= 0 else str(CPU)


def describe(device_id: int) -> str:
    return "cpu" if device_id == CPU else f"gpu:{device_id}"
