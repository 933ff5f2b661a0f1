"""The TensorRT engine on a GPU: a plan built from the demo digits ONNX with a batch profile,
cached, loaded again as a `.plan`, matching ONNX Runtime, batched by the shared batcher."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from daemon import demo
from daemon.errors import FerryError, InvalidInput
from daemon.repository_spec import load_spec
from engines.base import ModelInfo, TensorRequest
from engines.onnx.engine import OnnxEngine
from engines.tensor_engine import TensorEngine
from engines.tensorrt.build import CACHE_DIR, cache_dir_name
from engines.tensorrt.engine import TensorRTEngine
from tests.engine_steps import drain as drain_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                       reason="the tensorrt package is not installed (pip install "
                              "'ferry[tensorrt]')"),
]

BUILD_TOML = """engine = "tensorrt"
weights = "model.onnx"
max_batch_size = 64
[[inputs]]
name = "pixels"
dtype = "float32"
shape = [-1, 64]
[batching]
max_queue_delay_us = {delay}
preferred_batch_sizes = [8]
[tensorrt]
build_from = "model.onnx"
"""
PLAN_TOML = """engine = "tensorrt"
weights = "model.plan"
max_batch_size = 64
[batching]
max_queue_delay_us = 60000000
preferred_batch_sizes = [8]
"""
# TensorRT runs FP32 matrix products in TF32 on Hopper by default: ~1e-3 relative error.
ATOL = 5e-3


def drain(engine, timeout: float = 60.0) -> dict:
    return drain_steps(engine, timeout)


def version(root: Path, toml: str, files: dict[str, Path]) -> Path:
    d = root / "1"
    d.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, d / name)
    (d / "model.toml").write_text(toml)
    return d


def load(engine: TensorEngine, d: Path, device: str = "cuda:0") -> ModelInfo:
    return engine.load(load_spec(d, "digits", 1), device)


@pytest.fixture(scope="module")
def built(demo_models, tmp_path_factory) -> tuple[TensorRTEngine, ModelInfo, Path]:
    d = version(tmp_path_factory.mktemp("trt-digits"), BUILD_TOML.format(delay=100),
                {"model.onnx": demo_models / "digits" / "1" / "model.onnx"})
    engine = TensorRTEngine()
    return engine, load(engine, d), d


@pytest.fixture(scope="module")
def ort_digits(demo_models) -> OnnxEngine:
    engine = OnnxEngine()
    load(engine, demo_models / "digits" / "1", "cpu")
    return engine


def pixels() -> np.ndarray:
    return demo.digits_split()[1]                           # [360, 64] float32 in 0..16


def run_all(engine: TensorEngine, parts: list[np.ndarray]) -> list[np.ndarray]:
    for i, part in enumerate(parts):
        engine.submit(TensorRequest(f"r{i}", {"pixels": part}))
    out = drain(engine)
    assert all(out[f"r{i}"].error is None for i in range(len(parts))), out
    return [out[f"r{i}"].outputs["probabilities"] for i in range(len(parts))]


def test_built_with_a_batch_profile_and_cached_by_gpu_and_version(built):
    engine, info, d = built
    assert (info.platform, info.kind, info.max_batch_size) == ("tensorrt_plan", "tensor", 64)
    assert info.extra["plan"] == "built"
    assert info.extra["profile"] == {"pixels": {"min": [1, 64], "opt": [8, 64],
                                                "max": [64, 64]}}
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [
        ("probabilities", "float32", (-1, 10))]
    cache = d / CACHE_DIR / cache_dir_name(info.extra["gpu"], info.extra["tensorrt"])
    [plan] = cache.glob("*.plan")
    again = TensorRTEngine()
    assert load(again, d).extra["plan"] == "cache"
    assert list(cache.glob("*.plan")) == [plan]
    again.unload()


def test_tensorrt_equals_onnxruntime_through_the_batcher(built, ort_digits):
    engine = built[0]
    x = pixels()
    parts = np.split(x, np.cumsum([1, 3, 8, 2, 64, 5, 30, 17, 1, 40, 64, 64]))   # 61 left
    assert len(parts) == 13 and max(map(len, parts)) == 64
    want, got = run_all(ort_digits, parts), run_all(engine, parts)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=ATOL)
    agree = np.mean(np.concatenate(want).argmax(1) == np.concatenate(got).argmax(1))
    assert agree >= 0.99
    stats = engine.stats()
    assert stats["batches"] < len(parts) and set(stats) >= {"batch_sizes", "avg_batch_size"}


def test_a_plan_file_loads_and_batches_to_the_preferred_size(built, ort_digits, tmp_path):
    _, info, d = built
    cache = d / CACHE_DIR / cache_dir_name(info.extra["gpu"], info.extra["tensorrt"])
    [plan] = cache.glob("*.plan")
    engine = TensorRTEngine()
    plan_info = load(engine, version(tmp_path, PLAN_TOML, {"model.plan": plan}))
    assert plan_info.extra["plan"] == "plan" and plan_info.inputs == info.inputs
    x = pixels()[:8]
    for i in range(4):                                      # 4 x 2 rows: the preferred 8
        engine.submit(TensorRequest(f"r{i}", {"pixels": x[2 * i:2 * i + 2]}))
    out = {r.id: r for r in engine.step()}                  # the long delay is not waited
    assert sorted(out) == ["r0", "r1", "r2", "r3"]
    assert engine.stats()["batch_sizes"] == {"8": 1}
    [want] = run_all(ort_digits, [x])
    got = np.concatenate([out[f"r{i}"].outputs["probabilities"] for i in range(4)])
    np.testing.assert_allclose(got, want, atol=ATOL)
    engine.unload()
    with pytest.raises(FerryError) as err:
        engine.submit(TensorRequest("late", {"pixels": x[:1]}))
    assert err.value.code == "model_unavailable"


@pytest.mark.parametrize("inputs, code", [
    ({"pixels": np.zeros((65, 64), np.float32)}, "batch_too_large"),
    ({"pixels": np.zeros((1, 63), np.float32)}, "invalid_shape"),
    ({"pixels": np.zeros((1, 64), np.float64)}, "invalid_dtype"),
    ({"image": np.zeros((1, 64), np.float32)}, "unknown_input"),
])
def test_bad_inputs_get_the_onnx_engines_codes(built, ort_digits, inputs, code):
    for engine in (built[0], ort_digits):
        with pytest.raises(InvalidInput) as err:
            engine.submit(TensorRequest("bad", inputs))
        assert err.value.code == code


def test_a_corrupt_plan_fails_to_load(tmp_path):
    d = version(tmp_path, PLAN_TOML, {})
    (d / "model.plan").write_bytes(b"\x00" * 1024)
    with pytest.raises(FerryError) as err:
        load(TensorRTEngine(), d)
    assert err.value.code == "model_load_failed" and "deserialize" in err.value.message


def test_minilm_with_a_sequence_profile_pads_and_cuts_back(demo_models, tmp_path):
    from tokenizers import Tokenizer

    src = demo_models / "minilm" / "1"
    toml = (src / "model.toml").read_text().replace('engine = "onnx"', 'engine = "tensorrt"')
    toml += '\n[tensorrt]\nbuild_from = "model.onnx"\ndims = { sequence = [1, 64, 256] }\n'
    d = version(tmp_path, toml, {"model.onnx": src / "model.onnx",
                                 "tokenizer.json": src / "tokenizer.json"})
    engine = TensorRTEngine()
    info = engine.load(load_spec(d, "minilm", 1), "cuda:0")
    assert info.extra["profile"]["input_ids"] == {"min": [1, 1], "opt": [32, 64],
                                                  "max": [32, 256]}
    onnx = OnnxEngine()
    onnx.load(load_spec(src, "minilm", 1), "cpu")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    encoded = [e.ids for e in tok.encode_batch(["Hi", "A sentence of some length.", "x " * 300])]
    for e in (engine, onnx):
        for i, ids in enumerate(encoded):
            ids = np.array([ids], np.int64)
            e.submit(TensorRequest(f"s{i}", {"input_ids": ids,
                                             "attention_mask": np.ones_like(ids)}))
    got, want = drain(engine), drain(onnx)
    assert engine.stats()["batch_sizes"] == {"3": 1}
    for i in range(3):
        g, w = got[f"s{i}"].outputs["embeddings"], want[f"s{i}"].outputs["embeddings"]
        assert g.shape == (1, 384)
        np.testing.assert_allclose(g, w, atol=ATOL)
    with pytest.raises(InvalidInput) as err:       # longer than the profile allows
        ids = np.ones((1, 257), np.int64)
        engine.submit(TensorRequest("long", {"input_ids": ids, "attention_mask": ids}))
    assert err.value.code == "invalid_shape" and "1..256" in err.value.message
