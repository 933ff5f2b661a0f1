"""Device discovery and NVML metrics on a host with NVIDIA GPUs."""
from __future__ import annotations

import os

import pytest

from daemon.devices import cuda_device_count, discover_devices

pytestmark = pytest.mark.gpu


def test_auto_finds_every_gpu():
    import torch

    n = cuda_device_count()
    assert n >= 1
    assert discover_devices(("auto",)) == [f"cuda:{i}" for i in range(n)]
    if "CUDA_VISIBLE_DEVICES" not in os.environ:     # NVML ignores CUDA_VISIBLE_DEVICES
        assert n == torch.cuda.device_count()
    assert discover_devices(("auto", "cpu")) == [*(f"cuda:{i}" for i in range(n)), "cpu"]


def test_nvml_metrics_cover_every_gpu():
    import torch

    from frontends.http.metrics import gpu_families

    held = torch.empty(256 << 20, dtype=torch.uint8, device="cuda:0")   # 256 MiB in use
    torch.cuda.synchronize()
    families = {f.name: f for f in gpu_families()}
    n = cuda_device_count()
    for name in ("ferry_gpu_utilization_ratio", "ferry_gpu_memory_used_bytes",
                 "ferry_gpu_memory_total_bytes", "ferry_gpu_temperature_celsius",
                 "ferry_gpu_power_watts"):
        assert sorted(s.labels["gpu"] for s in families[name].samples) == \
            [str(i) for i in range(n)], name
    value = {name: {s.labels["gpu"]: s.value for s in fam.samples}
             for name, fam in families.items()}
    assert value["ferry_gpu_memory_total_bytes"]["0"] > value["ferry_gpu_memory_used_bytes"]["0"]
    assert value["ferry_gpu_memory_used_bytes"]["0"] >= held.numel()
    assert all(0.0 <= v <= 1.0 for v in value["ferry_gpu_utilization_ratio"].values())
    assert all(v > 0 for v in value["ferry_gpu_power_watts"].values())
    del held
