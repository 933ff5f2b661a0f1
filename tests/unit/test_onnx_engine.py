"""OnnxEngine on tiny real ONNX graphs (built with onnx.helper): batching, validation, errors."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.errors import FerryError, InvalidInput
from daemon.repository_spec import load_spec
from engines.base import TensorRequest
from engines.onnx.engine import OnnxEngine, select_providers, session_options
from tests.engine_steps import drain

SCALE_TOML = """engine = "onnx"
max_batch_size = 16
[batching]
max_queue_delay_us = {delay}
"""


def scale_model() -> onnx.ModelProto:
    """y = 2x [batch, seq]; s = sum(x * mask) over seq [batch]."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "maskf"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "axes"], ["s"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return _model(graph)


def gather_model(batch: int | str = "batch") -> onnx.ModelProto:
    """out = table[ids] [batch, n, 3]; an id >= 10 fails inside onnxruntime."""
    table = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(10, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"])], "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, "n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, "n", 3])], [table])
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_engine(tmp_path: Path, model: onnx.ModelProto | bytes, toml: str) -> OnnxEngine:
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (d / "model.onnx").write_bytes(data)
    (d / "model.toml").write_text(toml)
    engine = OnnxEngine()
    engine.load(load_spec(d, "m", 1), "cpu")
    return engine


@pytest.fixture
def scale(tmp_path) -> OnnxEngine:
    return make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=0))


def scale_req(rid: str, rows: int = 1, seq: int = 4, seed: int = 0) -> TensorRequest:
    x = np.random.default_rng(seed).standard_normal((rows, seq)).astype(np.float32)
    return TensorRequest(rid, {"x": x, "mask": np.ones((rows, seq), np.int64)})



def test_load_infers_tensors_from_the_graph(tmp_path):
    engine = OnnxEngine()
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(scale_model().SerializeToString())
    (d / "model.toml").write_text(SCALE_TOML.format(delay=0))
    info = engine.load(load_spec(d, "m", 1), "cpu")
    assert (info.platform, info.kind, info.max_batch_size) == ("onnxruntime_onnx", "tensor", 16)
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("x", "float32", (-1, -1)), ("mask", "int64", (-1, -1))]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [
        ("y", "float32", (-1, -1)), ("s", "float32", (-1,))]
    assert info.extra["providers"] == ["CPUExecutionProvider"]


def test_one_request_is_computed(scale):
    r = scale_req("a", rows=2)
    scale.submit(r)
    out = drain(scale)["a"]
    assert out.error is None and out.batch_size == 2 and out.compute_s > 0
    np.testing.assert_allclose(out.outputs["y"], r.inputs["x"] * 2)
    np.testing.assert_allclose(out.outputs["s"], r.inputs["x"].sum(axis=1), rtol=1e-6)


def test_concurrent_submits_are_batched_and_each_gets_its_own_answer(scale):
    reqs = [scale_req(f"r{i}", rows=1 + i % 3, seed=i) for i in range(6)]
    for r in reqs:
        scale.submit(r)
    batched = scale.step()
    assert len(batched) == 6 and not scale.has_work()
    assert scale.stats()["batch_sizes"] == {"12": 1}
    assert all(r.batch_size == 12 for r in batched)
    alone = {}
    for r in reqs:                                     # the same requests, one at a time
        scale.submit(TensorRequest(r.id, r.inputs))
        alone.update(drain(scale))
    for res in batched:
        np.testing.assert_array_equal(res.outputs["y"], alone[res.id].outputs["y"])
        np.testing.assert_allclose(res.outputs["s"], alone[res.id].outputs["s"], rtol=1e-6)
    stats = scale.stats()
    assert stats["requests"] == 12 and stats["batches"] == 7
    assert stats["avg_batch_size"] == pytest.approx(24 / 7)


def test_requested_outputs_only(scale):
    r = scale_req("a")
    r.outputs = ["s"]
    scale.submit(r)
    assert set(drain(scale)["a"].outputs) == {"s"}


def test_an_empty_output_list_means_every_output(scale):
    r = scale_req("a")
    r.outputs = []
    scale.submit(r)
    assert set(drain(scale)["a"].outputs) == {"y", "s"}


def test_declared_padding_batches_lengths_and_cuts_outputs_back(tmp_path):
    engine = make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=0)
                         + "pad_dims = { x = 0, mask = 0 }\n")
    short, long = scale_req("short", seq=3, seed=1), scale_req("long", seq=5, seed=2)
    engine.submit(short)
    engine.submit(long)
    out = {r.id: r for r in engine.step()}
    assert engine.stats()["batch_sizes"] == {"2": 1}
    np.testing.assert_allclose(out["short"].outputs["y"], short.inputs["x"] * 2)
    np.testing.assert_allclose(out["long"].outputs["y"], long.inputs["x"] * 2)
    np.testing.assert_allclose(out["short"].outputs["s"], short.inputs["x"].sum(1), rtol=1e-6)


def test_the_delay_holds_a_partial_batch(tmp_path):
    engine = make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=50_000))
    engine.submit(scale_req("a"))
    assert engine.step() == []
    assert 0 < engine.wait_hint() <= 0.05
    assert drain(engine)["a"].queue_s >= 0.05


def test_deadline_passed_in_queue_is_answered_and_never_run(scale):
    r = scale_req("late")
    r.deadline = time.monotonic() - 0.001
    scale.submit(r)
    res = drain(scale)["late"]
    assert res.outputs is None and res.error.code == "deadline_exceeded"
    assert res.error.status == 504 and scale.stats()["batches"] == 0


def test_cancel_drops_a_queued_request(tmp_path):
    engine = make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=60_000_000))
    engine.submit(scale_req("a"))
    [res] = engine.cancel("a")
    assert res.error.code == "cancelled" and not engine.has_work()
    assert engine.cancel("a") == [] and engine.wait_hint() is None


def test_a_request_failing_in_onnxruntime_does_not_fail_its_batch_mates(tmp_path):
    engine = make_engine(tmp_path, gather_model(), 'engine = "onnx"\nmax_batch_size = 8\n')
    engine.submit(TensorRequest("good", {"ids": np.array([[1, 2]], np.int64)}))
    engine.submit(TensorRequest("bad", {"ids": np.array([[1, 99]], np.int64)}))
    out = drain(engine)
    np.testing.assert_array_equal(out["good"].outputs["out"], [[[3, 4, 5], [6, 7, 8]]])
    assert out["bad"].outputs is None and out["bad"].error.code == "invalid_input"
    assert engine.stats()["failed"] == 1


def x_mask(x_shape=(1, 4), x_dtype="float32", mask_shape=None, mask_dtype="int64"):
    return {"x": np.ones(x_shape, x_dtype), "mask": np.ones(mask_shape or x_shape, mask_dtype)}


BAD_INPUTS = [
    ({**x_mask(), "z": np.ones((1, 4), np.float32)}, "unknown_input", "z"),
    ({"x": np.ones((1, 4), np.float32)}, "missing_input", "mask"),
    (x_mask(x_dtype="float64"), "invalid_dtype", "x"),
    (x_mask(mask_dtype="int32"), "invalid_dtype", "mask"),      # no silent int32 -> int64
    ({"x": [[1.0, 2.0]], "mask": np.ones((1, 2), np.int64)}, "invalid_dtype", "x"),
    (x_mask(x_shape=(1, 4, 1), mask_shape=(1, 4)), "invalid_shape", "x"),
    (x_mask(x_shape=(1, 0)), "invalid_shape", "x"),
    (x_mask(x_shape=(1, 4), mask_shape=(1, 5)), "invalid_shape", "mask"),
    (x_mask(x_shape=(2, 4), mask_shape=(1, 4)), "invalid_shape", "mask"),
    (x_mask(x_shape=(17, 4)), "batch_too_large", None),
]


@pytest.mark.parametrize("inputs, code, param", BAD_INPUTS)
def test_bad_inputs_are_refused_at_submit(scale, inputs, code, param):
    with pytest.raises(InvalidInput) as err:
        scale.submit(TensorRequest("bad", inputs))
    assert (err.value.code, err.value.status, err.value.param) == (code, 400, param)
    assert not scale.has_work()


def test_unknown_output_is_refused(scale):
    r = scale_req("a")
    r.outputs = ["nope"]
    with pytest.raises(InvalidInput) as err:
        scale.submit(r)
    assert err.value.code == "unknown_output"


def test_declared_fixed_dims_are_enforced(tmp_path):
    engine = make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=0) + (
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'))
    assert engine.submit(scale_req("ok")) is None
    with pytest.raises(InvalidInput) as err:
        engine.submit(scale_req("bad", seq=5))
    assert err.value.code == "invalid_shape" and "[-1, 4]" in err.value.message


def test_declared_bounds_of_dynamic_dims_are_enforced(tmp_path):
    # A graph longer than its bound would fail deep in onnxruntime (MiniLM past 512 positions).
    engine = make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=0) + (
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, -1]\nmax_shape = [-1, 8]\n'))
    assert engine.submit(scale_req("ok", rows=3, seq=8)) is None
    with pytest.raises(InvalidInput) as err:
        engine.submit(scale_req("long", seq=9))
    assert (err.value.code, err.value.param) == ("invalid_shape", "x")
    assert "at most [-1, 8]" in err.value.message


@pytest.mark.parametrize("model, toml, fragment", [
    (b"\x08\x01garbage-not-a-model", 'engine = "onnx"\n', "cannot load"),
    (gather_model(batch=1), 'engine = "onnx"\nmax_batch_size = 4\n', "dynamic first dimension"),
    (scale_model(), 'engine = "onnx"\n[[inputs]]\nname = "ids"\ndtype = "int64"\nshape = [-1]\n',
     "graph lacks"),
    (scale_model(), 'engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [-1, -1]\n',
     "the graph has float32"),
])
def test_bad_model_files_fail_to_load(tmp_path, model, toml, fragment):
    with pytest.raises(FerryError) as err:
        make_engine(tmp_path, model, toml)
    assert (err.value.code, err.value.status) == ("model_load_failed", 422)
    assert fragment in err.value.message


def test_padding_an_unknown_input_is_a_config_error(tmp_path):
    with pytest.raises(InvalidInput) as err:
        make_engine(tmp_path, scale_model(), SCALE_TOML.format(delay=0) + "pad_dims = { z = 0 }\n")
    assert err.value.code == "invalid_model_config" and "'z'" in err.value.message


def test_unloaded_engine_refuses_requests(scale):
    scale.unload()
    with pytest.raises(FerryError) as err:
        scale.submit(scale_req("a"))
    assert err.value.code == "model_unavailable"


def test_no_batch_dim_model_runs_requests_as_given(tmp_path):
    engine = make_engine(tmp_path, gather_model(batch=1), 'engine = "onnx"\n')
    engine.submit(TensorRequest("a", {"ids": np.array([[0]], np.int64)}))
    engine.submit(TensorRequest("b", {"ids": np.array([[1, 2]], np.int64)}))
    out = drain(engine)
    assert out["a"].outputs["out"].shape == (1, 1, 3) and out["b"].outputs["out"].shape == (1, 2, 3)
    assert engine.stats()["batches"] == 2


# -- providers and session options (pure) ------------------------------------------------------

GPU_ORT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_device_uses_the_cpu_provider_only():
    assert select_providers("cpu", {"tensorrt": True}, GPU_ORT) == [("CPUExecutionProvider", {})]


def test_cuda_device_picks_its_index_then_falls_back_to_cpu():
    assert select_providers("cuda:1", {}, GPU_ORT) == [
        ("CUDAExecutionProvider", {"device_id": 1}), ("CPUExecutionProvider", {})]


def test_tensorrt_goes_first_when_configured():
    providers = select_providers("cuda:0", {"tensorrt": {"trt_fp16_enable": True,
                                                         "device_id": 7}}, GPU_ORT)
    assert [name for name, _ in providers] == GPU_ORT
    assert providers[0][1] == {"trt_fp16_enable": True, "device_id": 0}


def test_tensorrt_missing_falls_back_to_cuda():
    providers = select_providers("cuda", {"tensorrt": True}, GPU_ORT[1:])
    assert [name for name, _ in providers] == GPU_ORT[1:]


@pytest.mark.parametrize("device, available", [
    ("cuda:0", ["CPUExecutionProvider"]), ("tpu:0", GPU_ORT), ("cuda:x", GPU_ORT)])
def test_unusable_devices_fail_to_load(device, available):
    with pytest.raises(FerryError) as err:
        select_providers(device, {}, available)
    assert err.value.code == "model_load_failed"


def test_session_options_apply_threads_and_validate():
    assert session_options({"intra_op_threads": 2}).intra_op_num_threads == 2
    for bad in ({"intra_op_threads": -1}, {"inter_op_threads": "2"},
                {"graph_optimization": "max"}):
        with pytest.raises(InvalidInput) as err:
            session_options(bad)
        assert err.value.code == "invalid_model_config"


def bias_model() -> onnx.ModelProto:
    """out = x + bias, bias [1, 4]: x [batch, n] with n not 1 or 4 fails inside the Add node."""
    bias = numpy_helper.from_array(np.ones((1, 4), np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["out"], name="add_bias")], "bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], [bias])
    return _model(graph)


def test_an_input_the_graph_cannot_take_is_the_clients_error(tmp_path):
    # onnxruntime answers FAIL (not INVALID_ARGUMENT) for a failure inside a node; with no
    # max_shape declared that is still the input's fault: 400, naming the node, never a 500.
    engine = make_engine(tmp_path, bias_model(), 'engine = "onnx"\nmax_batch_size = 4\n')
    engine.submit(TensorRequest("good", {"x": np.zeros((1, 4), np.float32)}))
    engine.submit(TensorRequest("bad", {"x": np.zeros((1, 6), np.float32)}))
    out = drain(engine)
    np.testing.assert_array_equal(out["good"].outputs["out"], np.ones((1, 4)))
    err = out["bad"].error
    assert out["bad"].outputs is None and err.status == 400, err.to_wire()
    assert err.code == "model_rejected_input" and "Add node 'add_bias'" in err.message, err.message
    assert "onnxruntime_src" not in err.message


def test_other_onnxruntime_failures_stay_server_errors():
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from engines.onnx.engine import OnnxEngine as Engine
    err = Engine._run_error(Engine(), Fail("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate "
                                           "memory for requested buffer of size 1099511627776"))
    assert err.status == 500 and err.code == "inference_failed"
