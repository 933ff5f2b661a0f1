"""The standby engine: a process started ahead of need that becomes the engine of its device
when the running one dies (`[engines] standby`).

A fresh engine process spends seconds before it serves: Python, NumPy, ONNX Runtime, PyTorch
(about 1.3 s of CPU here), diffusers and transformers (3-5 s more), then each model's load
(SmolLM2's GGUF: about 4 s of CPU). A standby pays for that while the daemon is healthy:

- `"imports"`: it imports what the models it will host need and reads their files once (so
  they are in the page cache); the take-over still loads every model.
- `"models"`: it also loads every model version (CPU engines only: on a GPU that would hold
  the device's memory twice), and the take-over adopts each one whose files did not change:
  the restarted engine serves within a fraction of a second. Costs a second copy of the
  models in RAM. An LLM that publishes KV-cache events is not preloaded (its socket is the
  live engine's).

Then it waits on its stdin: `go` makes it the engine (`run_engine` with the same arguments);
end of file makes it exit. While it waits it holds no socket and no shared memory; SIGTERM ends
it at once.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daemon.logs import setup_logging
from daemon.repository import fingerprint
from daemon.process import die_with_parent, rename_role, set_title

__all__ = ["run_standby", "preload", "Preloaded"]

log = logging.getLogger(__name__)

_READ_CHUNK = 8 << 20


def _diffusers_classes(path: Path) -> None:
    """diffusers resolves its classes lazily: resolve the ones a pipeline names."""
    index_path = next(iter(sorted(path.rglob("model_index.json"))), None)
    if index_path is None:
        return
    for entry in json.loads(index_path.read_text()).values():
        if isinstance(entry, list) and len(entry) == 2 and all(entry):
            getattr(importlib.import_module(entry[0]), entry[1], None)


_EXTRA: dict[str, Callable[[Path], None]] = {"diffusion": _diffusers_classes}


def _read_through(path: Path) -> int:
    """Read a model's files once: a restart then loads them from the page cache."""
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                total += len(chunk)
    return total


@dataclass(slots=True)
class Preloaded:
    """A model version a standby loaded, with the files it was loaded from."""
    path: Path
    files: tuple
    engine: Any
    info: Any

    def matches(self, path: Path) -> bool:
        return path == self.path and fingerprint(path) == self.files


def preload(models: list[list[Any]], device: str, load_models: bool
            ) -> dict[tuple[str, int], Preloaded]:
    """Import the engine modules (and what they import lazily) of `models` ([name, version,
    path] each), read their files and, with `load_models`, load them. A version that fails
    here is left to the real load to report."""
    from daemon.repository_spec import load_spec
    from engines.process import ENGINE_CLASSES
    out: dict[tuple[str, int], Preloaded] = {}
    for name, version, text in models:
        path = Path(text)
        try:
            spec = load_spec(path, name, version)
            module, _, cls_name = ENGINE_CLASSES[spec.engine].partition(":")
            cls = getattr(importlib.import_module(module), cls_name)
            if spec.engine in _EXTRA:
                _EXTRA[spec.engine](path)
            files = fingerprint(path)
            _read_through(path)
            if load_models and not spec.section("llm").get("kv_events_endpoint"):
                engine = cls()
                out[(name, version)] = Preloaded(path, files, engine, engine.load(spec, device))
        except Exception as exc:   # noqa: BLE001 - the load proper reports it clearly
            log.info("standby: not preloading %s v%s: %s", name, version, exc)
    return out


def run_standby(args: dict[str, Any]) -> int:
    set_title("ferry-standby")
    die_with_parent(args["parent_pid"])
    setup_logging(args.get("log_level", "info"), args.get("log_format", "json"),
                  role=f"standby-{args['engine_id']}")
    started = time.monotonic()
    load_models = args.get("standby") == "models" and args["device"] == "cpu"
    ready = preload(list(args.get("preload", ())), args["device"], load_models)
    log.info("standby engine for %s ready (%s, %d model(s) loaded, in %.2f s)", args["device"],
             "models" if load_models else "imports", len(ready), time.monotonic() - started)
    if sys.stdin.readline().strip() != "go":
        return 0     # the supervisor closed the pipe: not needed any more
    rename_role("standby", "engine")   # `ps` and tools that match roles see the engine now
    from engines.process import run_engine
    return run_engine(args, ready)
