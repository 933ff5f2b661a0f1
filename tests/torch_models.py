"""Torch versions of the demo digits classifier, and a small CNN on digits images, for the torch
engine's tests and benchmark.

The digits MLP is rebuilt from the demo ONNX file's own initializers (its names are the torch
module's state_dict keys), so the TorchScript, exported and ONNX versions hold the same weights
and their outputs can be compared. The CNN is trained here, deterministically, in a few seconds.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from daemon.demo import DigitsClassifier, digits_split

__all__ = ["digits_from_onnx", "DigitsCNN", "train_cnn", "cached_cnn", "save_torchscript",
           "save_exported", "save_onnx", "write_version", "digits_toml", "cnn_toml",
           "digits_inputs"]


def digits_from_onnx(onnx_path: Path) -> DigitsClassifier:
    """The demo's 64-128-10 MLP with the weights of its exported ONNX graph."""
    import onnx
    from onnx import numpy_helper

    body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))
    model = DigitsClassifier(body)
    graph = onnx.load(str(onnx_path)).graph
    state = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    model.load_state_dict(state, strict=True)
    return model.eval()


class DigitsCNN(torch.nn.Module):
    """[B, 1, 8, 8] pixels in 0..16 -> [B, 10] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),        # [B, 8, 8, 8]
            torch.nn.MaxPool2d(2))                                       # [B, 8, 4, 4]
        self.head = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image / 16.0).flatten(1))


def train_cnn(epochs: int = 10) -> tuple[DigitsCNN, float]:
    """The CNN trained on the demo's train split (one thread, seed 0, about a second on an
    idle core); returns it and its held-out accuracy."""
    x_train, x_test, y_train, y_test = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = DigitsCNN()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        x = torch.from_numpy(x_train).reshape(-1, 1, 8, 8)
        y = torch.from_numpy(y_train)
        order = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(128):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(x_test).reshape(-1, 1, 8, 8)).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    return model, float((pred == y_test).mean())


def cached_cnn() -> tuple[DigitsCNN, float]:
    """`train_cnn()`, trained once per version of this file and kept beside the demo models
    ($FERRY_TEST_MODELS or var/test-models): on a busy 2-core host training takes ~30 s."""
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    repo = Path(__file__).resolve().parents[1]
    path = Path(os.environ.get("FERRY_TEST_MODELS", repo / "var" / "test-models")) / \
        f"digits-cnn-{key}.pt"
    model = DigitsCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model, _ = train_cnn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    model.eval()
    _, x_test, _, y_test = digits_split()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test).reshape(-1, 1, 8, 8)).argmax(1).numpy()
    return model, float((pred == y_test).mean())


def save_torchscript(model: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    with torch.no_grad():
        torch.jit.trace(model, (example,)).save(str(path))
    return path


def save_exported(model: torch.nn.Module, path: Path, example: torch.Tensor, name: str,
                  max_batch: int = 1024) -> Path:
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model, (example,), dynamic_shapes={name: {0: batch}})
    torch.export.save(program, str(path))
    return path


def save_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor, name: str,
              output: str) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=[name], output_names=[output],
                          dynamic_axes={name: {0: "batch"}, output: {0: "batch"}})
    return path


def write_version(repo: Path, name: str, version: int, files: dict[str, bytes | str | Path]
                  ) -> Path:
    """`repo/name/version/` with `files` (bytes, text, or a file to copy)."""
    d = repo / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        if isinstance(content, Path):
            content = content.read_bytes()
        if isinstance(content, str):
            (d / fname).write_text(content)
        else:
            (d / fname).write_bytes(content)
    return d


def digits_toml(engine: str = "torch", weights: str = "model.pt", extra: str = "",
                declare: bool = True) -> str:
    """The demo digits model.toml for `engine`; TorchScript needs the tensors declared."""
    tensors = """
[[inputs]]
name = "pixels"
dtype = "float32"
shape = [-1, 64]

[[outputs]]
name = "probabilities"
dtype = "float32"
shape = [-1, 10]
""" if declare else ""
    return f"""engine = "{engine}"
weights = "{weights}"
max_batch_size = 64
{tensors}
[batching]
max_queue_delay_us = 2000
default_timeout_ms = 0

[preprocess]
kind = "image"
width = 8
height = 8
channels = 1
scale = 16.0
layout = "flat"
input = "pixels"

[postprocess]
kind = "classify"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
top_k = 3
{extra}"""


def cnn_toml(engine: str, weights: str, extra: str = "") -> str:
    return f"""engine = "{engine}"
weights = "{weights}"
max_batch_size = 32

[[inputs]]
name = "image"
dtype = "float32"
shape = [-1, 1, 8, 8]

[[outputs]]
name = "logits"
dtype = "float32"
shape = [-1, 10]

[batching]
max_queue_delay_us = 2000
default_timeout_ms = 0

[preprocess]
kind = "image"
width = 8
height = 8
channels = 1
scale = 16.0
layout = "nchw"
input = "image"

[postprocess]
kind = "classify"
labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
top_k = 3
softmax = true
{extra}"""


def digits_inputs(n: int, start: int = 0) -> np.ndarray:
    _, x_test, _, _ = digits_split()
    return x_test[start:start + n].astype(np.float32)
