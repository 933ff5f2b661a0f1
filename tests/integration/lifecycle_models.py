"""Tiny ONNX models built with onnx.helper for the lifecycle, upload and vision tests.

- `const_digits`: the digits interface (pixels [B, 64] → probabilities [B, 10]) whose answer is
  always one class: a version whose output tells it apart from the trained digits model.
- `slow_echo`: y = x ([B, 1]) through `depth` [n, n] matrix products, so a request stays in
  flight long enough to unload the model under it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIGITS_SECTIONS = """
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
"""


def _save(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def const_digits_onnx(cls: int) -> bytes:
    """probabilities = pixels @ 0 + onehot(cls): always class `cls`, whatever the image."""
    bias = np.zeros(10, dtype=np.float32)
    bias[cls] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "W"], ["z"]),
         helper.make_node("Add", ["z", "B"], ["probabilities"])],
        "const_digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.zeros((64, 10), np.float32), "W"),
         numpy_helper.from_array(bias, "B")])
    return _save(graph)


def const_digits_toml(extra: str = DIGITS_SECTIONS) -> str:
    return ('engine = "onnx"\nweights = "model.onnx"\nmax_batch_size = 64\n'
            "[batching]\nmax_queue_delay_us = 100\n" + extra)


def slow_echo_onnx(n: int = 256, depth: int = 80) -> bytes:
    """y = mean(x * ones[n, n] @ I @ I ...) = x, after `depth` [n, n] products per request."""
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),          # [B, 1, 1]
             helper.make_node("Mul", ["x3", "ones"], ["h0"])]               # [B, n, n]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "eye"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{depth}"], ["y"], axes=[1, 2], keepdims=0))
    nodes.append(helper.make_node("Unsqueeze", ["y", "axes1"], ["out"]))   # [B, 1]
    graph = helper.make_graph(
        nodes, "slow_echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.ones((n, n), np.float32), "ones"),
         numpy_helper.from_array(np.eye(n, dtype=np.float32), "eye"),
         numpy_helper.from_array(np.array([2], np.int64), "axes"),
         numpy_helper.from_array(np.array([1], np.int64), "axes1")])
    return _save(graph)


SLOW_TOML = ('engine = "onnx"\nweights = "model.onnx"\nmax_batch_size = 1\n'
             "[batching]\nmax_queue_delay_us = 0\n")


def write_version(repo: Path, name: str, version: int, files: dict[str, bytes | str]) -> Path:
    """Write a version elsewhere in the repository (a dot directory the scan ignores), then
    rename it into place: a poller never sees half a version."""
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=repo))
    try:
        for fname, data in files.items():
            mode = "w" if isinstance(data, str) else "wb"
            with open(staging / fname, mode) as f:
                f.write(data)
        (repo / name).mkdir(exist_ok=True)
        final = repo / name / str(version)
        os.rename(staging, final)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_version(src: Path, repo: Path, name: str, version: int) -> Path:
    """A real copy (not a symlink: uploads and swaps must not write into the shared demo
    repository)."""
    files: dict[str, bytes | str] = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    return write_version(repo, name, version, files)


def slow_loop_repo(root: Path, iterations: int = 200, n: int = 128) -> Path:
    """A repository with `slow`: y = x after `iterations` dependent n×n matmuls (~20 ms here,
    a few ms on fast hardware: the loop is sequential however many cores), one request at a
    time (max_batch_size 0), so a batch of them takes a while on any machine."""
    vi = helper.make_tensor_value_info
    w = numpy_helper.from_array(np.full((n, n), 1.0 / n, np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]),
         helper.make_node("MatMul", ["a", "w"], ["a_out"])], "body",
        [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []),
         vi("a", TensorProto.FLOAT, [n, n])],
        [vi("c_out", TensorProto.BOOL, []), vi("a_out", TensorProto.FLOAT, [n, n])], [w])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Expand", ["s", "shape"], ["a0"]),   # input-dependent: no folding
             helper.make_node("Loop", ["trip", "cond", "a0"], ["a_last"], body=body),
             helper.make_node("ReduceMean", ["a_last"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array([n, n], np.int64), "shape"),
             numpy_helper.from_array(np.array(iterations, np.int64), "trip"),
             numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "slow", [vi("x", TensorProto.FLOAT, [1, 4])],
                              [vi("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    vdir = root / "slow" / "1"
    vdir.mkdir(parents=True)
    onnx.save(model, vdir / "model.onnx")
    (vdir / "model.toml").write_text('engine = "onnx"\nweights = "model.onnx"\n'
                                     'max_batch_size = 0\n')
    return root
