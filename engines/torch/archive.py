"""What a PyTorch weights file is, decided from its bytes before any loader sees it, and a guard
that keeps every unpickling inside a load to `torch.load(weights_only=True)`.

TorchScript archives (`torch.jit.save`) and exported programs (`torch.export.save`) are both zip
files; so is a plain `torch.save` pickle (a state_dict or a pickled module), which Ferry never
unpickles: it names no graph to run and unpickling it runs whatever code it references. The
kind is told by the archive's entries, not the file name, so a `.pt2` named `model.pt` loads.
"""
from __future__ import annotations

import contextlib
import enum
import os
import threading
import zipfile
from pathlib import Path
from typing import Iterator

from engines.tensor_engine import load_error

__all__ = ["ArchiveKind", "archive_kind", "weights_only_loads"]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_UNFORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_guard_lock = threading.Lock()
_guard_users = 0
_guard_saved: dict[str, str | None] = {}


class ArchiveKind(enum.Enum):
    TORCHSCRIPT = "torchscript"     # torch.jit.save: <root>/code/, constants.pkl, data.pkl
    EXPORTED = "exported_program"   # torch.export.save: <root>/archive_format, models/*.json


def archive_kind(path: Path) -> ArchiveKind:
    """The kind of `path`, or `model_load_failed` saying what the file is instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise load_error(f"cannot read {path}: {exc}") from exc
    if not head.startswith(b"PK\x03\x04"):
        raise load_error(f"{path.name} is not a TorchScript (.pt) or torch.export (.pt2) "
                         f"archive: {_what_else(head)}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise load_error(f"{path.name} is a damaged zip archive: {exc}") from None
    # Every entry sits under one root folder (the name the archive was saved under).
    tails = {name.partition("/")[2] for name in names}
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        if any(t.startswith("data/aotinductor/") for t in tails):
            raise load_error(f"{path.name} is an AOTInductor package (compiled ahead of time for "
                             "one machine); the torch engine serves torch.export.save archives")
        return ArchiveKind.EXPORTED
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return ArchiveKind.TORCHSCRIPT
    if "data.pkl" in tails:
        raise load_error(f"{path.name} is a plain torch.save pickle (a state_dict or a pickled "
                         "module), which holds no program to run and which Ferry does not "
                         "unpickle: save the model with torch.jit.script(model).save(...) or "
                         "torch.export.save(torch.export.export(model, example_inputs), ...)")
    raise load_error(f"{path.name} is a zip archive but neither TorchScript nor torch.export "
                     "(it has no code/ or archive_format entry)")


def _what_else(head: bytes) -> str:
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return ("it is a legacy (pre-zip) torch.save pickle, which Ferry does not unpickle; "
                "save the model with torch.jit.save or torch.export.save")
    # An ONNX ModelProto opens with ir_version (field 1, a varint), then a producer or opset.
    if head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower()
                                or head[2:3] in (b"\x12", b"\x1a", b"\x3a", b"\x42")):
        return 'it looks like an ONNX model: serve it with engine = "onnx"'
    if not head:
        return "the file is empty"
    return "its first bytes match no PyTorch format"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force `weights_only=True` on every `torch.load` in this process while any load is inside.

    torch.export.load unpickles sample inputs and some weights with `weights_only=False` (falling
    back to it when the safe unpickler refuses), so a crafted .pt2 could run code; torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call. Loads run on worker threads: the variable stays
    set until the last concurrent load leaves.
    """
    global _guard_users
    with _guard_lock:
        if _guard_users == 0:
            _guard_saved.clear()
            _guard_saved.update({k: os.environ.get(k) for k in (_FORCE, _UNFORCE)})
            os.environ[_FORCE] = "1"
            os.environ.pop(_UNFORCE, None)   # both set is an error inside torch.load
        _guard_users += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                for key, value in _guard_saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
