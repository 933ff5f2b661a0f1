"""The TensorRT engine's pure parts: build options, optimisation profiles from declared shapes,
dtype mapping, the plan cache, and the errors a host without TensorRT or CUDA gives.

Building and running plans needs a GPU: tests/gpu/test_tensorrt.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.errors import FerryError, InvalidInput
from daemon.repository_spec import load_spec
from engines.base import TensorRequest, TensorSpec
from engines.process import ENGINE_CLASSES
from engines.tensor_engine import merge_declared
from engines.tensorrt.build import (CACHE_DIR, BuildOptions, ShapeRange, cache_dir_name,
                                    cached_or_built, compute_profile, plan_cache_path, read_onnx)
from engines.tensorrt.engine import TensorRTEngine, cuda_index, numpy_dtype


def _save(graph: onnx.GraphProto, path: Path, ir_version: int = 8) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    path.write_bytes(model.SerializeToString())
    return path


def digits_like(path: Path) -> Path:
    """probabilities = softmax(pixels @ w) [batch, 10], as the demo digits model's signature."""
    w = numpy_helper.from_array(np.zeros((64, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])], [w])
    return _save(graph, path)


def encoder_like(path: Path, seq: str | None = "sequence") -> Path:
    """embeddings = table[input_ids] * mask [batch, seq, 4], minilm's input signature."""
    table = numpy_helper.from_array(np.zeros((100, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
         helper.make_node("Mul", ["e", "m3"], ["embeddings"])], "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", seq, 4])],
        [table, numpy_helper.from_array(np.array([2], np.int64), "axis")])
    return _save(graph, path)


def version_dir(tmp_path: Path, toml: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "model.toml").write_text(toml)
    return d


PLAN_TOML = 'engine = "tensorrt"\nmax_batch_size = 8\n'


# -- the engine on a host without TensorRT or CUDA ----------------------------------------------

def test_the_engine_is_registered_and_imports_without_tensorrt():
    module, _, cls = ENGINE_CLASSES["tensorrt"].partition(":")
    assert getattr(importlib.import_module(module), cls) is TensorRTEngine
    assert TensorRTEngine().stats()["batches"] == 0


def test_missing_tensorrt_package_is_a_clear_load_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # import tensorrt -> ImportError
    d = version_dir(tmp_path, PLAN_TOML, {"model.plan": b"not a plan"})
    engine = TensorRTEngine()
    with pytest.raises(FerryError) as err:
        engine.load(load_spec(d, "m", 1), "cuda:0")
    assert (err.value.code, err.value.status) == ("model_load_failed", 422)
    assert "`tensorrt` Python package" in err.value.message
    assert "pip install" in err.value.message
    with pytest.raises(FerryError) as err:
        engine.submit(TensorRequest("a", {"x": np.zeros((1, 4), np.float32)}))
    assert err.value.code == "model_unavailable"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here")
def test_this_host_reports_tensorrt_absent(tmp_path):
    d = version_dir(tmp_path, PLAN_TOML, {"model.plan": b"not a plan"})
    with pytest.raises(FerryError) as err:
        TensorRTEngine().load(load_spec(d, "m", 1), "cuda:0")
    assert err.value.code == "model_load_failed" and "tensorrt" in err.value.message


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda:x", "cuda0"])
def test_non_cuda_devices_are_refused(tmp_path, device):
    d = version_dir(tmp_path, PLAN_TOML, {"model.plan": b"not a plan"})
    with pytest.raises(FerryError) as err:
        TensorRTEngine().load(load_spec(d, "m", 1), device)
    assert err.value.code == "model_load_failed" and "CUDA devices" in err.value.message


def test_cuda_device_names():
    assert (cuda_index("cuda"), cuda_index("cuda:0"), cuda_index("cuda:3")) == (0, 0, 3)


def test_onnx_weights_without_build_from_is_a_config_error(tmp_path):
    d = version_dir(tmp_path, 'engine = "tensorrt"\nweights = "model.onnx"\n',
                    {"model.onnx": b"x"})
    with pytest.raises(InvalidInput) as err:
        TensorRTEngine().load(load_spec(d, "m", 1), "cuda:0")
    assert (err.value.code, err.value.param) == ("invalid_model_config", "tensorrt.build_from")
    assert 'build_from = "model.onnx"' in err.value.message


def test_bad_tensorrt_table_fails_before_any_device_work(tmp_path):
    d = version_dir(tmp_path, PLAN_TOML + '[tensorrt]\nbuild-from = "model.onnx"\n',
                    {"model.plan": b"x"})
    with pytest.raises(InvalidInput) as err:
        TensorRTEngine().load(load_spec(d, "m", 1), "cpu")
    assert err.value.param == "tensorrt.build-from"


# -- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("trt_name, numpy_name", [
    ("FLOAT", "float32"), ("HALF", "float16"), ("INT8", "int8"), ("INT32", "int32"),
    ("INT64", "int64"), ("BOOL", "bool"), ("UINT8", "uint8"), ("DataType.HALF", "float16")])
def test_tensorrt_dtypes_map_to_numpy(trt_name, numpy_name):
    assert numpy_dtype(trt_name, "t") == numpy_name
    np.dtype(numpy_name)                                # a real numpy dtype


@pytest.mark.parametrize("trt_name", ["BF16", "FP8", "INT4", "FP4"])
def test_dtypes_without_numpy_twin_fail_to_load(trt_name):
    with pytest.raises(FerryError) as err:
        numpy_dtype(trt_name, "logits")
    assert err.value.code == "model_load_failed" and "'logits'" in err.value.message


# -- build options ------------------------------------------------------------------------------

def test_build_options_defaults_and_values():
    assert BuildOptions.from_section({}, 8) == BuildOptions()
    opts = BuildOptions.from_section({
        "build_from": "model.onnx", "fp16": True, "workspace_mb": 512, "opt_batch_size": 4,
        "optimization_level": 5, "cache": False, "dims": {"sequence": [1, 64, 256]}}, 8)
    assert (opts.build_from, opts.fp16, opts.workspace_mb, opts.opt_batch_size) == (
        "model.onnx", True, 512, 4)
    assert (opts.optimization_level, opts.cache, opts.dims) == (5, False,
                                                                {"sequence": (1, 64, 256)})


@pytest.mark.parametrize("section, max_batch, key", [
    ({"build_form": "model.onnx"}, 8, "build_form"),
    ({"build_from": "../other/model.onnx"}, 8, "build_from"),
    ({"build_from": "/abs/model.onnx"}, 8, "build_from"),
    ({"build_from": ""}, 8, "build_from"),
    ({"fp16": "yes"}, 8, "fp16"),
    ({"cache": 1}, 8, "cache"),
    ({"workspace_mb": 0}, 8, "workspace_mb"),
    ({"opt_batch_size": 9}, 8, "opt_batch_size"),
    ({"opt_batch_size": 0}, 8, "opt_batch_size"),
    ({"opt_batch_size": 1}, 0, "opt_batch_size"),
    ({"optimization_level": 6}, 8, "optimization_level"),
    ({"optimization_level": True}, 8, "optimization_level"),
    ({"dims": [1, 2, 3]}, 8, "dims"),
    ({"dims": {"sequence": [1, 2]}}, 8, "dims"),
    ({"dims": {"sequence": [4, 2, 8]}}, 8, "dims"),
    ({"dims": {"sequence": [0, 2, 8]}}, 8, "dims"),
])
def test_bad_build_options_name_their_key(section, max_batch, key):
    with pytest.raises(InvalidInput) as err:
        BuildOptions.from_section(section, max_batch)
    assert (err.value.code, err.value.param, err.value.status) == (
        "invalid_model_config", f"tensorrt.{key}", 400)


# -- profiles -----------------------------------------------------------------------------------

def test_batch_profile_from_max_batch_size_and_preferred_sizes(tmp_path):
    graph = read_onnx(digits_like(tmp_path / "d.onnx"))
    assert graph.inputs == {"pixels": TensorSpec("pixels", "float32", (-1, 64))}
    assert graph.dim_names == {"pixels": ("batch", None)}
    args = (graph.inputs, graph.dim_names, 64)
    assert compute_profile(*args, (8,), BuildOptions()) == {
        "pixels": ShapeRange((1, 64), (8, 64), (64, 64))}
    # The batcher aims for the largest preferred size; without one, for a full batch.
    assert compute_profile(*args, (4, 16), BuildOptions())["pixels"].opt == (16, 64)
    assert compute_profile(*args, (), BuildOptions())["pixels"].opt == (64, 64)
    assert compute_profile(*args, (8,), BuildOptions(opt_batch_size=2))["pixels"].opt == (2, 64)


def test_dynamic_dims_take_their_range_by_symbolic_name(tmp_path):
    graph = read_onnx(encoder_like(tmp_path / "e.onnx"))
    opts = BuildOptions(dims={"sequence": (1, 128, 256)})
    profile = compute_profile(graph.inputs, graph.dim_names, 32, (8, 16), opts)
    want = ShapeRange((1, 1), (16, 128), (32, 256))
    assert profile == {"input_ids": want, "attention_mask": want}
    assert graph.out_dims == {"embeddings": ("batch", "sequence", None)}


def test_unnamed_dynamic_dims_take_their_range_by_input_and_axis(tmp_path):
    graph = read_onnx(encoder_like(tmp_path / "e.onnx", seq=None))
    opts = BuildOptions(dims={"input_ids:1": (2, 4, 8), "attention_mask:1": (2, 4, 8)})
    profile = compute_profile(graph.inputs, graph.dim_names, 4, (), opts)
    assert profile["input_ids"] == ShapeRange((1, 2), (4, 4), (4, 8))


def test_a_dynamic_dim_without_a_range_names_the_key_to_set(tmp_path):
    graph = read_onnx(encoder_like(tmp_path / "e.onnx"))
    with pytest.raises(InvalidInput) as err:
        compute_profile(graph.inputs, graph.dim_names, 32, (), BuildOptions())
    assert err.value.param == "tensorrt.dims"
    assert '"sequence" = [min, opt, max]' in err.value.message


def test_declared_shapes_fix_dims_in_the_profile(tmp_path):
    graph = read_onnx(encoder_like(tmp_path / "e.onnx"))
    declared = (TensorSpec("input_ids", "int64", (-1, 128)),
                TensorSpec("attention_mask", "int64", (-1, 128)))
    inputs = merge_declared(graph.inputs, declared, "input")
    profile = compute_profile(inputs, graph.dim_names, 16, (), BuildOptions())
    assert profile["input_ids"] == ShapeRange((1, 128), (16, 128), (16, 128))


def test_without_a_batch_dim_every_dynamic_dim_needs_a_range(tmp_path):
    graph = read_onnx(digits_like(tmp_path / "d.onnx"))
    with pytest.raises(InvalidInput) as err:
        compute_profile(graph.inputs, graph.dim_names, 0, (), BuildOptions())
    assert '"batch"' in err.value.message
    profile = compute_profile(graph.inputs, graph.dim_names, 0, (),
                              BuildOptions(dims={"batch": (1, 1, 1)}))
    assert profile["pixels"] == ShapeRange((1, 64), (1, 64), (1, 64))


def test_a_static_batch_dim_cannot_take_max_batch_size():
    inputs = {"x": TensorSpec("x", "float32", (1, 4))}
    with pytest.raises(FerryError) as err:
        compute_profile(inputs, {}, 8, (), BuildOptions())
    assert err.value.code == "model_load_failed" and "dynamic first dimension" in err.value.message


# -- reading ONNX -------------------------------------------------------------------------------

def test_initializers_listed_as_inputs_are_not_profile_inputs(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w])
    assert list(read_onnx(_save(graph, tmp_path / "g.onnx", ir_version=3)).inputs) == ["x"]


def test_unsupported_onnx_dtypes_and_unreadable_files_fail_to_load(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 4])])
    with pytest.raises(FerryError) as err:
        read_onnx(_save(graph, tmp_path / "g.onnx"))
    assert err.value.code == "model_load_failed" and "float64" in err.value.message
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(FerryError) as err:
        read_onnx(tmp_path / "bad.onnx")
    assert err.value.code == "model_load_failed" and "cannot read" in err.value.message


# -- the plan cache -----------------------------------------------------------------------------

def test_cache_is_keyed_by_gpu_tensorrt_onnx_options_and_profile(tmp_path):
    assert cache_dir_name("NVIDIA H100 80GB HBM3", "10.3.0") == "NVIDIA-H100-80GB-HBM3-trt10.3.0"
    profile = {"x": ShapeRange((1, 4), (8, 4), (64, 4))}
    path = plan_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0", "ab" * 32,
                           BuildOptions(), profile)
    assert path.parent == tmp_path / CACHE_DIR / "NVIDIA-H100-80GB-HBM3-trt10.3.0"
    assert path.suffix == ".plan"
    others = [
        plan_cache_path(tmp_path, "NVIDIA H200", "10.3.0", "ab" * 32, BuildOptions(), profile),
        plan_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.4.0", "ab" * 32, BuildOptions(),
                        profile),
        plan_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0", "cd" * 32, BuildOptions(),
                        profile),
        plan_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0", "ab" * 32,
                        BuildOptions(fp16=True), profile),
        plan_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0", "ab" * 32, BuildOptions(),
                        {"x": ShapeRange((1, 4), (16, 4), (64, 4))}),
    ]
    assert len({path, *others}) == 6


def test_a_plan_is_built_once_then_read_from_the_cache(tmp_path):
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"plan-%d" % len(builds)

    cache = tmp_path / CACHE_DIR / "gpu-trt10" / "abc.plan"
    assert cached_or_built(cache, build) == (b"plan-1", "built")
    assert cached_or_built(cache, build) == (b"plan-1", "cache")
    assert cached_or_built(cache, build, force=True) == (b"plan-2", "built")
    assert cache.read_bytes() == b"plan-2" and len(builds) == 2
    # A plan built for other options of this version is stale once a new one is stored.
    newer = cache.with_name("def.plan")
    assert cached_or_built(newer, build) == (b"plan-3", "built")
    assert sorted(p.name for p in cache.parent.glob("*.plan")) == ["def.plan"]


def test_an_unwritable_cache_still_serves_the_built_plan(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / CACHE_DIR / "x.plan"
    assert cached_or_built(cache, lambda: b"plan") == (b"plan", "built")
    assert cached_or_built(None, lambda: b"plan") == (b"plan", "built")
