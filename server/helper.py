"""Seed-compatible helpers: ``get_args_parser``, ``import_tf``, ``import_torch``.

Code written for the original ``wkr_serving`` imports these names from here.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .config import build_parser
from .devices import pin_device
from .logs import set_logger
from .worker import load_worker_class

__all__ = ["get_args_parser", "import_class_from_local", "import_tf", "import_torch",
           "set_logger"]


def get_args_parser() -> argparse.ArgumentParser:
    """The server's argument parser (without the positional worker class)."""
    return build_parser(with_worker_class=False)


def import_class_from_local(spec: str) -> type:
    """Import ``<file>.<Class>`` from the current directory."""
    return load_worker_class(spec)


def import_tf(device_id: int = -1, verbose: bool = False, use_fp16: bool = False,
              gpu_memory_fraction: float | None = None) -> Any:
    """Pin ``device_id`` (``-1``: CPU), import TensorFlow quietly and return the module.

    On a GPU, TensorFlow may use at most ``gpu_memory_fraction`` of the card's memory;
    without it, memory is taken on demand instead of all at once.
    """
    pin_device(device_id)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    os.environ["TF_FP16_MATMUL_USE_FP32_COMPUTE"] = "0" if use_fp16 else "1"
    os.environ["TF_FP16_CONV_USE_FP32_COMPUTE"] = "0" if use_fp16 else "1"
    import tensorflow as tf

    tf.get_logger().setLevel("DEBUG" if verbose else "ERROR")
    gpus = tf.config.list_physical_devices("GPU") if device_id >= 0 else []
    total_mb = _gpu_memory_mb(device_id) if gpus and gpu_memory_fraction else None
    for gpu in gpus:  # only the pinned GPU is visible
        if total_mb and gpu_memory_fraction:
            limit = int(total_mb * gpu_memory_fraction)
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
        else:
            tf.config.experimental.set_memory_growth(gpu, True)
    return tf


def _gpu_memory_mb(device_id: int) -> float | None:
    """Total memory (MiB) of GPU ``device_id`` as nvidia-smi numbers it, if known."""
    try:
        import GPUtil

        return next((g.memoryTotal for g in GPUtil.getGPUs() if g.id == device_id), None)
    except Exception:
        return None


def import_torch(device_id: int = -1, verbose: bool = False, use_fp16: bool = False,
                 enable_benchmark: bool = True, reduce_thread: bool = False) -> Any:
    """Pin ``device_id`` (``-1``: CPU), import PyTorch and return the module."""
    pin_device(device_id)
    import torch

    if enable_benchmark and device_id >= 0:
        torch.backends.cudnn.benchmark = True
    if reduce_thread:
        torch.set_num_threads(1)
    return torch
