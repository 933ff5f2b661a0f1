"""Triton's model-config override on load (`POST /v2/repository/models/{m}/load` with
`parameters.config`), applied to a Ferry model version.

Triton's config is JSON in protobuf's mapping (so `"max_batch_size": "16"` is the integer 16).
The keys that mean something for a Ferry model.toml are mapped; any other key is refused rather
than silently ignored. The override is materialized as a private copy of the version directory
(every file linked, model.toml rewritten) under the state directory, and that copy is what the
engines load: the repository on disk is never written. A later load without a config loads the
repository's own version again.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from daemon.errors import InvalidInput
from daemon.repository import NAME_RE

__all__ = ["parse_config", "materialize", "parse_files", "write_upload"]

# Triton config keys whose meaning Ferry's model.toml has, and keys a client may repeat as long
# as they agree with the model (Triton's own examples send the name and the backend).
_MAPPED = ("max_batch_size",)
_MUST_AGREE = ("name",)
# With uploaded files the config also names the runtime: Ferry builds ONNX models from uploads.
_UPLOAD_RUNTIMES = {"backend": ("onnxruntime", "onnx"), "platform": ("onnxruntime_onnx",)}
_FILE_PATH = re.compile(r"[1-9]\d{0,8}(/[A-Za-z0-9_.-]{1,128}){1,8}")
_TOP_KEY = re.compile(r"^\s*(\w+)\s*=")


def _bad(model: str, why: str) -> InvalidInput:
    # "failed to load": the text Triton's clients and examples look for
    return InvalidInput(f"failed to load {model!r}: {why}", code="invalid_model_config",
                        param="parameters.config")


def _int(model: str, key: str, value: Any) -> int:
    """An integer as protobuf's JSON mapping allows it: a number or a decimal string."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,12}", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise _bad(model, f"config {key} must be an integer in [0, 2**31), got {value!r}")
    return value


def parse_config(model: str, raw: Any, upload: bool = False) -> dict[str, Any]:
    """model.toml keys from Triton's JSON config override `raw` (a string, as Triton takes it).
    With `upload` (the model's files came with the request) the config may name its runtime."""
    if not isinstance(raw, str):
        raise _bad(model, "parameters.config must be a string holding a JSON model config")
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise _bad(model, f"parameters.config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _bad(model, "parameters.config must be a JSON object")
    allowed = {*_MAPPED, *_MUST_AGREE, *(_UPLOAD_RUNTIMES if upload else ())}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise _bad(model, f"config keys {unknown} have no Ferry equivalent; an override may set "
                   f"{list(_MAPPED)} (and repeat {list(_MUST_AGREE)})")
    for key, names in _UPLOAD_RUNTIMES.items():
        if key in config and config[key] not in names:
            raise _bad(model, f"config {key} {config[key]!r}: models loaded from uploaded files "
                       f"must be ONNX ({key} {names[0]!r})")
    if "name" in config and config["name"] != model:
        raise _bad(model, f"config name {config['name']!r} is not the model's name")
    out: dict[str, Any] = {}
    if "max_batch_size" in config:
        out["max_batch_size"] = _int(model, "max_batch_size", config["max_batch_size"])
    return out


def materialize(source: Path, target: Path, overrides: dict[str, Any]) -> Path:
    """A copy of version directory `source` at `target` with `overrides` set in its model.toml
    (top-level scalar keys); every other file is a symlink to the original."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "model.toml":
            (target / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    lines = (source / "model.toml").read_text().splitlines()
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")),
                       len(lines))
    kept = [line for i, line in enumerate(lines)
            if i >= first_table or not ((m := _TOP_KEY.match(line)) and m.group(1) in overrides)]
    head = [f"{key} = {json.dumps(value)}" for key, value in overrides.items()]
    text = "\n".join(["# model.toml of " + str(source) + " with a load-time override", *head,
                      *kept]) + "\n"
    parsed = tomllib.loads(text)          # the rewrite must say what was asked, nothing else
    if any(parsed.get(k) != v for k, v in overrides.items()):
        raise InvalidInput(f"cannot apply override {overrides} to {source / 'model.toml'}",
                           code="invalid_model_config")
    (target / "model.toml").write_text(text)
    return target


def parse_files(model: str, params: dict[str, Any]) -> dict[str, bytes]:
    """`file:<version>/<path>` parameters (base64 contents, as tritonclient sends them) as
    {"<version>/<path>": bytes}. Paths stay inside their version directory."""
    files: dict[str, bytes] = {}
    for key, value in params.items():
        if not key.startswith("file:"):
            continue
        rel = key[len("file:"):]
        if not _FILE_PATH.fullmatch(rel) or any(part in (".", "..") for part in rel.split("/")):
            raise _bad(model, f"{key!r}: a model file is named file:<version>/<path>, with "
                       "plain path components (letters, digits, _ . -)")
        if not isinstance(value, str):
            raise _bad(model, f"{key!r}: the contents must be a base64 string")
        try:
            files[rel] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(model, f"{key!r}: the contents are not valid base64") from None
    dirs = {"/".join(rel.split("/")[:i]) for rel in files for i in range(2, rel.count("/") + 1)}
    clash = sorted(dirs & files.keys())
    if clash:
        raise _bad(model, f"file:{clash[0]} is both a file and a directory of another file")
    return files


def write_upload(base: Path, model: str, overrides: dict[str, Any],
                 files: dict[str, bytes]) -> Path:
    """A one-model repository at `base/<model>` built from uploaded `files`, each version with a
    model.toml for the ONNX engine (plus `overrides`); replaces an earlier upload of `model`.
    Returns the repository root."""
    if not NAME_RE.fullmatch(model):     # never "..", a path, or a name the repository refuses
        raise _bad(model, "a model name is a letter or digit, then letters, digits, _ . -")
    root = base / model
    try:
        if root.exists():
            shutil.rmtree(root)
        for rel, data in files.items():
            path = root / model / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    except OSError as exc:              # e.g. a full state disk: the client's load fails, cleanly
        raise _bad(model, f"the uploaded files could not be written: {exc.strerror}") from None
    for version_dir in (root / model).iterdir():
        lines = ['engine = "onnx"',
                 *(f"{key} = {json.dumps(value)}" for key, value in overrides.items())]
        (version_dir / "model.toml").write_text(
            "# built from files uploaded with a load request\n" + "\n".join(lines) + "\n")
    return root
