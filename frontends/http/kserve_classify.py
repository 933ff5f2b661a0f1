"""Triton's classification extension: an output requested with `parameters.classification: k`
answers the top-k classes of each batch item instead of the raw scores.

As in Triton, each class is a BYTES string `"<score>:<index>"`, or `"<score>:<index>:<label>"`
when the model has labels (here: `labels` of its model.toml `[postprocess]` table, when that
table names this output or the model has one output); the score is printed as C's `%f`. A
batched model (max_batch_size > 0) gets shape [batch, k], others [k]; every other element of a
batch item is a class, and k is capped at their count.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from daemon.errors import InvalidInput
from daemon.preprocess import classify_spec

__all__ = ["classify_output", "labels_for"]

_LABELS: dict[tuple[str, str | None], dict[str, tuple[str, ...]]] = {}


def labels_for(entry: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """{output name: labels} of a placed model version (read once per version and weights)."""
    path = entry.get("path")
    if not path:
        return {}
    key = (path, entry.get("sha256"))
    if key not in _LABELS:
        _LABELS[key] = _read_labels(Path(path), entry.get("info", {}).get("outputs", []))
    return _LABELS[key]


def _read_labels(path: Path, outputs: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    try:
        with open(path / "model.toml", "rb") as f:
            raw = tomllib.load(f)
        if "postprocess" not in raw:
            return {}
        spec = classify_spec(raw["postprocess"])
    except (OSError, tomllib.TOMLDecodeError, InvalidInput):
        return {}       # unlabelled classes ("score:index"), as Triton without a label file
    name = spec.output or (outputs[0]["name"] if len(outputs) == 1 else None)
    return {name: spec.labels} if name and spec.labels else {}


def classify_output(name: str, arr: np.ndarray, k: int, batched: bool,
                    labels: tuple[str, ...]) -> np.ndarray:
    """The top-k class strings (bytes objects) of output `name`."""
    if arr.dtype.kind not in "biuf":
        raise InvalidInput(f"output {name!r}: classification needs numeric scores, the output "
                           f"is {arr.dtype.name}", code="invalid_classification", param=name)
    rows = arr.reshape(arr.shape[0], -1) if batched and arr.ndim > 0 else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows.astype(np.float64)):
        for j, i in enumerate(np.argsort(-row, kind="stable")[:k]):
            label = f":{labels[i]}" if i < len(labels) else ""
            out[r, j] = f"{row[i]:f}:{i}{label}".encode()
    return out if batched else out.reshape(k)
