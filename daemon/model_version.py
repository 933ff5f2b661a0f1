"""One model version as the supervisor tracks it (daemon/supervisor.py places it, daemon/control.py
reports and changes it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelVersion"]


@dataclass(slots=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    state: str = "loading"          # loading | ready | draining | failed
    engines: list[str] = field(default_factory=list)
    info: dict[str, Any] | None = None
    sha256: str | None = None
    engine_kind: str = ""
    error: str | None = None
    error_code: tuple[str, int] = ("model_load_failed", 422)
    fingerprint: tuple = ()
