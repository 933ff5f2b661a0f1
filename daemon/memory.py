"""Memory accounting per engine, so a model that does not fit is refused with a clear error
instead of an out-of-memory crash in the middle of serving.

Estimates are deliberately conservative and made before loading: an ONNX graph takes about
twice its file (weights plus arena and optimised copies); an LLM's GGUF weights are dequantized
to 16/32-bit floats on load (up to ~7× a 4-bit file) and its KV cache is sized by `[llm]
kv_cache_mb`. Once a version has loaded, the engine's own report (ModelInfo.extra
"memory_bytes", where given) replaces the estimate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from daemon.errors import FerryError
from engines.base import ModelSpec

__all__ = ["InsufficientMemory", "device_budget", "estimate_bytes", "MemoryLedger"]

log = logging.getLogger(__name__)
_ONNX_FACTOR = 2.0
_LLM_FACTOR = 7.0      # 4-bit GGUF → fp32 weights, the worst case the engine loads


class InsufficientMemory(FerryError):
    status, code = 507, "insufficient_memory"


def _files_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def estimate_bytes(spec: ModelSpec) -> int:
    """Bytes a version will hold once loaded, estimated from its files and configuration."""
    weights = spec.path / spec.weights if spec.weights else spec.path
    size = _files_bytes(weights)
    if spec.engine == "llm":
        kv_mb = spec.section("llm").get("kv_cache_mb", 256)
        kv = int(kv_mb) << 20 if isinstance(kv_mb, (int, float)) else 256 << 20
        return int(size * _LLM_FACTOR) + kv
    return int(size * _ONNX_FACTOR)


def device_budget(device: str, configured_mb: int) -> int:
    """The model memory budget of one engine in bytes."""
    if configured_mb > 0:
        return configured_mb << 20
    if device.startswith("cuda:"):
        try:
            import pynvml
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(device[5:]))
                return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total * 0.9)
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:   # no NVML: fall back to host memory, and say so
            log.warning("cannot read %s memory through NVML (%s); using host memory", device, exc)
    import psutil
    return int(psutil.virtual_memory().total * 0.8)


@dataclass(slots=True)
class MemoryLedger:
    """Reservations of one engine: model key → bytes, against a fixed budget."""

    budget: int
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.reserved.values())

    def reserve(self, key: str, nbytes: int, engine: str) -> None:
        """Reserve `nbytes` for `key` (replacing its earlier reservation) or refuse."""
        others = self.used - self.reserved.get(key, 0)
        if others + nbytes > self.budget:
            raise InsufficientMemory(
                f"model {key} needs about {nbytes >> 20} MiB on engine {engine}, which has "
                f"{max(0, self.budget - others) >> 20} MiB of its {self.budget >> 20} MiB "
                "budget left; unload a model or raise engines.memory_mb")
        self.reserved[key] = nbytes

    def release(self, key: str) -> None:
        self.reserved.pop(key, None)

    def as_dict(self) -> dict[str, int]:
        return {"budget_bytes": self.budget, "reserved_bytes": self.used}
