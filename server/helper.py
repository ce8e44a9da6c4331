"""Seed-compatible helpers: ``get_args_parser``, ``import_tf``, ``import_torch``.

Code written for the original ``wkr_serving`` imports these names from here.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .config import build_parser
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


def _pin(device_id: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1" if device_id < 0 else str(device_id)


def import_tf(device_id: int = -1, verbose: bool = False, use_fp16: bool = False,
              gpu_memory_fraction: float | None = None) -> Any:
    """Pin ``device_id`` (``-1``: CPU), import TensorFlow quietly and return the module.

    With ``gpu_memory_fraction`` on a GPU, memory grows on demand up to that fraction.
    """
    _pin(device_id)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    os.environ["TF_FP16_MATMUL_USE_FP32_COMPUTE"] = "0" if use_fp16 else "1"
    os.environ["TF_FP16_CONV_USE_FP32_COMPUTE"] = "0" if use_fp16 else "1"
    import tensorflow as tf

    tf.get_logger().setLevel("DEBUG" if verbose else "ERROR")
    if device_id >= 0:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    return tf


def import_torch(device_id: int = -1, verbose: bool = False, use_fp16: bool = False,
                 enable_benchmark: bool = True, reduce_thread: bool = False) -> Any:
    """Pin ``device_id`` (``-1``: CPU), import PyTorch and return the module."""
    _pin(device_id)
    import torch

    if enable_benchmark and device_id >= 0:
        torch.backends.cudnn.benchmark = True
    if reduce_thread:
        torch.set_num_threads(1)
    return torch
