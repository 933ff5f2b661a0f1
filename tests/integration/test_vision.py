"""Image predict (POST /v1/models/{model}/predict) against a real daemon and the digits model."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments
from tests.integration.forms import Part, multipart, post
from tests.integration.lifecycle_models import SLOW_TOML, slow_echo_onnx, write_version
from tests.integration.secure_daemon import SecureDaemon
from tests.unit.test_preprocess import digit_png, huge_png

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def vision(demo_models, tmp_path_factory):
    repo = tensor_repo(demo_models, tmp_path_factory, ("digits",))
    write_version(repo, "plain", 1, {"model.onnx": slow_echo_onnx(depth=1),
                                     "model.toml": SLOW_TOML})
    d = SecureDaemon(repo, workers=2, extra_config="[auth]\nrequired = true\n")
    for attr, extra in (("key", ()), ("plain_key", ("--models", "plain"))):
        out = d.cli("tokens", "create", "--name", attr, "--scopes", "infer", *extra)
        assert out.returncode == 0, out.stderr
        setattr(d, attr, out.stdout.strip())
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments()


@pytest.fixture(scope="module")
def test_digits():
    from daemon.demo import digits_split
    _, x, _, y = digits_split()
    return x, y


def _predict(d: Daemon, model: str, parts: list[Part], query: str = "",
             key: str | None = "") -> tuple[int, dict]:
    return post(f"{d.url}/v1/models/{model}/predict{query}", *multipart(parts),
                key=d.key if key == "" else key)  # type: ignore[attr-defined]


def _png(pixels: np.ndarray) -> Part:
    return Part("file", digit_png(pixels), "digit.png", "image/png")


def _error(resp: tuple[int, dict]) -> tuple[int, str]:
    status, body = resp
    return status, body["error"]["code"]


def test_digits_from_the_test_split_are_classified(vision, test_digits):
    x, y = test_digits
    correct = 0
    for i in range(10):
        status, body = _predict(vision, "digits", [_png(x[i])])
        assert status == 200, body
        preds = body["predictions"]
        assert len(preds) == 3 and preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
        assert preds[0]["label"] == str(preds[0]["index"])
        correct += preds[0]["label"] == str(y[i])
    assert correct >= 9, f"only {correct}/10 digits classified correctly"
    assert body["model"] == "digits" and body["model_version"] == "1"
    assert len(body["model_id"]) == 64 and body["request_id"]


def test_field_name_image_raw_body_and_jpeg(vision, test_digits):
    x, y = test_digits
    status, body = _predict(vision, "digits", [Part("image", digit_png(x[0]), "d.png")])
    assert status == 200 and body["predictions"][0]["label"] == str(y[0])
    status, body = post(f"{vision.url}/v1/models/digits/predict", digit_png(x[0]), "image/png",
                        key=vision.key)
    assert status == 200 and body["predictions"][0]["label"] == str(y[0])
    gray = np.rint(x[0].reshape(8, 8) * 255 / 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).convert("RGB").resize((64, 64), Image.Resampling.NEAREST).save(
        buf, "JPEG", quality=95)
    status, body = _predict(vision, "digits", [Part("file", buf.getvalue(), "d.jpg")])
    assert status == 200 and body["predictions"][0]["label"] == str(y[0])


def test_top_k_version_and_sha_id(vision, test_digits):
    x, _ = test_digits
    status, body = _predict(vision, "digits", [_png(x[1])], "?top_k=10")
    assert status == 200 and len(body["predictions"]) == 10
    assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-4)
    sha = body["model_id"]
    status, by_sha = _predict(vision, sha, [_png(x[1])], "?version=1")
    assert status == 200 and by_sha["model"] == "digits" and by_sha["model_id"] == sha
    assert by_sha["predictions"][0] == body["predictions"][0]
    status, pinned = post(f"{vision.url}/v1/models/digits/versions/1/predict",
                          *multipart([_png(x[1])]), key=vision.key)
    assert status == 200 and pinned["model_version"] == "1"


@pytest.mark.parametrize("query, status, code", [
    ("?top_k=0", 400, "invalid_parameter"),
    ("?top_k=abc", 400, "invalid_parameter"),
    ("?version=x", 400, "invalid_input"),
    ("?version=9", 404, "model_not_found"),
])
def test_bad_parameters(vision, test_digits, query, status, code):
    x, _ = test_digits
    assert _error(_predict(vision, "digits", [_png(x[0])], query)) == (status, code)


def test_bad_uploads_get_stable_codes(vision, test_digits):
    x, _ = test_digits
    png = digit_png(x[0])
    corrupt = bytearray(png)
    corrupt[40:60] = b"\0" * 20
    cases = [
        ([Part("file", b"just some text, not an image", "notes.txt", "text/plain")],
         (400, "invalid_image")),
        ([Part("file", bytes(corrupt), "bad.png", "image/png")], (400, "invalid_image")),
        ([Part("file", b"", "empty.png", "image/png")], (400, "empty_file")),
        ([Part("comment", b"hello")], (400, "missing_file")),
        ([], (400, "missing_file")),
        ([Part("file", huge_png(100_000, 100_000), "huge.png", "image/png")],
         (413, "image_too_large")),
        ([Part("file", png, "a.png"), Part("file", png, "b.png")], (400, "too_many_files")),
    ]
    for parts, want in cases:
        assert _error(_predict(vision, "digits", parts)) == want, parts


def test_bad_bodies_and_models(vision, test_digits):
    x, _ = test_digits
    url, key = f"{vision.url}/v1/models/digits/predict", vision.key
    assert _error(post(url, b"", None, key=key)) == (415, "unsupported_media_type")
    assert _error(post(url, b"", "image/png", key=key)) == (400, "empty_file")
    assert _error(post(url, b'{"image": "..."}', "application/json", key=key)) == \
        (415, "unsupported_media_type")
    status, body = post(url, b"--x\r\nnot a real multipart", "multipart/form-data; boundary=x",
                        key=key)
    assert status == 400 and body["error"]["code"] in ("invalid_multipart", "missing_file")
    assert _error(_predict(vision, "nope", [_png(x[0])])) == (404, "model_not_found")
    assert _error(_predict(vision, "plain", [_png(x[0])])) == (400, "not_a_vision_model")


def test_the_daemon_still_serves_after_bad_input(vision, test_digits):
    x, y = test_digits
    status, body = _predict(vision, "digits", [_png(x[2])])
    assert status == 200 and body["predictions"][0]["label"] == str(y[2])
    assert http_get(vision.url + "/readyz")[0] == 200


def test_keys_and_model_allow_lists_apply(vision, test_digits):
    x, _ = test_digits
    assert _error(_predict(vision, "digits", [_png(x[0])], key=None)) == \
        (401, "missing_credentials")
    plain = vision.plain_key
    assert _error(_predict(vision, "digits", [_png(x[0])], key=plain)) == \
        (403, "model_not_allowed")
    sha = _predict(vision, "digits", [_png(x[0])])[1]["model_id"]
    assert _error(_predict(vision, sha, [_png(x[0])], key=plain)) == (403, "model_not_allowed")
    # the allowed model gets past the check (and is refused for what it is)
    assert _error(_predict(vision, "plain", [_png(x[0])], key=plain)) == \
        (400, "not_a_vision_model")
