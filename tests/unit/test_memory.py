"""Per-engine memory accounting: estimates and the refuse-instead-of-OOM ledger."""
from __future__ import annotations

from pathlib import Path

import pytest

from daemon.memory import InsufficientMemory, MemoryLedger, device_budget, estimate_bytes
from engines.base import ModelSpec


def _spec(tmp_path: Path, engine: str, size: int, **sections) -> ModelSpec:
    (tmp_path / "w.bin").write_bytes(b"\0" * size)
    return ModelSpec("m", 1, engine, tmp_path, weights="w.bin", sections=sections)


def test_estimates_scale_with_the_weights_and_the_kv_cache(tmp_path):
    assert estimate_bytes(_spec(tmp_path, "onnx", 1000)) == 2000
    llm = _spec(tmp_path, "llm", 1000, llm={"kv_cache_mb": 3})
    assert estimate_bytes(llm) == 7000 + (3 << 20)


def test_ledger_refuses_what_does_not_fit_and_keeps_its_state():
    ledger = MemoryLedger(budget=100)
    ledger.reserve("a:1", 60, "cpu")
    with pytest.raises(InsufficientMemory) as err:
        ledger.reserve("b:1", 50, "cpu")
    assert err.value.status == 507 and err.value.code == "insufficient_memory"
    assert "b:1" in err.value.message and ledger.reserved == {"a:1": 60}
    ledger.reserve("a:1", 90, "cpu")          # a reload replaces its own reservation
    assert ledger.used == 90
    ledger.release("a:1")
    ledger.reserve("b:1", 100, "cpu")
    assert ledger.as_dict() == {"budget_bytes": 100, "reserved_bytes": 100}


def test_budget_from_config_or_the_host():
    assert device_budget("cpu", 64) == 64 << 20
    assert device_budget("cpu", 0) > 0
    # no NVML here: a cuda device falls back to host memory rather than failing
    assert device_budget("cuda:0", 0) == device_budget("cpu", 0)
