"""Driving an engine in-process the way its host loop does, for unit and GPU tests."""
from __future__ import annotations

import time
from typing import Any

__all__ = ["drain"]


def drain(engine: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Step until the engine is idle (polling with a deadline, never sleeping); results by id."""
    results, deadline = {}, time.monotonic() + timeout
    while engine.has_work():
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not finish")
        results.update((r.id, r) for r in engine.step())
    return results
