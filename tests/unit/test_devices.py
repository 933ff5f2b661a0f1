"""Device discovery on a host as it is: NVML is called for real (on a host without an NVIDIA
driver it fails to initialise, and discovery must fall back to the CPU)."""
from __future__ import annotations

import sys

import pytest

from daemon.devices import cuda_device_count, discover_devices


def _nvml_usable() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:   # ImportError, or pynvml.NVMLError: no library, no driver
        return False
    pynvml.nvmlShutdown()
    return True


def test_auto_is_one_engine_per_gpu_or_the_cpu():
    n = cuda_device_count()
    want = [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    assert discover_devices(("auto",)) == want


@pytest.mark.skipif(_nvml_usable(), reason="NVML initialises on this host (a GPU host)")
def test_nvml_failure_means_no_gpus():
    assert cuda_device_count() == 0
    assert discover_devices(("auto",)) == ["cpu"]


def test_without_pynvml_there_are_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)        # import pynvml -> ImportError
    assert cuda_device_count() == 0


def test_explicit_devices_are_kept_in_order():
    assert discover_devices(("cuda:1", "cpu", "cuda:0")) == ["cuda:1", "cpu", "cuda:0"]


def test_duplicates_are_removed_keeping_the_first():
    assert discover_devices(("cpu", "cuda:0", "cpu", "cuda:0")) == ["cpu", "cuda:0"]
    # "auto" expands to what is already listed: still one engine per device.
    expanded = discover_devices(("auto",))
    assert discover_devices(("auto", *expanded)) == expanded
