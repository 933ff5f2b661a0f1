"""TorchEngine on small real TorchScript and torch.export programs: the same answers as ONNX
Runtime on the same weights, batching, validation, load errors with stable codes, requests the
model fails on, and the loaders never unpickling code."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from daemon.errors import FerryError, InvalidInput
from daemon.repository_spec import load_spec
from engines.base import TensorRequest
from engines.onnx.engine import OnnxEngine
from engines.torch.archive import ArchiveKind, archive_kind, weights_only_loads
from engines.torch.engine import TorchEngine
from tests.engine_steps import drain
from tests.torch_models import save_exported, save_onnx, save_torchscript

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

MLP_TOML = """engine = "torch"
weights = "{weights}"
max_batch_size = 16
[batching]
max_queue_delay_us = {delay}
"""
MLP_TENSORS = """
[[inputs]]
name = "pixels"
dtype = "float32"
shape = [-1, 64]

[[outputs]]
name = "probabilities"
dtype = "float32"
shape = [-1, 10]
"""


class MLP(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(pixels / 16.0), dim=1)


class Lookup(torch.nn.Module):
    """out = table[ids] [B, n, 3]; an id >= 10 fails inside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(30, dtype=torch.float32).reshape(10, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class TwoHeads(torch.nn.Module):
    """Two inputs (float, int64) in, a dict of two outputs out."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"scaled": x * 2.0, "total": (x * mask.to(x.dtype)).sum(dim=1)}


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1.0) * 2.0


def version_dir(tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name / "1"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(d: Path, toml: str, device: str = "cpu") -> tuple[TorchEngine, object]:
    (d / "model.toml").write_text(toml)
    engine = TorchEngine()
    info = engine.load(load_spec(d, d.parent.name, 1), device)
    return engine, info


def mlp_engine(tmp_path: Path, kind: str, delay: int = 0, extra: str = ""
               ) -> tuple[TorchEngine, object]:
    d = version_dir(tmp_path, kind)
    weights = "model.pt" if kind == "ts" else "model.pt2"
    if kind == "ts":
        save_torchscript(MLP(), d / weights, torch.zeros(2, 64))
    else:
        save_exported(MLP(), d / weights, torch.zeros(2, 64), "pixels")
    return load(d, MLP_TOML.format(weights=weights, delay=delay) + MLP_TENSORS + extra)


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (rows, 64)).astype(np.float32)


@pytest.fixture(params=["ts", "ep"])
def mlp(request, tmp_path) -> TorchEngine:
    return mlp_engine(tmp_path, request.param)[0]


# -- answers ---------------------------------------------------------------------------------

def test_torchscript_and_exported_programs_agree_with_onnx_on_the_same_weights(tmp_path):
    d = version_dir(tmp_path, "onnx")
    save_onnx(MLP(), d / "model.onnx", torch.zeros(2, 64), "pixels", "probabilities")
    (d / "model.toml").write_text('engine = "onnx"\nmax_batch_size = 16\n')
    onnx = OnnxEngine()
    onnx.load(load_spec(d, "onnx", 1), "cpu")
    x = pixels(16, seed=3)
    onnx.submit(TensorRequest("r", {"pixels": x}))
    want = drain(onnx)["r"].outputs["probabilities"]
    for kind in ("ts", "ep"):
        engine, _ = mlp_engine(tmp_path, kind)
        engine.submit(TensorRequest("r", {"pixels": x}))
        got = drain(engine)["r"].outputs["probabilities"]
        assert got.dtype == np.float32 and got.shape == (16, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, got[:1])        # rows differ: a real model ran


def test_load_reports_the_programs_tensors_and_memory(tmp_path):
    engine, info = mlp_engine(tmp_path, "ts")
    assert info.platform == "pytorch_libtorch" and info.extra["format"] == "torchscript"
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("pixels", "float32", (-1, 64))]
    params = sum(p.numel() * 4 for p in MLP().parameters())
    assert info.extra["memory_bytes"] == params
    d = version_dir(tmp_path, "bare")
    save_exported(MLP(), d / "model.pt2", torch.zeros(2, 64), "pixels", max_batch=16)
    _, info = load(d, 'engine = "torch"\nweights = "model.pt2"\nmax_batch_size = 16\n')
    assert info.platform == "pytorch_export" and info.extra["memory_bytes"] == params
    # nothing declared: the exported program states its own tensors
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("pixels", "float32", (-1, 64))]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [("output", "float32", (-1, 10))]


@pytest.mark.parametrize("save", ["script", "export"])
def test_two_inputs_and_a_dict_of_outputs(tmp_path, save):
    d = version_dir(tmp_path)
    x = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.int64)
    if save == "script":
        torch.jit.script(TwoHeads()).save(str(d / "model.pt"))
        weights, tensors = "model.pt", """
[[inputs]]
name = "mask"
dtype = "int64"
shape = [-1, 3]
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, 3]
[[outputs]]
name = "total"
dtype = "float32"
shape = [-1]
[[outputs]]
name = "scaled"
dtype = "float32"
shape = [-1, 3]
"""
    else:
        batch = torch.export.Dim("batch", min=1, max=8)
        program = torch.export.export(TwoHeads(), (x, mask),
                                      dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
        torch.export.save(program, str(d / "model.pt2"))
        weights, tensors = "model.pt2", ""
    engine, info = load(d, f'engine = "torch"\nweights = "{weights}"\nmax_batch_size = 8\n'
                        + tensors)
    assert {t.name: t.dtype for t in info.outputs} == {"scaled": "float32", "total": "float32"}
    xs = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = np.array([[1, 0, 1], [0, 0, 1]], np.int64)
    engine.submit(TensorRequest("a", {"x": xs, "mask": m}))
    engine.submit(TensorRequest("b", {"x": xs[:1], "mask": m[:1]}, outputs=["total"]))
    out = drain(engine)
    np.testing.assert_allclose(out["a"].outputs["scaled"], xs * 2)
    np.testing.assert_allclose(out["a"].outputs["total"], [2.0, 5.0])
    assert list(out["b"].outputs) == ["total"] and out["b"].outputs["total"].tolist() == [2.0]
    if save == "export":     # both inputs share the batch symbol: rows must agree
        with pytest.raises(InvalidInput) as err:
            engine.submit(TensorRequest("c", {"x": xs, "mask": m[:1]}))
        assert err.value.code == "invalid_shape"


# -- batching --------------------------------------------------------------------------------

def test_concurrent_submits_are_batched_and_each_gets_its_own_answer(tmp_path):
    for kind in ("ts", "ep"):
        engine, _ = mlp_engine(tmp_path, kind, delay=50_000)
        x = pixels(8, seed=1)
        alone = []
        for i in range(8):
            engine.submit(TensorRequest(f"solo{i}", {"pixels": x[i:i + 1]}))
            alone.append(drain(engine)[f"solo{i}"].outputs["probabilities"])
        before = engine.stats()["batch_sizes"]
        for i in range(8):
            engine.submit(TensorRequest(f"r{i}", {"pixels": x[i:i + 1]}))
        out = drain(engine)
        for i in range(8):
            assert out[f"r{i}"].batch_size == 8
            np.testing.assert_allclose(out[f"r{i}"].outputs["probabilities"], alone[i],
                                       rtol=1e-5, atol=1e-6)
        after = engine.stats()
        assert after["batch_sizes"].get("8", 0) == before.get("8", 0) + 1
        assert after["requests"] == 16 and after["failed"] == 0


def test_a_request_the_model_fails_on_is_the_clients_error_and_spares_its_batch_mates(tmp_path):
    for kind in ("ts", "ep"):
        d = version_dir(tmp_path, kind)
        if kind == "ts":
            torch.jit.script(Lookup()).save(str(d / "model.pt"))
            weights = "model.pt"
        else:
            save_exported(Lookup(), d / "model.pt2", torch.zeros(2, 4, dtype=torch.int64), "ids")
            weights = "model.pt2"
        engine, _ = load(d, f'engine = "torch"\nweights = "{weights}"\nmax_batch_size = 8\n'
                         '[[inputs]]\nname = "ids"\ndtype = "int64"\nshape = [-1, 4]\n'
                         '[[outputs]]\nname = "out"\ndtype = "float32"\nshape = [-1, 4, 3]\n'
                         '[batching]\nmax_queue_delay_us = 50000\n')
        engine.submit(TensorRequest("good", {"ids": np.array([[1, 2, 0, 0]], np.int64)}))
        engine.submit(TensorRequest("bad", {"ids": np.array([[1, 99, 0, 0]], np.int64)}))
        out = drain(engine)
        np.testing.assert_array_equal(out["good"].outputs["out"][0, :2], [[3, 4, 5], [6, 7, 8]])
        err = out["bad"].error
        assert out["bad"].outputs is None and (err.code, err.status) == ("model_rejected_input",
                                                                         400)
        assert "99" in err.message or "index" in err.message.lower()
        assert engine.stats()["failed"] == 1


# -- bad requests ----------------------------------------------------------------------------

BAD_INPUTS = [
    ({"pixels": pixels(1), "z": pixels(1)}, "unknown_input", "z"),
    ({}, "missing_input", "pixels"),
    ({"pixels": pixels(1).astype(np.float64)}, "invalid_dtype", "pixels"),
    ({"pixels": pixels(1).astype(np.int32)}, "invalid_dtype", "pixels"),
    ({"pixels": np.ones((1, 63), np.float32)}, "invalid_shape", "pixels"),
    ({"pixels": np.ones((1, 64, 1), np.float32)}, "invalid_shape", "pixels"),
    ({"pixels": np.ones((0, 64), np.float32)}, "invalid_shape", "pixels"),
    ({"pixels": pixels(17)}, "batch_too_large", None),
    ({"pixels": [[1.0] * 64]}, "invalid_dtype", "pixels"),
]


@pytest.mark.parametrize("inputs, code, param", BAD_INPUTS)
def test_bad_inputs_are_refused_at_submit(mlp, inputs, code, param):
    with pytest.raises(InvalidInput) as err:
        mlp.submit(TensorRequest("bad", inputs))
    assert (err.value.code, err.value.status, err.value.param) == (code, 400, param)
    assert not mlp.has_work()


def test_dims_outside_the_exported_range_are_refused_at_submit(tmp_path):
    d = version_dir(tmp_path)
    seq = torch.export.Dim("seq", min=2, max=6)
    program = torch.export.export(Lookup(), (torch.zeros(2, 4, dtype=torch.int64),),
                                  dynamic_shapes={"ids": {0: torch.export.Dim("b", min=1,
                                                                            max=8), 1: seq}})
    torch.export.save(program, str(d / "model.pt2"))
    engine, info = load(d, 'engine = "torch"\nweights = "model.pt2"\nmax_batch_size = 8\n')
    assert info.inputs[0].shape == (-1, -1)
    for n in (1, 7):
        with pytest.raises(InvalidInput) as err:
            engine.submit(TensorRequest("x", {"ids": np.zeros((1, n), np.int64)}))
        assert err.value.code == "invalid_shape" and "2..6" in err.value.message
    engine.submit(TensorRequest("ok", {"ids": np.zeros((1, 6), np.int64)}))
    assert drain(engine)["ok"].outputs["output"].shape == (1, 6, 3)


def test_a_read_only_input_is_never_written_by_an_in_place_model(tmp_path):
    d = version_dir(tmp_path)
    torch.jit.script(InPlace()).save(str(d / "model.pt"))
    engine, _ = load(d, 'engine = "torch"\nmax_batch_size = 4\n'
                     '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 2]\n'
                     '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 2]\n')
    x = np.ones((1, 2), np.float32)
    x.setflags(write=False)                 # as a shared-memory view arrives
    engine.submit(TensorRequest("r", {"x": x}))
    assert drain(engine)["r"].outputs["y"].tolist() == [[4.0, 4.0]]
    assert x.tolist() == [[1.0, 1.0]]


def test_an_unloaded_engine_refuses_requests(mlp):
    mlp.unload()
    with pytest.raises(FerryError) as err:
        mlp.submit(TensorRequest("r", {"pixels": pixels(1)}))
    assert (err.value.code, err.value.status) == ("model_unavailable", 503)


# -- load errors -----------------------------------------------------------------------------

def _onnx_bytes(tmp_path: Path) -> bytes:
    return save_onnx(MLP(), tmp_path / "x.onnx", torch.zeros(2, 64), "pixels", "p").read_bytes()


def _state_dict(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(MLP().state_dict(), buf)
    return buf.getvalue()


def _legacy_pickle(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(MLP().state_dict(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("make, fragment", [
    (_onnx_bytes, 'looks like an ONNX model: serve it with engine = "onnx"'),
    (_state_dict, "plain torch.save pickle"),
    (_legacy_pickle, "legacy (pre-zip) torch.save pickle"),
    (lambda _: os.urandom(4096), "not a TorchScript (.pt) or torch.export (.pt2) archive"),
    (lambda _: b"", "the file is empty"),
    (lambda _: b"PK\x03\x04" + b"\0" * 200, "damaged zip archive"),
])
def test_files_that_are_not_torch_programs_fail_to_load_clearly(tmp_path, make, fragment):
    d = version_dir(tmp_path)
    (d / "model.pt").write_bytes(make(tmp_path))
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt", delay=0) + MLP_TENSORS)
    assert (err.value.code, err.value.status) == ("model_load_failed", 422)
    assert fragment in err.value.message


def test_an_exported_program_named_pt_is_told_by_its_content(tmp_path):
    d = version_dir(tmp_path)
    save_exported(MLP(), d / "model.pt", torch.zeros(2, 64), "pixels", max_batch=16)
    assert archive_kind(d / "model.pt") is ArchiveKind.EXPORTED
    _, info = load(d, 'engine = "torch"\nmax_batch_size = 16\n')
    assert info.platform == "pytorch_export"


TS_MISMATCHES = [
    ("", "does not state its tensors' dtypes and shapes"),
    (MLP_TENSORS.replace('name = "pixels"', 'name = "image"'),
     "declares input 'image', but forward(pixels: Tensor)"),
    (MLP_TENSORS + '[[outputs]]\nname = "extra"\ndtype = "float32"\nshape = [-1]\n',
     "declares 2 outputs"),
    (MLP_TENSORS.replace("shape = [-1, 64]", "shape = [-1, 32]"),
     "fails on zeros of the declared input shapes"),
    (MLP_TENSORS.replace('dtype = "float32"\nshape = [-1, 10]',
                         'dtype = "int64"\nshape = [-1, 10]'),
     "output 'probabilities' is float32 [1, 10], declared int64 [-1, 10]"),
    (MLP_TENSORS.replace("shape = [-1, 10]", "shape = [-1, 12]"), "declared float32 [-1, 12]"),
]


@pytest.mark.parametrize("tensors, fragment", TS_MISMATCHES)
def test_a_torchscript_signature_that_disagrees_with_model_toml_fails_to_load(tmp_path, tensors,
                                                                                fragment):
    d = version_dir(tmp_path)
    save_torchscript(MLP(), d / "model.pt", torch.zeros(2, 64))
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt", delay=0) + tensors)
    assert (err.value.code, err.value.status) == ("model_load_failed", 422)
    assert fragment in err.value.message


EP_MISMATCHES = [
    (MLP_TENSORS.replace('name = "pixels"', 'name = "image"'), "declares input 'image', which "
     "the graph lacks"),
    (MLP_TENSORS.replace('dtype = "float32"\nshape = [-1, 64]',
                         'dtype = "float16"\nshape = [-1, 64]'),
     "declares input 'pixels' as float16 [-1, 64], the graph has float32 [-1, 64]"),
    (MLP_TENSORS.replace("shape = [-1, 64]", "shape = [-1, 32]"), "as float32 [-1, 32]"),
    (MLP_TENSORS + '[[outputs]]\nname = "extra"\ndtype = "float32"\nshape = [-1]\n',
     "declares 2 outputs"),
]


@pytest.mark.parametrize("tensors, fragment", EP_MISMATCHES)
def test_an_exported_signature_that_disagrees_with_model_toml_fails_to_load(tmp_path, tensors,
                                                                              fragment):
    d = version_dir(tmp_path)
    save_exported(MLP(), d / "model.pt2", torch.zeros(2, 64), "pixels", max_batch=16)
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt2", delay=0) + tensors)
    assert (err.value.code, err.value.status) == ("model_load_failed", 422)
    assert fragment in err.value.message


def test_an_exported_batch_range_must_cover_max_batch_size(tmp_path):
    d = version_dir(tmp_path)
    save_exported(MLP(), d / "model.pt2", torch.zeros(2, 64), "pixels", max_batch=8)
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt2", delay=0))      # max_batch_size 16
    assert err.value.code == "model_load_failed" and "batches of 1..8" in err.value.message
    program = torch.export.export(MLP(), (torch.zeros(2, 64),))     # a static batch of 2
    torch.export.save(program, str(d / "model.pt2"))
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt2", delay=0))
    assert err.value.code == "model_load_failed" and "dynamic first dimension" in \
        err.value.message


@pytest.mark.parametrize("section, param", [
    ("[torch]\ncompile = true\n", "torch.compile"),          # TorchScript cannot be compiled
    ("[torch]\ncompile = \"fastest\"\n", "torch.compile"),
    ("[torch]\nnum_threads = -1\n", "torch.num_threads"),
    ("[torch]\nnum_threads = true\n", "torch.num_threads"),
    ("[torch]\nwarmup = 1\n", "torch.warmup"),
    ("[torch]\nthreads = 2\n", "torch"),
])
def test_bad_torch_options_are_config_errors(tmp_path, section, param):
    d = version_dir(tmp_path)
    save_torchscript(MLP(), d / "model.pt", torch.zeros(2, 64))
    with pytest.raises(InvalidInput) as err:
        load(d, MLP_TOML.format(weights="model.pt", delay=0) + MLP_TENSORS + section)
    assert (err.value.code, err.value.param) == ("invalid_model_config", param)


def test_a_device_this_torch_lacks_fails_to_load(tmp_path):
    d = version_dir(tmp_path)
    save_torchscript(MLP(), d / "model.pt", torch.zeros(2, 64))
    device = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for bad in (device, "tpu"):
        with pytest.raises(FerryError) as err:
            load(d, MLP_TOML.format(weights="model.pt", delay=0) + MLP_TENSORS, device=bad)
        assert err.value.code == "model_load_failed"


class Relu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + 1


def _rewrite(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """Copy an archive with `old` replaced by `new` in its code (TorchScript source, the
    exported graph's JSON); debug records, which index the old source, are left out."""
    with zipfile.ZipFile(src) as zs, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zd:
        for item in zs.infolist():
            if item.filename.endswith(".debug_pkl"):
                continue
            data = zs.read(item.filename)
            if item.filename.endswith((".py", ".json")):
                data = data.replace(old, new)
            zd.writestr(item, data)


def test_an_operator_the_runtime_lacks_is_named_at_load(tmp_path):
    # What a program calling a custom op looks like where its library was never loaded.
    d = version_dir(tmp_path)
    x = torch.zeros(2, 4)
    torch.jit.script(Relu()).save(str(tmp_path / "ok.pt"))
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.export.save(torch.export.export(Relu(), (x,), dynamic_shapes={"x": {0: batch}}),
                      str(tmp_path / "ok.pt2"))
    _rewrite(tmp_path / "ok.pt", d / "model.pt", b"torch.relu(", b"ops.ferrytest.relu(")
    _rewrite(tmp_path / "ok.pt2", d / "model.pt2", b"torch.ops.aten.relu.default",
             b"torch.ops.ferrytest.relu.default")
    tensors = ('[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
               '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 4]\n')
    for weights in ("model.pt", "model.pt2"):
        with pytest.raises(FerryError) as err:
            load(d, f'engine = "torch"\nweights = "{weights}"\nmax_batch_size = 8\n' + tensors)
        assert err.value.code == "model_load_failed"
        assert "ferrytest" in err.value.message and "runtime lacks" in err.value.message


class _Planted:
    """Unpickling this creates a file: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_inside_an_exported_program_are_never_unpickled_as_code(tmp_path):
    d = version_dir(tmp_path)
    save_exported(MLP(), tmp_path / "good.pt2", torch.zeros(2, 64), "pixels", max_batch=16)
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(((_Planted(marker),), {}), evil)
    with zipfile.ZipFile(tmp_path / "good.pt2") as src, \
            zipfile.ZipFile(d / "model.pt2", "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("sample_inputs/model.pt"):
                data = evil.getvalue()      # torch.export.load unpickles this one
            dst.writestr(item, data)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(FerryError) as err:
        load(d, MLP_TOML.format(weights="model.pt2", delay=0))
    assert err.value.code == "model_load_failed"
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before    # the guard is undone


def test_the_weights_only_guard_nests_across_concurrent_loads(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with weights_only_loads():
        with weights_only_loads():
            assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
            assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"   # the outer load is inside
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


# -- options ---------------------------------------------------------------------------------

def test_threads_come_from_the_torch_section_and_the_environment(tmp_path, monkeypatch):
    _, info = mlp_engine(tmp_path, "ts", extra="[torch]\nnum_threads = 2\n")
    assert info.extra["threads"] == 2
    monkeypatch.setenv("FERRY_TORCH_THREADS", "1")
    _, info = mlp_engine(tmp_path, "ep", extra="[torch]\nnum_threads = 2\n")
    assert info.extra["threads"] == 1
    monkeypatch.setenv("FERRY_TORCH_THREADS", "two")
    with pytest.raises(FerryError) as err:
        mlp_engine(tmp_path, "ts")
    assert err.value.code == "model_load_failed" and "FERRY_TORCH_THREADS" in err.value.message


def test_torch_compile_gives_the_same_answers(tmp_path):
    plain, _ = mlp_engine(tmp_path, "ep")
    d = version_dir(tmp_path, "compiled")
    save_exported(MLP(), d / "model.pt2", torch.zeros(2, 64), "pixels")
    compiled, info = load(d, MLP_TOML.format(weights="model.pt2", delay=0) + MLP_TENSORS
                          + "[torch]\ncompile = true\n")
    assert info.extra["compile"] == "default"
    for rows in (1, 5, 16):                 # dynamic batch: no recompile per size needed
        x = pixels(rows, seed=rows)
        plain.submit(TensorRequest("p", {"pixels": x}))
        compiled.submit(TensorRequest("c", {"pixels": x}))
        np.testing.assert_allclose(drain(compiled, 60)["c"].outputs["probabilities"],
                                   drain(plain)["p"].outputs["probabilities"],
                                   rtol=1e-5, atol=1e-6)


def test_warmup_can_be_turned_off(tmp_path):
    # Without the zero run a wrong declared dtype surfaces at the first request: a 500, not 400.
    d = version_dir(tmp_path)
    save_torchscript(MLP(), d / "model.pt", torch.zeros(2, 64))
    engine, _ = load(d, MLP_TOML.format(weights="model.pt", delay=0) + MLP_TENSORS.replace(
        'dtype = "float32"\nshape = [-1, 10]', 'dtype = "float64"\nshape = [-1, 10]')
        + "[torch]\nwarmup = false\n")
    engine.submit(TensorRequest("r", {"pixels": pixels(1)}))
    err = drain(engine)["r"].error
    assert (err.code, err.status) == ("inference_failed", 500) and "float64" in err.message




def test_exported_programs_load_side_by_side_on_worker_threads(tmp_path):
    # Models load on worker threads; torch.export.load keeps its deserializer in a global.
    import threading
    dirs = []
    for i in range(4):
        d = version_dir(tmp_path, f"m{i}")
        save_exported(MLP(seed=i), d / "model.pt2", torch.zeros(2, 64), "pixels", max_batch=16)
        (d / "model.toml").write_text(MLP_TOML.format(weights="model.pt2", delay=0))
        dirs.append(d)
    errors: list[BaseException] = []

    def work(d: Path) -> None:
        try:
            TorchEngine().load(load_spec(d, d.parent.name, 1), "cpu")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
