"""The diffusion engine in-process on a tiny random Stable Diffusion pipeline (built in code,
saved in the diffusers layout): reproducibility, step-level batching, buckets, cancellation,
deadlines, schedulers and every refused input."""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.errors import Cancelled, DeadlineExceeded, FerryError, InvalidInput
from engines.base import ModelSpec, TensorRequest

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from engines.diffusion.tiny import build_tiny_sd
    root = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(root / "pipeline")
    return root


def load_engine(root: Path, name: str = "tiny", **section):
    """A DiffusionEngine serving the diffusers directory `root`/pipeline on the CPU."""
    from engines.diffusion.engine import DiffusionEngine
    engine = DiffusionEngine()
    engine.load(ModelSpec(name, 1, "diffusion", root, weights="pipeline",
                          sections={"diffusion": section}), "cpu")
    return engine


@pytest.fixture(scope="module")
def engine(tiny_sd):
    e = load_engine(tiny_sd, max_batch=2)
    yield e
    e.unload()


@pytest.fixture(scope="module")
def exact(tiny_sd):
    """batch_invariant: each row in a forward of its own."""
    e = load_engine(tiny_sd, max_batch=4, batch_invariant=True)
    yield e
    e.unload()


def req(rid: str, seed: int = 1, steps: int = 3, prompt: bytes = b"a photo of a cat", **kw):
    inputs = {"prompt": np.array([prompt], dtype=object), "seed": np.array([seed]),
              "num_inference_steps": np.array([steps])}
    for k, v in kw.items():
        inputs[k] = v if isinstance(v, np.ndarray) else np.array([v])
    return TensorRequest(rid, inputs)


def run(engine, requests, until=None, limit_s: float = 50.0):
    """Submit `requests`, step until all finish (or `until(results)` holds)."""
    for r in requests:
        engine.submit(r)
    results = {}
    deadline = time.monotonic() + limit_s
    while engine.has_work():
        for res in engine.step():
            results[res.id] = res
        if until is not None and until(results):
            break
        assert time.monotonic() < deadline, "engine did not finish in time"
    return results


def digest(res) -> list[str]:
    assert res.error is None, res.error
    return [hashlib.sha256(p).hexdigest() for p in res.outputs["images"]]


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def company_of(r):
    """`r` amid others: more steps, another size, another prompt, 2 images."""
    return [req("x", seed=7, steps=5), r, req("y", seed=9, width=16, height=16, num_images=2),
            req("z", seed=42, prompt=b"a dog")]


def test_png_is_the_requested_size_and_seed_reproduces_alone_and_in_company(exact):
    from PIL import Image
    alone = run(exact, [req("a", seed=42, num_images=2)])["a"]
    image = Image.open(io.BytesIO(alone.outputs["images"][0]))
    assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    assert alone.outputs["seeds"].tolist() == [42, 43]
    assert digest(run(exact, [req("a", seed=42, num_images=2)])["a"]) == digest(alone)
    company = run(exact, company_of(req("a", seed=42, num_images=2)))
    assert digest(company["a"]) == digest(alone)
    # image i of a request is image 0 of a request seeded seed + i
    assert digest(run(exact, [req("b", seed=43)])["b"])[0] == digest(alone)[1]
    assert digest(company["z"])[0] != digest(alone)[0]       # the prompt matters
    assert len(set(digest(alone))) == 2
    assert exact.describe()["batch_invariant"] is True


def test_batched_rows_stay_within_a_level_of_the_same_seed_alone(engine):
    """Without batch_invariant, rows of other requests share the forward: the same seed gives
    the same bytes alone (and in the same company); beside others a GEMM's float sums may move
    a few pixels by one level, never the picture."""
    alone = run(engine, [req("a", seed=42, num_images=2)])["a"]
    assert digest(run(engine, [req("a", seed=42, num_images=2)])["a"]) == digest(alone)
    company = run(engine, company_of(req("a", seed=42, num_images=2)))["a"]
    for mine, ref in zip(company.outputs["images"], alone.outputs["images"]):
        diff = np.abs(pixels(mine) - pixels(ref))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert engine.describe()["batch_invariant"] is False


def test_a_short_request_does_not_wait_behind_a_long_one(engine):
    before = engine.stats()["steps"]
    engine.submit(req("long", steps=40))
    run(engine, [], until=lambda r: engine.stats()["steps"] - before >= 2)
    short_steps = engine.stats()["steps"]
    results = run(engine, [req("short", steps=3)], until=lambda r: "short" in r)
    assert results["short"].error is None
    # joined the running batch at a step boundary: done 3 steps later, its PNG encoded
    # while the long one's next steps ran (a step or two)
    assert engine.stats()["steps"] - short_steps <= 6
    assert "long" not in results and engine.has_work()
    assert engine.cancel("long")[0].error.code == "cancelled"
    assert not engine.has_work()


def test_rows_batch_in_one_forward_and_sizes_interleave(engine):
    before = dict(engine.stats()["rows_per_step"])
    steps_before = engine.stats()["steps"]
    res = run(engine, [req("p", steps=4), req("q", steps=4),
                       req("r", steps=4, width=16, height=24)])
    assert all(v.error is None for v in res.values())
    after = engine.stats()
    # p and q share each forward (max_batch 2); r's size has its own bucket, taking turns
    assert after["rows_per_step"]["2"] - before.get("2", 0) == 4
    assert after["steps"] - steps_before == 8
    assert after["step_latency_s"]["count"] > 0 and after["image_latency_s"]["p99"] > 0


def test_cancel_frees_the_slot_at_the_next_step(engine):
    engine.submit(req("big", steps=50, num_images=2))        # fills both slots
    engine.submit(req("small", steps=2))
    run(engine, [], until=lambda r: engine.stats()["steps"] >= 0 and
        engine.stats()["active_rows"] == 2)
    assert engine.stats()["waiting_rows"] == 1
    (out,) = engine.cancel("big")
    assert isinstance(out.error, Cancelled)
    assert engine.cancel("big") == []                         # idempotent
    results = run(engine, [])
    assert set(results) == {"small"} and results["small"].error is None
    assert engine.stats()["active_rows"] == 0


def test_deadline_fails_the_request_and_frees_its_rows(engine):
    r = req("late", steps=150)                 # seconds of steps even on a fast CPU
    r.deadline = time.monotonic() + 0.05
    results = run(engine, [r])
    assert isinstance(results["late"].error, DeadlineExceeded)
    assert engine.stats()["active_rows"] == 0 and engine.stats()["expired"] >= 1


def test_guidance_scale_changes_the_image_and_latents_come_out(engine):
    one = run(engine, [req("g1", seed=3, guidance_scale=1.0)])["g1"]
    many = run(engine, [req("g8", seed=3, guidance_scale=8.0)])["g8"]
    assert digest(one) != digest(many)
    lat_req = req("lat", seed=3, guidance_scale=1.0)
    lat_req.outputs = ["latents", "images"]
    lat = run(engine, [lat_req])["lat"]
    assert lat.outputs["latents"].shape == (1, 4, 16, 16)
    assert digest(lat) == digest(one) and "seeds" not in lat.outputs


def test_given_latents_replace_the_seeded_noise(engine):
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    a = run(engine, [req("l1", seed=1, latents=noise)])["l1"]
    b = run(engine, [req("l2", seed=2, latents=noise)])["l2"]
    assert digest(a) == digest(b)     # deterministic scheduler: the noise decides


@pytest.mark.parametrize("inputs,param", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 151}, "num_inference_steps"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": 20.5}, "guidance_scale"),
    ({"width": 30}, "width"),
    ({"height": 2048}, "height"),
    ({"num_images": 5}, "num_images"),
    ({"num_images": 0}, "num_images"),
    ({"seed": -1}, "seed"),
    ({"num_inference_steps": np.array([1.5])}, "num_inference_steps"),
    ({"num_images": np.array([1, 2])}, "num_images"),
    ({"nonsense": 1}, "nonsense"),
    ({"prompt": np.array([b"\xff\xfe"], dtype=object)}, "prompt"),
    ({"prompt": np.array([b"x" * 9000], dtype=object)}, "prompt"),
    ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents"),
    ({"latents": np.full((1, 4, 16, 16), np.nan, np.float32)}, "latents"),
])
def test_bad_inputs_are_refused_at_submit_naming_the_field(engine, inputs, param):
    r = req("bad")
    for k, v in inputs.items():
        r.inputs[k] = v if isinstance(v, np.ndarray) else np.array([v])
    with pytest.raises(InvalidInput) as info:
        engine.submit(r)
    assert info.value.param == param and info.value.status == 400
    assert not engine.has_work()


def test_missing_prompt_unknown_output_and_duplicate_id(engine):
    r = req("np")
    del r.inputs["prompt"]
    with pytest.raises(InvalidInput, match="prompt"):
        engine.submit(r)
    r = req("out")
    r.outputs = ["pixels"]
    with pytest.raises(InvalidInput, match="pixels"):
        engine.submit(r)
    engine.submit(req("dup", steps=1))
    with pytest.raises(InvalidInput, match="already in flight"):
        engine.submit(req("dup", steps=1))
    run(engine, [])


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"),
                                      ("dpm++", "DPMSolverMultistepScheduler"),
                                      ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_schedulers_from_model_toml(tiny_sd, engine, name, cls):
    e = load_engine(tiny_sd, scheduler=name, batch_invariant=True)
    try:
        assert e.describe()["scheduler"] == cls
        first = run(e, [req("s", seed=5, steps=4)])["s"]
        again = run(e, [req("other", seed=6, steps=6), req("s", seed=5, steps=4)])["s"]
        assert digest(first) == digest(again)
        euler = run(engine, [req("e", seed=5, steps=4)])["e"]
        assert digest(first) != digest(euler)
    finally:
        e.unload()


def test_bad_model_configs_fail_the_load(tiny_sd, tmp_path):
    from engines.diffusion.engine import DiffusionEngine
    for section, param in [({"scheduler": "warp"}, None), ({"max_batch": 0}, "max_batch"),
                           ({"bogus": 1}, "bogus"), ({"width": 30}, "width")]:
        with pytest.raises(FerryError) as info:
            load_engine(tiny_sd, **section)
        if param:
            assert info.value.param == f"diffusion.{param}"
        assert info.value.status in (400, 422)
    with pytest.raises(FerryError, match="model_index.json"):
        (tmp_path / "pipeline").mkdir()
        DiffusionEngine().load(ModelSpec("x", 1, "diffusion", tmp_path, weights="pipeline"),
                               "cpu")


def test_resize_renders_the_native_size_and_scales_the_png(tiny_sd):
    from PIL import Image
    e = load_engine(tiny_sd, resize=True, max_size=512)
    try:
        assert e.describe()["resize"] is True
        res = run(e, [req("big", seed=4, width=300, height=256)])["big"]
        image = Image.open(io.BytesIO(res.outputs["images"][0]))
        assert image.size == (300, 256)
        native = run(e, [req("n", seed=4)])["n"]
        small = Image.open(io.BytesIO(native.outputs["images"][0]))
        assert small.size == (32, 32)
        # the same render, scaled: the top-left native pixel fills the top-left block
        assert image.getpixel((0, 0)) == small.getpixel((0, 0))
        with pytest.raises(InvalidInput) as info:
            e.submit(req("huge", width=600))
        assert info.value.param == "width"
    finally:
        e.unload()
