"""ONNX Runtime on a CUDA device: the CUDA execution provider with IO binding gives the CPU
provider's answers, for the demo models, through the same dynamic batcher."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from daemon import demo
from daemon.errors import InvalidInput
from daemon.repository_spec import load_spec
from engines.base import TensorRequest, TensorResult
from engines.onnx.engine import OnnxEngine
from tests.engine_steps import drain as drain_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="this onnxruntime has no CUDAExecutionProvider (install "
                              "onnxruntime-gpu in place of onnxruntime)"),
]

SENTENCES = ["Hello!", "The quick brown fox jumps over the lazy dog.",
             "Ferry pads a batch to its longest sequence and cuts each answer back.",
             "A longer passage " + "about latency on bare-metal inference hosts " * 12, "短い文"]


def drain(engine, timeout: float = 60.0) -> dict:
    return drain_steps(engine, timeout)


def load(version_dir: Path, device: str) -> OnnxEngine:
    engine = OnnxEngine()
    info = engine.load(load_spec(version_dir, version_dir.parent.name, 1), device)
    assert info.extra["io_binding"] is (engine.io_binding is not None)
    if device.startswith("cuda"):
        assert info.extra["providers"][0] == "CUDAExecutionProvider"
    return engine


def run_all(engine: OnnxEngine, requests: list[dict[str, np.ndarray]]) -> list[TensorResult]:
    """Submit every request before stepping, so the batcher groups them."""
    for i, inputs in enumerate(requests):
        engine.submit(TensorRequest(f"r{i}", inputs))
    out = drain(engine)
    assert all(out[f"r{i}"].error is None for i in range(len(requests)))
    return [out[f"r{i}"] for i in range(len(requests))]


def digits_requests() -> list[dict[str, np.ndarray]]:
    _, x_test, _, _ = demo.digits_split()                 # [360, 64] float32
    cuts = np.cumsum([1, 2, 3, 5, 7, 8, 13, 16, 1, 4] * 6)
    return [{"pixels": part} for part in np.split(x_test, cuts[cuts < len(x_test)]) if len(part)]


def test_digits_on_cuda_equals_cpu(demo_models):
    cpu, cuda = load(demo_models / "digits" / "1", "cpu"), load(demo_models / "digits" / "1",
                                                                "cuda:0")
    assert cuda.io_binding is not None and cuda.io_binding.device_id == 0
    runs = cuda.io_binding.runs
    requests = digits_requests()
    want, got = run_all(cpu, requests), run_all(cuda, requests)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.outputs["probabilities"], w.outputs["probabilities"],
                                   atol=1e-5)
    stats = cuda.stats()
    assert cuda.io_binding.runs - runs == stats["batches"]     # every batch went through it
    assert stats["batches"] < len(requests)                    # and requests were batched


def test_minilm_on_cuda_equals_cpu_with_padded_batches(demo_models):
    from tokenizers import Tokenizer

    version = demo_models / "minilm" / "1"
    tok = Tokenizer.from_file(str(version / "tokenizer.json"))
    requests = [{"input_ids": np.array([e.ids], np.int64),
                 "attention_mask": np.ones((1, len(e.ids)), np.int64)}
                for e in tok.encode_batch(SENTENCES)]
    cpu, cuda = load(version, "cpu"), load(version, "cuda:0")
    want, got = run_all(cpu, requests), run_all(cuda, requests)
    assert cuda.stats()["batch_sizes"] == {str(len(SENTENCES)): 1}   # one padded batch
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.outputs["embeddings"], w.outputs["embeddings"], atol=1e-4)


def test_io_binding_gives_what_plain_session_runs_give(demo_models, tmp_path):
    plain = tmp_path / "digits" / "1"
    shutil.copytree(demo_models / "digits" / "1", plain)
    with open(plain / "model.toml", "a") as f:
        f.write("\n[onnx]\nio_binding = false\n")
    unbound, bound = load(plain, "cuda:0"), load(demo_models / "digits" / "1", "cuda:0")
    assert unbound.io_binding is None and bound.io_binding is not None
    requests = digits_requests()
    for u, b in zip(run_all(unbound, requests), run_all(bound, requests)):
        np.testing.assert_allclose(b.outputs["probabilities"], u.outputs["probabilities"],
                                   atol=1e-6)


def test_requested_outputs_and_bad_inputs_on_cuda(demo_models):
    cuda = load(demo_models / "minilm" / "1", "cuda:0")
    with pytest.raises(InvalidInput) as err:
        cuda.submit(TensorRequest("bad", {"input_ids": np.ones((1, 4), np.int32),
                                          "attention_mask": np.ones((1, 4), np.int64)}))
    assert err.value.code == "invalid_dtype"
    r = TensorRequest("a", {"input_ids": np.array([[101, 7592, 102]], np.int64),
                            "attention_mask": np.ones((1, 3), np.int64)}, outputs=["embeddings"])
    cuda.submit(r)
    out = drain(cuda)["a"].outputs["embeddings"]
    assert out.shape == (1, 384) and abs(float(np.linalg.norm(out)) - 1.0) < 1e-4
