"""Workers cap their BLAS/OpenMP pools (-num_threads) so they do not starve the pipeline."""

from __future__ import annotations

import os

import pytest
from helpers import connect, running_server, server_args
from threadpoolctl import threadpool_info
from wkr_serving.server import ServerConfig
from workers import ThreadsWorker


def _default_blas_threads() -> int:
    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.mark.parametrize("flag, expected", [
    ("1", lambda: 1),
    ("0", lambda: max(1, (os.cpu_count() or 1) - 1)),
    ("-1", _default_blas_threads),
])
def test_worker_blas_pool_follows_num_threads(tmp_path, flag, expected):
    args = server_args(tmp_path, "-num_threads", flag, "-cpu")
    with running_server(args, ThreadsWorker) as server, connect(server) as client:
        assert client.encode(0) == expected()


def test_auto_threads_leave_a_core_and_split_the_rest():
    assert ServerConfig(num_worker=1).worker_threads(cpu_count=2) == 1
    assert ServerConfig(num_worker=2).worker_threads(cpu_count=16) == 7
    assert ServerConfig(num_worker=8).worker_threads(cpu_count=4) == 1
    assert ServerConfig(num_threads=3).worker_threads(cpu_count=64) == 3
    assert ServerConfig(num_threads=-1).worker_threads(cpu_count=64) is None


def test_num_threads_below_minus_one_is_refused():
    with pytest.raises(ValueError):
        ServerConfig(num_threads=-2)
