"""A diffusion model through KServe v2 (`tritonclient[http]` and raw JSON) and its Prometheus
series on /metrics, against a real daemon serving a tiny random Stable Diffusion directory:
the tensors the model declares, PNGs equal to the OpenAI route's for the same seed, latents in
and out, every bad input a 400 with a stable code, and the step / image series counting exactly
the load the test sent."""
from __future__ import annotations

import base64
import json
import re
import time
import urllib.request

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, http_get, request_json

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

@pytest.fixture(scope="module")
def ferry(tiny_sd_daemon):
    return tiny_sd_daemon


def post(d: Daemon, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(d.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 60)


def scrape(ferry) -> dict[str, float]:
    """Every tiny-model sample on /metrics, by `name{labels}` (engine label dropped)."""
    with urllib.request.urlopen(ferry.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(ferry_diffusion_\w+)\{(.*)\} (\S+)$', line)
        if m and 'model="tiny"' in m.group(2):
            labels = ",".join(sorted(p for p in m.group(2).split(",")
                                     if not p.startswith("engine=")))
            out[f"{m.group(1)}{{{labels}}}"] = out.get(f"{m.group(1)}{{{labels}}}", 0.0) + \
                float(m.group(3))
    return out


def value(samples: dict[str, float], name: str, **labels) -> float:
    want = ",".join(sorted([f'{k}="{v}"' for k, v in labels.items()] +
                           ['model="tiny"', 'version="1"']))
    return samples.get(f"{name}{{{want}}}", 0.0)


def test_metadata_declares_the_tensors(ferry):
    status, meta = http_get(ferry.url + "/v2/models/tiny", timeout=10)
    assert status == 200 and meta["platform"] == "ferry_diffusion"
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs["prompt"] == ("BYTES", [-1])
    assert inputs["num_inference_steps"] == ("INT64", [-1])
    assert inputs["guidance_scale"] == ("FP32", [-1])
    assert inputs["latents"] == ("FP32", [-1, -1, -1, -1])
    assert set(inputs) == {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale",
                           "width", "height", "seed", "num_images", "latents"}
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "images": "BYTES", "seeds": "INT64", "latents": "FP32"}


def _triton_inputs(th, *, seed: int, n: int, steps: int, latents=None):
    def tensor(name, arr, dtype):
        t = th.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t
    out = [tensor("prompt", np.array([b"a photo of a cat"], dtype=object), "BYTES"),
           tensor("seed", np.array([seed], dtype=np.int64), "INT64"),
           tensor("num_images", np.array([n], dtype=np.int64), "INT64"),
           tensor("num_inference_steps", np.array([steps], dtype=np.int64), "INT64"),
           tensor("width", np.array([32], dtype=np.int64), "INT64"),
           tensor("height", np.array([32], dtype=np.int64), "INT64")]
    if latents is not None:
        out.append(tensor("latents", latents, "FP32"))
    return out


def test_tritonclient_generates_the_openai_routes_pngs_and_takes_latents(ferry):
    import tritonclient.http as th
    client = th.InferenceServerClient(ferry.url.removeprefix("http://"), network_timeout=120)
    try:
        outputs = [th.InferRequestedOutput(n, binary_data=True)
                   for n in ("images", "seeds", "latents")]
        res = client.infer("tiny", _triton_inputs(th, seed=9, n=2, steps=3), outputs=outputs)
        pngs = [bytes(p) for p in res.as_numpy("images").reshape(-1)]
        assert res.as_numpy("seeds").tolist() == [9, 10]
        latents = res.as_numpy("latents")
        assert latents.dtype == np.float32 and latents.shape == (2, 4, 16, 16)
        # the same image through OpenAI's route
        status, body = post(ferry, "/v1/images/generations", {
            "model": "tiny", "prompt": "a photo of a cat", "n": 2, "size": "32x32", "seed": 9,
            "num_inference_steps": 3})
        assert status == 200, body
        assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == pngs
        # latents in replace the seeded noise: the same latents give the same image whatever
        # the seed, other latents another image
        given = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
        a = client.infer("tiny", _triton_inputs(th, seed=1, n=1, steps=2, latents=given),
                         outputs=outputs[:1]).as_numpy("images")[0]
        b = client.infer("tiny", _triton_inputs(th, seed=2, n=1, steps=2, latents=given),
                         outputs=outputs[:1]).as_numpy("images")[0]
        c = client.infer("tiny", _triton_inputs(th, seed=1, n=1, steps=2, latents=-given),
                         outputs=outputs[:1]).as_numpy("images")[0]
        assert bytes(a) == bytes(b) != bytes(c)
    finally:
        client.close()


def _json_input(name, datatype, shape, data) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


PROMPT = _json_input("prompt", "BYTES", [1], ["a photo of a cat"])


@pytest.mark.parametrize("inputs,outputs,code,param", [
    ([PROMPT, _json_input("strength", "FP32", [1], [0.5])], None, "invalid_input", "strength"),
    ([_json_input("seed", "INT64", [1], [1])], None, "invalid_input", "prompt"),
    ([_json_input("prompt", "INT64", [1], [3])], None, "invalid_input", "prompt"),
    ([PROMPT, _json_input("num_inference_steps", "FP32", [1], [2.0])], None, "invalid_input",
     "num_inference_steps"),
    ([PROMPT, _json_input("num_inference_steps", "INT64", [1], [0])], None,
     "invalid_parameter", "num_inference_steps"),
    ([PROMPT, _json_input("num_inference_steps", "INT64", [2], [2, 3])], None,
     "invalid_input", "num_inference_steps"),
    ([PROMPT, _json_input("num_images", "INT64", [1], [9])], None, "invalid_parameter",
     "num_images"),
    ([PROMPT, _json_input("width", "INT64", [1], [30])], None, "invalid_parameter", "width"),
    ([PROMPT, _json_input("height", "INT64", [1], [4096])], None, "invalid_parameter",
     "height"),
    ([PROMPT, _json_input("guidance_scale", "FP32", [1], [0.5])], None, "invalid_parameter",
     "guidance_scale"),
    ([PROMPT, _json_input("seed", "INT64", [1], [-5])], None, "invalid_parameter", "seed"),
    ([PROMPT, _json_input("latents", "FP32", [1, 4, 8, 8], [0.0] * 256)], None,
     "invalid_input", "latents"),
    ([PROMPT], [{"name": "pixels"}], "invalid_output", "pixels"),
    # PNG bytes are not UTF-8: a JSON string cannot hold them, binary_data can
    ([PROMPT], [{"name": "images"}], "output_not_utf8", "images"),
])
def test_bad_kserve_inputs_are_400_with_a_stable_code(ferry, inputs, outputs, code, param):
    body: dict = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    status, answer = post(ferry, "/v2/models/tiny/infer", body)
    assert status == 400, answer
    assert answer["code"] == code and answer.get("param") in (param, None), answer
    assert param in answer["error"]
    assert "Traceback" not in answer["error"] and "/tmp" not in answer["error"]


def test_step_and_image_series_count_the_load_sent(ferry):
    import tritonclient.http as th
    before = scrape(ferry)
    started = time.monotonic()
    status, body = post(ferry, "/v1/images/generations", {
        "model": "tiny", "prompt": "a dog", "n": 2, "size": "32x32", "seed": 3,
        "num_inference_steps": 3})
    assert status == 200, body
    assert body["usage"] == {"input_tokens": 0, "output_tokens": 2, "total_tokens": 2}
    client = th.InferenceServerClient(ferry.url.removeprefix("http://"), network_timeout=120)
    try:
        client.infer("tiny", _triton_inputs(th, seed=5, n=1, steps=4),
                     outputs=[th.InferRequestedOutput("seeds")])
    finally:
        client.close()
    wall = time.monotonic() - started
    after = scrape(ferry)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    # requests one after the other: each alone in its forwards (3 steps, then 4)
    assert delta("ferry_diffusion_images_total") == 3
    assert delta("ferry_diffusion_image_seconds_count") == 3
    assert delta("ferry_diffusion_steps_total") == 7
    assert delta("ferry_diffusion_step_seconds_count") == 7
    assert delta("ferry_diffusion_image_steps_total") == 2 * 3 + 4
    assert delta("ferry_diffusion_requests_total", outcome="completed") == 2
    assert delta("ferry_diffusion_requests_total", outcome="failed") == 0
    # the times are real: positive, and no more than the wall time the client saw
    assert 0 < delta("ferry_diffusion_step_seconds_sum") <= wall
    assert 0 < delta("ferry_diffusion_image_seconds_sum") <= 3 * wall
    assert value(after, "ferry_diffusion_image_seconds_bucket", le="+Inf") == \
        value(after, "ferry_diffusion_image_seconds_count")
    buckets = sorted(((float(k.split('le="')[1].split('"')[0]), v) for k, v in after.items()
                      if k.startswith("ferry_diffusion_step_seconds_bucket")),
                     key=lambda kv: kv[0])
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == value(
        after, "ferry_diffusion_step_seconds_count")
    assert value(after, "ferry_diffusion_active_images") == 0
