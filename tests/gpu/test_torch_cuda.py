"""The torch engine on a CUDA device: TorchScript and exported programs give the CPU's answers
through pinned staging, batched. (An index out of range is a device-side assert on CUDA, which
poisons the context, so request-time model failures are tested on the CPU, tests/unit.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.repository_spec import load_spec
from engines.base import TensorRequest
from engines.torch.engine import TorchEngine
from tests.engine_steps import drain
from tests.torch_models import save_exported, save_torchscript
from tests.unit.test_torch_engine import MLP, MLP_TENSORS, MLP_TOML, pixels

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _pair(tmp_path, kind: str) -> tuple[TorchEngine, TorchEngine]:
    d = tmp_path / kind / "1"
    d.mkdir(parents=True)
    weights = "model.pt" if kind == "ts" else "model.pt2"
    if kind == "ts":
        save_torchscript(MLP(), d / weights, torch.zeros(2, 64))
    else:
        save_exported(MLP(), d / weights, torch.zeros(2, 64), "pixels")
    (d / "model.toml").write_text(MLP_TOML.format(weights=weights, delay=20_000) + MLP_TENSORS)
    engines = []
    for device in ("cpu", "cuda:0"):
        engine = TorchEngine()
        info = engine.load(load_spec(d, kind, 1), device)
        assert info.extra["device"] == device
        engines.append(engine)
    return engines[0], engines[1]


@pytest.mark.parametrize("kind", ["ts", "ep"])
def test_cuda_answers_match_the_cpu(tmp_path, kind):
    cpu, gpu = _pair(tmp_path, kind)
    x = pixels(8, seed=2)
    for i in range(8):
        cpu.submit(TensorRequest(f"r{i}", {"pixels": x[i:i + 1]}))
        gpu.submit(TensorRequest(f"r{i}", {"pixels": x[i:i + 1]}))
    want, got = drain(cpu, 60), drain(gpu, 60)
    for i in range(8):
        np.testing.assert_allclose(got[f"r{i}"].outputs["probabilities"],
                                   want[f"r{i}"].outputs["probabilities"], rtol=1e-4, atol=1e-5)
    assert gpu.stats()["batch_sizes"].get("8") == 1
