"""Which devices get an engine: CUDA GPUs found through NVML, else the CPU.

MPS (Apple) is detected for completeness, though Ferry's process model targets Linux hosts.
"""
from __future__ import annotations

import logging
import platform

__all__ = ["cuda_device_count", "discover_devices"]

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    """GPUs visible through NVML (no CUDA context is created, so this is cheap and safe)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _mps_available() -> bool:
    if platform.system() != "Darwin":
        return False
    try:
        import torch
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def discover_devices(configured: tuple[str, ...]) -> list[str]:
    """Expand "auto" into one entry per GPU (or "cpu"); keep explicit entries as given."""
    out: list[str] = []
    for dev in configured:
        if dev != "auto":
            out.append(dev)
            continue
        n = cuda_device_count()
        if n:
            out.extend(f"cuda:{i}" for i in range(n))
        elif _mps_available():
            out.append("mps")
        else:
            out.append("cpu")
    seen: list[str] = []
    for dev in out:
        if dev not in seen:
            seen.append(dev)
    log.info("engine devices: %s", ", ".join(seen))
    return seen
