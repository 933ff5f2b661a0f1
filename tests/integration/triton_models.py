"""Triton's standard demo models, built with onnx in code, as a Ferry model repository.

`simple` (INT32 INPUT0/INPUT1 [-1, 16], max_batch_size 8 -> OUTPUT0 = sum, OUTPUT1 =
difference), `simple_string` (the same on BYTES tensors holding decimal strings: Cast string ->
int32 -> string), `simple_identity` (BYTES pass-through), `custom_identity_int32`, and the
int8/fp16/fp32 variants of `simple`, which bring the repository to the seven models Triton's
model-control example counts in its index.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

__all__ = ["build_repository", "MODELS"]

_DTYPES = {TensorProto.INT32: "int32", TensorProto.INT8: "int8", TensorProto.FLOAT16: "float16",
           TensorProto.FLOAT: "float32", TensorProto.STRING: "bytes"}


def _io(name: str, dtype: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, ["batch", 16])      # [B, 16]


def _save(nodes: list, inputs: list, outputs: list, path: Path) -> None:
    model = helper.make_model(helper.make_graph(nodes, path.parent.parent.name, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                      # what the installed onnxruntime reads
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _add_sub(dtype: int, path: Path) -> None:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1; strings go through int32."""
    nodes, a, b = [], "INPUT0", "INPUT1"
    if dtype == TensorProto.STRING:
        nodes += [helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
                  helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32)]
        a, b = "a", "b"
    s, d = ("s", "d") if dtype == TensorProto.STRING else ("OUTPUT0", "OUTPUT1")
    nodes += [helper.make_node("Add", [a, b], [s]), helper.make_node("Sub", [a, b], [d])]
    if dtype == TensorProto.STRING:
        nodes += [helper.make_node("Cast", ["s"], ["OUTPUT0"], to=TensorProto.STRING),
                  helper.make_node("Cast", ["d"], ["OUTPUT1"], to=TensorProto.STRING)]
    _save(nodes, [_io("INPUT0", dtype), _io("INPUT1", dtype)],
          [_io("OUTPUT0", dtype), _io("OUTPUT1", dtype)], path)


def _identity(dtype: int, path: Path) -> None:
    _save([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], [_io("INPUT0", dtype)],
          [_io("OUTPUT0", dtype)], path)


MODELS = {
    "simple": (_add_sub, TensorProto.INT32),
    "simple_string": (_add_sub, TensorProto.STRING),
    "simple_identity": (_identity, TensorProto.STRING),
    "custom_identity_int32": (_identity, TensorProto.INT32),
    "simple_int8": (_add_sub, TensorProto.INT8),
    "simple_fp16": (_add_sub, TensorProto.FLOAT16),
    "simple_fp32": (_add_sub, TensorProto.FLOAT),
}

_TOML = """\
# Triton's demo model {name!r}, built by tests/integration/triton_models.py.
engine = "onnx"
weights = "model.onnx"
max_batch_size = 8

[batching]
max_queue_delay_us = 100
"""


def build_repository(root: Path, names: tuple[str, ...] = tuple(MODELS)) -> Path:
    for name in names:
        build, dtype = MODELS[name]
        version = root / name / "1"
        version.mkdir(parents=True)
        build(dtype, version / "model.onnx")
        (version / "model.toml").write_text(_TOML.format(name=name))
    return root
