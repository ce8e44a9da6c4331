"""Unit tests of device assignment (server/devices.py)."""

from __future__ import annotations

import pytest
from wkr_serving.server.devices import CPU, DeviceError, assign_devices, describe


def test_cpu_flag_forces_cpu_even_with_gpus_and_a_map():
    assert assign_devices(3, [0, 1], True, [0, 1], [0, 1]) == [CPU] * 3
    assert assign_devices(2, None, True, [0], [0]) == [CPU, CPU]


def test_device_map_round_robin():
    assert assign_devices(5, [0, 1], False, [0, 1], []) == [0, 1, 0, 1, 0]
    assert assign_devices(2, [1, 0, 1], False, [0, 1], [0, 1]) == [1, 0]
    assert assign_devices(3, [2], False, [0, 1, 2], [0]) == [2, 2, 2]


def test_device_map_minus_one_means_cpu_without_any_gpu():
    assert assign_devices(2, [-1], False, [], []) == [CPU, CPU]
    assert assign_devices(4, [-1, 0], False, [0], [0]) == [CPU, 0, CPU, 0]


@pytest.mark.parametrize("existing", [[], [0, 1]])
def test_missing_gpu_raises_device_error_naming_it(existing):
    with pytest.raises(DeviceError) as info:
        assign_devices(2, [0, 3], False, existing, existing)
    text = str(info.value)
    assert "GPU" in text and "3" in text
    assert "-cpu" in text or "-device_map -1" in text


def test_missing_gpu_on_gpu_less_machine():
    with pytest.raises(DeviceError, match="GPU"):
        assign_devices(1, [0], False, [], [])


def test_auto_uses_free_gpus_round_robin():
    assert assign_devices(3, None, False, [0, 1, 2, 3], [2, 3]) == [2, 3, 2]


def test_auto_without_free_gpu_falls_back_to_cpu():
    assert assign_devices(2, None, False, [0, 1], []) == [CPU, CPU]
    assert assign_devices(1, None, False, [], []) == [CPU]
    assert assign_devices(2, (), False, [], []) == [CPU, CPU]


def test_num_worker_must_be_positive():
    with pytest.raises(ValueError):
        assign_devices(0, None, True, [], [])


def test_describe():
    assert describe(CPU) == "cpu"
    assert describe(2) == "gpu:2"
