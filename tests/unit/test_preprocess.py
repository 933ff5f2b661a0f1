"""daemon.preprocess: model.toml [preprocess]/[postprocess] validation, image decode limits,
image → tensor layouts, and top-k classification."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.errors import InvalidInput, PayloadTooLarge
from daemon.preprocess import ClassifySpec, ImageSpec, bind_to_model, classify_spec, image_spec
from frontends.image_codec import classify, decode_image, image_to_tensor
from daemon.repository_spec import load_spec

DIGITS_PRE = {"kind": "image", "width": 8, "height": 8, "channels": 1, "scale": 16.0,
              "invert": False, "layout": "flat", "input": "pixels"}
DIGITS_POST = {"kind": "classify", "labels": [str(i) for i in range(10)], "top_k": 3}
DIGITS_INPUTS = [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}]
DIGITS_OUTPUTS = [{"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}]


def huge_png(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)     # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def digit_png(pixels: np.ndarray, size: int = 32) -> bytes:
    """An sklearn digit (8x8, 0..16, ink high) as a PNG, upscaled like a user's drawing."""
    gray = np.rint(pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return encode(Image.fromarray(gray, "L").resize((size, size), Image.Resampling.NEAREST))


# -- [preprocess] / [postprocess] validation --------------------------------------------------

def test_digits_sections_parse():
    spec = image_spec(DIGITS_PRE)
    assert (spec.width, spec.height, spec.channels, spec.layout, spec.input) == \
        (8, 8, 1, "flat", "pixels")
    assert spec.scale == 16.0 and spec.invert is False and spec.resample == "bilinear"
    post = classify_spec(DIGITS_POST)
    assert post.labels[3] == "3" and post.top_k == 3 and post.softmax is False


def test_preprocess_defaults():
    spec = image_spec({"kind": "image", "width": 224, "height": 224})
    assert (spec.channels, spec.scale, spec.layout, spec.mean, spec.std) == \
        (3, 1.0, "nchw", None, None)
    one = image_spec({"kind": "image", "width": 2, "height": 2, "mean": 0.5, "std": [2]})
    assert one.mean == (0.5, 0.5, 0.5) and one.std == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("change, param", [
    ({"kind": "audio"}, "preprocess.kind"),
    ({"width": "8"}, "preprocess.width"),
    ({"width": 0}, "preprocess.width"),
    ({"height": 1.5}, "preprocess.height"),
    ({"height": 100000}, "preprocess.height"),
    ({"channels": 2}, "preprocess.channels"),
    ({"channels": True}, "preprocess.channels"),
    ({"scale": 0}, "preprocess.scale"),
    ({"scale": "16"}, "preprocess.scale"),
    ({"scale": float("nan")}, "preprocess.scale"),
    ({"invert": "no"}, "preprocess.invert"),
    ({"layout": "chw"}, "preprocess.layout"),
    ({"input": 3}, "preprocess.input"),
    ({"mean": [0.1, 0.2]}, "preprocess.mean"),
    ({"std": [0.0]}, "preprocess.std"),
    ({"resample": "cubic"}, "preprocess.resample"),
    ({"max_pixels": -1}, "preprocess.max_pixels"),
    ({"colour": "red"}, "preprocess.colour"),
])
def test_bad_preprocess_names_the_key(change, param):
    with pytest.raises(InvalidInput) as err:
        image_spec({**DIGITS_PRE, **change})
    assert err.value.code == "invalid_model_config" and err.value.param == param
    assert err.value.status == 400


@pytest.mark.parametrize("change, param", [
    ({"kind": "detect"}, "postprocess.kind"),
    ({"labels": "0123456789"}, "postprocess.labels"),
    ({"labels": [0, 1]}, "postprocess.labels"),
    ({"top_k": 0}, "postprocess.top_k"),
    ({"top_k": 11}, "postprocess.top_k"),
    ({"top_k": "3"}, "postprocess.top_k"),
    ({"softmax": 1}, "postprocess.softmax"),
    ({"output": ""}, "postprocess.output"),
    ({"threshold": 0.5}, "postprocess.threshold"),
])
def test_bad_postprocess_names_the_key(change, param):
    with pytest.raises(InvalidInput) as err:
        classify_spec({**DIGITS_POST, **change})
    assert err.value.code == "invalid_model_config" and err.value.param == param


def test_sections_must_be_tables():
    with pytest.raises(InvalidInput, match=r"\[preprocess\] must be a table"):
        image_spec("image")


def test_load_spec_validates_the_sections(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"not checked here")
    base = 'engine = "onnx"\n[preprocess]\nkind = "image"\nwidth = 8\nheight = 8\n'
    (tmp_path / "model.toml").write_text(base)
    assert load_spec(tmp_path, "m", 1).sections["preprocess"]["width"] == 8
    (tmp_path / "model.toml").write_text(base.replace("width = 8", 'width = "eight"'))
    with pytest.raises(InvalidInput) as err:
        load_spec(tmp_path, "m", 1)
    assert (err.value.code, err.value.param) == ("invalid_model_config", "preprocess.width")
    (tmp_path / "model.toml").write_text(base + '[postprocess]\nkind = "classify"\ntop_k = -1\n')
    with pytest.raises(InvalidInput) as err:
        load_spec(tmp_path, "m", 1)
    assert err.value.param == "postprocess.top_k"


# -- binding to the model's tensors -------------------------------------------------------------

def test_bind_to_digits():
    names = bind_to_model(image_spec(DIGITS_PRE), classify_spec(DIGITS_POST), DIGITS_INPUTS,
                          DIGITS_OUTPUTS)
    assert names == ("pixels", "probabilities")
    no_names = image_spec({k: v for k, v in DIGITS_PRE.items() if k != "input"})
    assert bind_to_model(no_names, None, DIGITS_INPUTS, DIGITS_OUTPUTS) == ("pixels", None)


@pytest.mark.parametrize("pre, post, param", [
    ({**DIGITS_PRE, "width": 16}, DIGITS_POST, "preprocess.layout"),
    ({**DIGITS_PRE, "layout": "nchw"}, DIGITS_POST, "preprocess.layout"),
    ({**DIGITS_PRE, "input": "image"}, DIGITS_POST, "preprocess.input"),
    (DIGITS_PRE, {**DIGITS_POST, "labels": ["a", "b", "c"]}, "postprocess.labels"),
    (DIGITS_PRE, {**DIGITS_POST, "output": "logits"}, "postprocess.output"),
])
def test_bind_mismatch_is_a_config_error(pre, post, param):
    with pytest.raises(InvalidInput) as err:
        bind_to_model(image_spec(pre), classify_spec(post), DIGITS_INPUTS, DIGITS_OUTPUTS)
    assert (err.value.code, err.value.param) == ("invalid_model_config", param)


def test_bind_nchw_with_dynamic_dims():
    pre = image_spec({"kind": "image", "width": 32, "height": 24})
    inputs = [{"name": "x", "dtype": "float32", "shape": [-1, 3, -1, -1]}]
    assert bind_to_model(pre, None, inputs, [])[0] == "x"
    with pytest.raises(InvalidInput):
        bind_to_model(pre, None, [{"name": "x", "dtype": "float32", "shape": [-1, 1, 24, 32]}],
                      [])


# -- decoding -----------------------------------------------------------------------------------

def test_decode_png_and_jpeg():
    img = Image.new("RGB", (5, 3), (200, 10, 10))
    for fmt in ("PNG", "JPEG"):
        out = decode_image(encode(img, fmt))
        assert out.size == (5, 3) and out.format == fmt


@pytest.mark.parametrize("data, code", [
    (b"", "empty_file"),
    (b"hello, this is not an image at all", "invalid_image"),
    (encode(Image.new("L", (4, 4)), "GIF"), "invalid_image"),
    (encode(Image.new("L", (64, 64)), "PNG")[:60], "invalid_image"),           # truncated
])
def test_decode_refuses_non_images(data, code):
    with pytest.raises(InvalidInput) as err:
        decode_image(data)
    assert err.value.code == code and err.value.status == 400


def test_decode_refuses_a_corrupt_crc():
    data = bytearray(encode(Image.new("L", (16, 16), 7), "PNG"))
    data[30] ^= 0xFF                          # inside IHDR: its CRC no longer matches
    with pytest.raises(InvalidInput) as err:
        decode_image(bytes(data))
    assert err.value.code == "invalid_image"


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (20_000, 2_000)])
def test_decode_refuses_huge_dimensions_before_decoding(width, height):
    with pytest.raises(PayloadTooLarge) as err:
        decode_image(huge_png(width, height))
    assert err.value.code == "image_too_large" and err.value.status == 413


def test_decode_respects_a_smaller_pixel_limit():
    data = encode(Image.new("L", (100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(PayloadTooLarge):
        decode_image(data, max_pixels=9_999)


def test_jpeg_draft_decodes_smaller_but_not_below_the_model_size():
    data = encode(Image.new("RGB", (800, 600), (0, 128, 255)), "JPEG")
    img = decode_image(data, draft=ImageSpec(width=100, height=75))
    assert img.size == (100, 75)
    img = decode_image(data, draft=ImageSpec(width=150, height=75))
    assert img.size[0] >= 150


# -- image → tensor -----------------------------------------------------------------------------

def test_digit_round_trip_is_exact_with_box_resampling():
    x = np.random.default_rng(0).integers(0, 17, size=(5, 64)).astype(np.float32)
    spec = image_spec({**DIGITS_PRE, "resample": "box"})
    for row in x:
        tensor = image_to_tensor(decode_image(digit_png(row)), spec)
        assert tensor.shape == (1, 64) and tensor.dtype == np.float32
        np.testing.assert_allclose(tensor[0], row, atol=16 / 255)


def test_layouts_keep_channel_order():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.putpixel((3, 1), (0, 0, 255))
    base = {"kind": "image", "width": 4, "height": 2, "scale": 1.0}
    nchw = image_to_tensor(img, image_spec({**base, "layout": "nchw"}))
    assert nchw.shape == (1, 3, 2, 4)
    assert nchw[0, 0, 0, 0] == 1.0 and nchw[0, 2, 1, 3] == 1.0 and nchw[0, 0, 1, 3] == 0.0
    nhwc = image_to_tensor(img, image_spec({**base, "layout": "nhwc"}))
    assert nhwc.shape == (1, 2, 4, 3)
    np.testing.assert_array_equal(nhwc[0].transpose(2, 0, 1), nchw[0])
    flat = image_to_tensor(img, image_spec({**base, "layout": "flat"}))
    np.testing.assert_array_equal(flat[0], nhwc.reshape(-1))


def test_grayscale_invert_scale_mean_std():
    img = Image.new("RGB", (3, 3), (255, 255, 255))
    spec = image_spec({"kind": "image", "width": 3, "height": 3, "channels": 1, "invert": True,
                       "layout": "flat"})
    assert not image_to_tensor(img, spec).any()
    spec = image_spec({"kind": "image", "width": 3, "height": 3, "scale": 2.0,
                       "mean": [1.0, 0.0, 0.5], "std": [0.5, 1.0, 0.25]})
    t = image_to_tensor(img, spec)
    np.testing.assert_allclose(t[0, :, 0, 0], [2.0, 2.0, 6.0])


def test_alpha_and_palette_images_convert():
    for mode in ("RGBA", "LA", "P", "I;16"):
        img = Image.new(mode, (10, 6))
        t = image_to_tensor(img, image_spec({"kind": "image", "width": 5, "height": 3}))
        assert t.shape == (1, 3, 3, 5)


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 degrees clockwise"
    img = decode_image(encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif))
    spec = image_spec({"kind": "image", "width": 20, "height": 40, "layout": "nhwc"})
    assert image_to_tensor(img, spec).shape == (1, 40, 20, 3)
    assert img.size == (40, 20)                           # the decoded image is untouched


# -- classification -----------------------------------------------------------------------------

def test_classify_top_k():
    spec = classify_spec(DIGITS_POST)
    scores = np.array([0.05, 0.6, 0.05, 0.2, 0.1, 0, 0, 0, 0, 0], dtype=np.float32)
    top = classify(scores, spec)
    assert [p["label"] for p in top] == ["1", "3", "4"]
    assert top[0]["index"] == 1 and top[0]["score"] == pytest.approx(0.6)
    assert len(classify(scores, spec, top_k=10)) == 10
    assert len(classify(scores, spec, top_k=50)) == 10


def test_classify_softmax_and_missing_labels():
    spec = ClassifySpec(top_k=2, softmax=True)
    top = classify(np.array([[1.0, 3.0, 2.0]]), spec)
    assert [p["label"] for p in top] == ["1", "2"]
    assert sum(p["score"] for p in classify(np.array([1.0, 3.0, 2.0]), spec, 3)) == \
        pytest.approx(1.0)
