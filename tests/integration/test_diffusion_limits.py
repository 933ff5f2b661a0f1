"""An image counts `units_per_image` against a key's tokens per minute on every path to an image
model, against a real daemon with real keys: OpenAI's /v1/images/generations, seed 002's
/v1/infer, KServe infer, WebSocket `inference` messages and batch items. The digits diffusion
demo model is served with units_per_image = 15 and each key has 60 tokens per minute, so four
images spend the whole minute's budget, a fifth image is refused (429 token_rate_limited) for
the next 15 s of refill, a batch item waits for it instead, and a request the engine refuses
is refunded."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

TPM = 60                      # refills one unit a second
UNITS = 15                    # per image: four images are the whole budget
IMAGES = "/v1/images/generations"
KEYS = ("openai", "refund", "seed", "kserve", "ws", "batch", "zmq")


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    version = repo / "digits-diffusion" / "1"
    version.mkdir(parents=True)
    source = demo_models / "digits-diffusion" / "1"
    (version / "pipeline").symlink_to(source / "pipeline", target_is_directory=True)
    (version / "model.toml").write_text(
        (source / "model.toml").read_text().replace("[diffusion]\n",
                                                    f"[diffusion]\nunits_per_image = {UNITS}\n"))
    d = SecureDaemon(repo, workers=1, extra_config="[auth]\nrequired = true\n")

    async def seed(state) -> dict[str, str]:
        keys = {"admin": (await state.keys.create("watcher", scopes=["infer", "admin"])).plaintext}
        for name in KEYS:
            keys[name] = (await state.keys.create(f"images-{name}", tpm=TPM)).plaintext
        return keys
    d.keys = d.state(seed)
    d.start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments()


def images(n: int, **extra) -> dict:
    return {"model": "digits-diffusion", "prompt": "a handwritten 5", "n": n, "size": "8x8",
            "num_inference_steps": 2, **extra}


def assert_token_limited(status: int, headers: dict, body) -> None:
    assert status == 429 and error_code(body) == "token_rate_limited", (status, body)
    assert int(headers["Retry-After"]) >= 1


def test_openai_images_count_their_units(ferry):
    key = ferry.keys["openai"]
    status, _, body = call(ferry, "POST", IMAGES, key=key, body=images(4))
    assert status == 200, body
    assert body["usage"]["total_tokens"] == 4 * UNITS
    assert_token_limited(*call(ferry, "POST", IMAGES, key=key, body=images(1)))


def test_a_request_the_engine_refuses_is_refunded(ferry):
    key = ferry.keys["refund"]
    for _ in range(3):       # each reserves the whole minute, then the engine refuses the size
        status, _, body = call(ferry, "POST", IMAGES, key=key,
                               body=images(4, size="4096x4096"))
        assert status == 400 and body["error"]["param"] == "size", body
    status, _, body = call(ferry, "POST", IMAGES, key=key, body=images(4))
    assert status == 200, body
    assert_token_limited(*call(ferry, "POST", IMAGES, key=key, body=images(1)))


def test_seed_002_infer_counts_its_units(ferry):
    key = ferry.keys["seed"]

    def infer(n: int):
        return call(ferry, "POST", "/v1/infer", key=key, body={
            "id": "r1", "model_id": "digits-diffusion", "prompt": "a handwritten 3",
            "num_images": n, "width": 256, "height": 256, "num_inference_steps": 2})
    status, _, body = infer(4)
    assert status == 200 and len(body["images"]) == 4, body
    assert_token_limited(*infer(1))


def test_kserve_infer_counts_its_units(ferry):
    key = ferry.keys["kserve"]

    def infer(n: int):
        return call(ferry, "POST", "/v2/models/digits-diffusion/infer", key=key, body={
            "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                        "data": ["a handwritten 1"]},
                       {"name": "num_images", "datatype": "INT64", "shape": [1], "data": [n]},
                       {"name": "num_inference_steps", "datatype": "INT64", "shape": [1],
                        "data": [2]}],
            "outputs": [{"name": "seeds"}]})
    status, _, body = infer(4)
    assert status == 200 and len(body["outputs"][0]["data"]) == 4, body
    assert_token_limited(*infer(1))


def test_websocket_images_count_their_units(ferry):
    async def go():
        headers = {"Authorization": f"Bearer {ferry.keys['ws']}"}
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ferry.url + "/v1/ws", headers=headers) as ws:
            out = []
            for rid, n in (("four", 4), ("one", 1)):
                await ws.send_json({"type": "inference", "id": rid, "stream": False,
                                    **images(n)})
                while True:
                    msg = json.loads((await ws.receive(timeout=60)).data)
                    if msg.get("id") == rid and msg["type"] in ("complete", "error"):
                        out.append(msg)
                        break
            return out
    four, one = asyncio.run(asyncio.wait_for(go(), 120))
    assert four["type"] == "complete" and four["usage"]["total_tokens"] == 4 * UNITS, four
    assert one["type"] == "error" and one["code"] == "token_rate_limited", one
    assert one["status"] == 429


def test_batch_image_items_wait_for_their_units(ferry):
    key, admin = ferry.keys["batch"], ferry.keys["admin"]
    started = time.monotonic()
    status, _, job = call(ferry, "POST", "/v1/batches", key=key, body={"requests": [
        {"custom_id": "four", "url": IMAGES, "body": images(4, seed=1)},
        {"custom_id": "one", "url": IMAGES, "body": images(1, seed=2)}]})
    assert status == 201, job

    def counts() -> dict:
        status, _, body = call(ferry, "GET", f"/v1/batches/{job['id']}", key=admin)
        assert status == 200, body
        return body["request_counts"]
    wait_until(lambda: counts()["completed"] >= 1, 60, "the item the budget allows")
    # the second needs 15 units: 15 s of refill after the first took all 60
    watch_until = started + 8.0
    while time.monotonic() < watch_until:
        assert counts() == {"total": 2, "completed": 1, "failed": 0}
    wait_until(lambda: counts()["completed"] == 2, 60, "the item that waited for its units")
    assert time.monotonic() - started >= 10.0
    status, _, rows = call(ferry, "GET", f"/v1/batches/{job['id']}/results", key=admin)
    assert status == 200
    usage = {r["custom_id"]: r["response"]["body"]["usage"]["total_tokens"]
             for r in rows["data"]}
    assert usage == {"four": 4 * UNITS, "one": UNITS}


def test_zmq_infers_count_their_units(ferry):
    import numpy as np

    from daemon.errors import FerryError
    from frontends.client import FerryClient

    def inputs(n: int) -> dict:
        return {"prompt": np.array([b"a handwritten 8"], dtype=object),
                "num_images": np.array([n], dtype=np.int64),
                "num_inference_steps": np.array([2], dtype=np.int64)}
    with FerryClient(ferry.zmq_endpoint, timeout_s=60, api_key=ferry.keys["zmq"]) as c:
        out = c.infer("digits-diffusion", inputs(4), outputs=["seeds"])
        assert len(out["seeds"]) == 4
        with pytest.raises(FerryError) as err:
            c.infer("digits-diffusion", inputs(1), outputs=["seeds"])
    assert err.value.status == 429 and err.value.code == "token_rate_limited", err.value
