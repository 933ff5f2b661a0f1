"""Parse and validate `models/<name>/<version>/model.toml` into an `engines.base.ModelSpec`.

Errors are `InvalidInput` with code `invalid_model_config` and a message naming the key, so an
upload or a repository poll can report exactly what is wrong. The weights are identified by
their SHA-256 (a version is also known by it); hashes are cached by (path, size, mtime, inode)
because repository polling re-reads specs often and weights are large.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.errors import InvalidInput
from daemon.preprocess import check_sections
from engines.base import ModelSpec, TensorSpec

__all__ = ["ENGINES", "DTYPES", "load_spec", "weights_sha256"]

ENGINES = ("onnx", "llm", "tensorrt", "torch", "diffusion")
DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                    "uint64", "float16", "float32", "float64", "bytes"})   # bytes: BYTES tensors
# Weights an engine looks for when model.toml names none (the llm engine chooses its own).
# diffusion: a diffusers directory (model_index.json, unet/, ...); its files' SHA-256 is the id.
DEFAULT_WEIGHTS = {"onnx": "model.onnx", "tensorrt": "model.plan", "torch": "model.pt",
                   "diffusion": "pipeline"}
_SCALARS = ("engine", "weights", "max_batch_size", "description")
_CHUNK = 1 << 20


def load_spec(version_dir: Path, name: str, version: int) -> ModelSpec:
    """Read `version_dir/model.toml`; raise `InvalidInput` (invalid_model_config) naming the key."""
    version_dir = Path(version_dir)
    raw = _read_toml(version_dir / "model.toml")
    for key, value in raw.items():
        if key not in _SCALARS and key not in ("inputs", "outputs") and not isinstance(value, dict):
            raise _error(f"unknown key {key!r} (tables go in [sections])", key)
    engine = raw.get("engine")
    if engine not in ENGINES:
        raise _error(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}", "engine")
    max_batch = raw.get("max_batch_size", 0)
    if not _is_int(max_batch) or max_batch < 0:
        raise _error("max_batch_size must be a non-negative integer", "max_batch_size")
    weights = _relative_name(raw.get("weights", DEFAULT_WEIGHTS.get(engine)), "weights")
    sha = None
    if weights is not None:
        path = version_dir / weights
        if not path.exists():
            raise _error(f"weights file {weights!r} not found in {version_dir}", "weights")
        sha = weights_sha256(path)
    sections = {k: v for k, v in raw.items() if isinstance(v, dict)}
    _check_tokenizer(sections.get("tokenizer"), version_dir)
    check_sections(sections)    # [preprocess] / [postprocess] (daemon.preprocess)
    return ModelSpec(name=name, version=version, engine=engine, path=version_dir,
                     weights=weights, sha256=sha, max_batch_size=max_batch,
                     inputs=_tensors(raw, "inputs"), outputs=_tensors(raw, "outputs"),
                     sections=sections)


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, or of a directory's sorted file names and contents."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
        return _cached_sha256(str(path), tuple((rel, _stat_key(p)) for rel, p in files))
    return _cached_sha256(str(path), _stat_key(path))


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, key: tuple) -> str:
    """Hash keyed by the files' (size, mtime, inode) too, so a rewritten file is hashed anew."""
    digest = hashlib.sha256()
    root = Path(path)
    if root.is_dir():
        for rel, (size, _, _) in key:
            # Name and length delimit each file so ("ab", "c") and ("a", "bc") differ.
            digest.update(rel.encode() + b"\0" + size.to_bytes(8, "little"))
            _hash_file(digest, root / rel)
    else:
        _hash_file(digest, root)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise _error(f"{path} not found", "model.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"{path} is not valid TOML: {exc}", "model.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f"cannot read {path}: {exc}", "model.toml") from None


def _relative_name(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _error(f"{key} must be a file name", key)
    # A spec must not point outside its own version directory.
    if os.path.isabs(value) or ".." in PurePosixPath(value).parts or "\\" in value:
        raise _error(f"{key} must be a relative path inside the version directory, got "
                     f"{value!r}", key)
    return value


def _tensors(raw: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = raw.get(key, [])
    if not isinstance(items, list):
        raise _error(f"{key} must be an array of tables ([[{key}]])", key)
    specs, seen = [], set()
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _error(f"{where} must be a table", where)
        name, dtype, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise _error(f"{where}.name must be a non-empty string", f"{where}.name")
        if name in seen:
            raise _error(f"{where}.name {name!r} is declared twice", f"{where}.name")
        if dtype not in DTYPES:
            raise _error(f"{where}.dtype must be one of {', '.join(sorted(DTYPES))}, got "
                         f"{dtype!r}", f"{where}.dtype")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= -1 for d in shape):
            raise _error(f"{where}.shape must be a list of integers (-1: dynamic)",
                         f"{where}.shape")
        max_shape = item.get("max_shape")
        if max_shape is not None and (not isinstance(max_shape, list) or len(max_shape) != len(
                shape) or not all(_is_int(d) and (d == -1 or d > 0) for d in max_shape)):
            raise _error(f"{where}.max_shape must list one bound (> 0, or -1: none) per dim of "
                         "shape", f"{where}.max_shape")
        unknown = set(item) - {"name", "dtype", "shape", "max_shape"}
        if unknown:
            raise _error(f"{where} has unknown keys {sorted(unknown)}", where)
        seen.add(name)
        specs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape),
                                max_shape=tuple(max_shape) if max_shape else None))
    return tuple(specs)


def _check_tokenizer(section: dict[str, Any] | None, version_dir: Path) -> None:
    if section is None:
        return
    file = _relative_name(section.get("file", "tokenizer.json"), "tokenizer.file")
    if file is None or not (version_dir / file).is_file():
        raise _error(f"tokenizer.file {file!r} not found in {version_dir}", "tokenizer.file")
    max_length = section.get("max_length", 512)
    if not _is_int(max_length) or max_length <= 0:
        raise _error("tokenizer.max_length must be a positive integer", "tokenizer.max_length")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _error(message: str, key: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_model_config", param=key)
