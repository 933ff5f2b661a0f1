"""The diffusion engine's progress records and latency histograms, in-process on a tiny random
Stable Diffusion pipeline: a request that asks for progress gets one record per image per
denoising step, in order, before its result; one that does not gets none; the step and image
histograms count exactly the forwards and images the engine ran."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from engines.base import ModelSpec, ProgressOutput, TensorRequest, TensorResult

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engines.diffusion.engine import DiffusionEngine
    from engines.diffusion.tiny import build_tiny_sd
    root = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(root / "pipeline")
    e = DiffusionEngine()
    e.load(ModelSpec("tiny", 1, "diffusion", root, weights="pipeline",
                     sections={"diffusion": {"max_batch": 2}}), "cpu")
    yield e
    e.unload()


def _request(rid: str, steps: int, n: int = 1, progress: bool = True) -> TensorRequest:
    return TensorRequest(rid, {"prompt": np.array([b"a cat"], dtype=object),
                               "seed": np.array([3]), "num_inference_steps": np.array([steps]),
                               "num_images": np.array([n])}, progress=progress)


def _drain(engine, limit_s: float = 50.0) -> list:
    out: list = []
    deadline = time.monotonic() + limit_s
    while engine.has_work():
        out += engine.step()
        assert time.monotonic() < deadline, "the engine did not finish in time"
    return out


def test_progress_is_one_record_per_image_per_step_before_the_result(engine):
    engine.submit(_request("p", steps=4, n=3))      # max_batch 2: image 2 runs after 0 and 1
    engine.submit(_request("quiet", steps=2, progress=False))
    records = _drain(engine)
    mine = [r for r in records if r.id == "p"]
    progress = [r for r in mine if isinstance(r, ProgressOutput)]
    assert all(isinstance(r, ProgressOutput) for r in mine[:-1])
    assert isinstance(mine[-1], TensorResult) and mine[-1].error is None
    for image in range(3):
        assert [(r.step, r.steps) for r in progress if r.image == image] == \
            [(s, 4) for s in range(1, 5)]
    assert len(progress) == 12
    assert not [r for r in records if r.id == "quiet" and isinstance(r, ProgressOutput)]


def test_cancel_ends_the_progress(engine):
    engine.submit(_request("c", steps=50))
    seen = []
    while len(seen) < 2:
        seen += [r for r in engine.step() if isinstance(r, ProgressOutput)]
    final = engine.cancel("c")
    assert len(final) == 1 and final[0].error is not None
    assert not [r for r in _drain(engine) if r.id == "c"]
    assert engine.stats()["active_rows"] == 0


def test_histograms_count_the_forwards_and_images_run(engine):
    before = engine.stats()
    engine.submit(_request("h1", steps=3, n=2))
    _drain(engine)
    engine.submit(_request("h2", steps=5, n=1))
    _drain(engine)
    after = engine.stats()
    step = after["diffusion_latency"]["step"]
    image = after["diffusion_latency"]["image"]
    b_step = before["diffusion_latency"]["step"]
    b_image = before["diffusion_latency"]["image"]
    # alone, each request's rows share every forward: 3 forwards, then 5
    assert sum(step["counts"]) - sum(b_step["counts"]) == 8 == after["steps"] - before["steps"]
    assert sum(image["counts"]) - sum(b_image["counts"]) == 3 == \
        after["images"] - before["images"]
    assert after["row_steps"] - before["row_steps"] == 2 * 3 + 5
    assert step["sum"] > b_step["sum"] and image["sum"] > b_image["sum"]
    assert len(step["counts"]) == len(step["bounds"]) + 1
