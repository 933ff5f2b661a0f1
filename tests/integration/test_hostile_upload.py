"""A corpus of hostile image uploads against a real daemon's predict route (digits, 8x8 gray).

Whatever a client uploads, the answer is a 200 (a strange but valid image: CMYK, 16-bit,
palette, APNG, EXIF garbage, a decompression bomb just under the pixel limit) or a 4xx whose
error body carries a stable code, never a 5xx or a dropped connection; the one HTTP worker
keeps its pid, a good upload still classifies after each probe, and the worker's RSS ends
within 100 MB of where it started. Every failure of the corpus is reported at once.
"""
from __future__ import annotations

import gzip
import io
from concurrent.futures import ThreadPoolExecutor
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments
from tests.integration.secure_daemon import call, error_code

pytestmark = pytest.mark.timeout(180)

PREDICT = "/v1/models/digits/predict"
MAX_BODY = 8 << 20                     # server.max_body_mb = 8
RSS_GROWTH_MB = 100


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1,
               server_extra="max_body_mb = 8\n").start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


# -- images ---------------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int = 8, color: int = 0, idat: bytes | None = None,
         extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk; `idat` (raw scanlines) defaults to a black image, which
    compresses to almost nothing however large the image claims to be."""
    if idat is None:
        bpp = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color] * max(depth // 8, 1)
        co = zlib.compressobj(9)
        row = b"\0" * (1 + width * bpp)
        idat_z = b"".join([*(co.compress(row) for _ in range(height)), co.flush()])
    else:
        idat_z = zlib.compress(idat)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat_z)
            + _chunk(b"IEND", b""))


def _jpeg_with(segment: int, payload: bytes, base: bytes) -> bytes:
    """`base` (a JPEG) with one more marker segment right after SOI."""
    return base[:2] + struct.pack(">BBH", 0xFF, segment, len(payload) + 2) + payload + base[2:]


def _exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """An EXIF APP1 payload: one big-endian IFD of (tag, type, count, 4 value bytes)."""
    ifd = struct.pack(">H", len(entries)) + b"".join(
        struct.pack(">HHI", tag, typ, count) + value for tag, typ, count, value in entries)
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd + b"\0\0\0\0"


def _jpeg_sof(width: int, height: int) -> bytes:
    """A JPEG whose frame header claims `width` x `height` and holds no scan."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + struct.pack(">BBH", 0xFF, 0xC0, len(sof) + 2) + sof + b"\xff\xd9"


def images() -> dict[str, tuple[bytes, int | None]]:
    """Uploads as {label: (bytes, the status wanted: 200, a 4xx, or None for 200-or-4xx)}."""
    rgb = Image.new("RGB", (32, 32), (10, 200, 30))
    png, jpeg = _encode(rgb), _encode(rgb, "JPEG")
    frames = [Image.new("L", (8, 8), 5 * i) for i in range(50)]
    corrupt_png = bytearray(png)
    corrupt_png[45:60] = b"\0" * 15
    corrupt_jpeg = bytearray(jpeg)
    corrupt_jpeg[len(jpeg) // 2:len(jpeg) // 2 + 40] = b"\x00" * 40
    rotated = Image.Exif()
    rotated[0x0112] = 6
    return {
        # structure
        "empty": (b"", 400), "one_byte": (b"\x89", 400), "png_signature_only": (png[:8], 400),
        "jpeg_soi_only": (b"\xff\xd8", 400), "truncated_png": (png[:len(png) // 2], 400),
        "truncated_jpeg": (jpeg[:len(jpeg) // 2], 400), "corrupt_png": (bytes(corrupt_png), 400),
        "corrupt_jpeg_body": (bytes(corrupt_jpeg), None),
        "png_then_junk_10mb": (png[:33] + b"\xab" * (7 << 20), 400),
        "png_bad_filter": (_png(4, 4, idat=b"\x09" * 20), 400),
        "png_short_idat": (_png(16, 16, idat=b"\0" * 10), 400),
        "png_bad_depth": (_png(4, 4, depth=7, idat=b"\0" * 20), 400),
        "png_bad_color_type": (_png(4, 4, color=5, idat=b"\0" * 20), 400),
        "png_then_zip": (png + b"PK\x03\x04" + b"\0" * 100, 200),
        # declared dimensions: decompression bombs
        "png_100000x100000": (_png(100_000, 100_000, idat=b"\0" * 64), 413),
        "png_65535x65535_rgba16": (_png(65535, 65535, 16, 6, idat=b"\0" * 64), 413),
        "png_1x2147483647": (_png(1, 2**31 - 1, idat=b"\0" * 64), 413),
        "png_5001x5000": (_png(5001, 5000, idat=b"\0" * 64), 413),
        "png_zero_width": (_png(0, 8, idat=b"\0" * 8), 400),
        "png_4999x4999_rgba16": (_png(4999, 4999, 16, 6), 200),     # under the limit: decoded
        "jpeg_65500x65500": (_jpeg_sof(65500, 65500), 413),
        "jpeg_0x0": (_jpeg_sof(0, 0), 400),
        "png_ztxt_bomb": (_png(4, 4, idat=b"\0" * 20, extra=_chunk(
            b"zTXt", b"k\0\0" + zlib.compress(b"a" * (50 << 20)))), 400),
        # CPU bombs: Pillow walked each chunk or marker in Python, 3-13 s for these 7 MB
        "png_490k_text_chunks": (_png(4, 4, idat=b"\0" * 20,
                                      extra=_chunk(b"tEXt", b"k\0v") * 490_000), 400),
        "jpeg_1_8m_empty_markers": (jpeg[:2] + struct.pack(">BBH", 0xFF, 0xE5, 2) * (7 << 18)
                                    + jpeg[2:], 400),
        "jpeg_7mb_fill_bytes": (jpeg[:2] + b"\xff" * (7 << 20) + jpeg[2:], 400),
        "png_iccp_bomb": (_png(4, 4, idat=b"\0" * 20, extra=_chunk(
            b"iCCP", b"k\0\0" + zlib.compress(b"a" * (50 << 20)))), 400),
        # other formats and frames
        "gif_animated": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), 400),
        "apng_50_frames": (_encode(frames[0], save_all=True, append_images=frames[1:]), 200),
        "bmp": (_encode(rgb, "BMP"), 400), "tiff": (_encode(rgb, "TIFF"), 400),
        "webp": (_encode(rgb, "WEBP"), 400), "ico": (_encode(rgb, "ICO"), 400),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', 400),
        "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", 400), "text": (b"hello, not an image", 400),
        "mpo_two_frames": (_encode(rgb, "MPO", save_all=True, append_images=[rgb]), 200),
        # modes
        "cmyk_jpeg": (_encode(Image.new("CMYK", (16, 16), (1, 2, 3, 4)), "JPEG"), 200),
        "png_gray16": (_encode(Image.new("I;16", (16, 16), 40000)), 200),
        "png_rgb16": (_png(4, 4, 16, 2), 200), "png_rgba16": (_png(4, 4, 16, 6), 200),
        "png_la": (_encode(Image.new("LA", (16, 16))), 200),
        "png_1bit": (_encode(Image.new("1", (16, 16))), 200),
        "png_2bit_gray": (_png(4, 4, 2, 0, idat=b"\0\xff" * 4), 200),
        "png_palette_transparency": (_encode(rgb.convert("P"), transparency=0), 200),
        "png_palette_without_plte": (_png(4, 4, 8, 3, idat=(b"\0" + b"\x05" * 4) * 4), 200),
        "jpeg_progressive": (_encode(rgb, "JPEG", progressive=True), 200),
        # metadata
        "exif_garbage": (_jpeg_with(0xE1, b"Exif\0\0" + b"\xff" * 64, jpeg), 200),
        "exif_truncated": (_jpeg_with(0xE1, b"Exif\0\0MM\0*\0\0\0\x08\0\x05", jpeg), 200),
        "exif_orientation_9": (_jpeg_with(0xE1, _exif([(0x0112, 3, 1, struct.pack(
            ">HH", 9, 0))]), jpeg), 200),
        "exif_orientation_string": (_jpeg_with(0xE1, _exif([(0x0112, 2, 4, b"abc\0")]), jpeg),
                                    200),
        "exif_ifd_loop": (_jpeg_with(0xE1, b"Exif\0\0MM\0*\0\0\0\x08\0\x01" + struct.pack(
            ">HHII", 0x8769, 4, 1, 8) + b"\0\0\0\x08", jpeg), 200),
        "exif_huge_count": (_jpeg_with(0xE1, _exif([(0x0112, 3, 2**31 - 1, b"\0" * 4)]), jpeg),
                            200),
        "exif_rotated_non_square": (_encode(Image.new("L", (16, 8), 3), exif=rotated), 200),
        "png_exif_garbage": (_png(4, 4, idat=b"\0" * 20, extra=_chunk(
            b"eXIf", b"MM\0*\0\0\0\x08\xff\xff" + b"\x01" * 40)), 200),
        "jpeg_icc_garbage": (_encode(rgb, "JPEG", icc_profile=b"garbage" * 30), 200),
        "png_iccp_garbage": (_png(4, 4, idat=b"\0" * 20, extra=_chunk(
            b"iCCP", b"k\0\0" + zlib.compress(b"not a profile"))), 200),
    }


# -- multipart bodies -----------------------------------------------------------------------------

def _part(name: str | None, data: bytes, filename: str | None = "x.png",
          ctype: str = "image/png", extra: str = "") -> bytes:
    disp = "form-data" + (f'; name="{name}"' if name is not None else "") + \
        (f'; filename="{filename}"' if filename is not None else "")
    head = f"Content-Disposition: {disp}\r\nContent-Type: {ctype}\r\n{extra}\r\n"
    return b"--B\r\n" + head.encode() + data + b"\r\n"


def _form(*parts: bytes, end: bytes = b"--B--\r\n") -> bytes:
    return b"".join(parts) + end


FORM = "multipart/form-data; boundary=B"


def bodies(png: bytes) -> dict[str, tuple[bytes, dict[str, str], int | None]]:
    """Whole request bodies as {label: (body, headers, status wanted or None)}."""
    def mp(body: bytes, status: int | None, ctype: str = FORM, **headers: str
           ) -> tuple[bytes, dict[str, str], int | None]:
        return body, {"Content-Type": ctype, **headers}, status
    big = b"\0" * (MAX_BODY + 1024)
    return {
        "no_file_part": mp(_form(_part("comment", b"hello", None, "text/plain")), 400),
        "no_parts": mp(_form(), 400),
        "two_file_parts": mp(_form(_part("file", png), _part("file", png)), 400),
        "file_and_image": mp(_form(_part("file", png), _part("image", png)), 400),
        "part_without_name": mp(_form(_part(None, png)), 400),
        "part_without_disposition": mp(b"--B\r\nContent-Type: image/png\r\n\r\n" + png
                                       + b"\r\n--B--\r\n", 400),
        "file_not_an_image": mp(_form(_part("file", b"#!/bin/sh\nrm -rf /\n", "x.sh")), 400),
        "file_empty": mp(_form(_part("file", b"")), 400),
        "file_over_max_body": mp(_form(_part("file", big)), 413),
        # the body limit holds for every part: these streamed through to a 200 before
        "field_over_max_body": mp(_form(_part("comment", big, None), _part("file", png)), 413),
        "fields_over_max_body_together": mp(_form(*[_part(f"f{i}", b"\0" * (1 << 20), None)
                                                    for i in range(9)], _part("file", png)), 413),
        "10000_fields": mp(_form(*[_part(f"f{i}", b"x", None) for i in range(10000)],
                                 _part("file", png)), None),
        "filename_traversal": mp(_form(_part("file", png, "../../../etc/passwd")), 200),
        "filename_nul": mp(_form(_part("file", png, "a\0b.png")), None),
        "no_filename": mp(_form(_part("file", png, None)), 200),
        "wrong_part_type": mp(_form(_part("file", png, ctype="text/plain")), 200),
        "part_base64": mp(_form(_part("file", png, extra="Content-Transfer-Encoding: base64\r\n")),
                          None),
        "part_gzip_lie": mp(_form(_part("file", png, extra="Content-Encoding: gzip\r\n")), None),
        "part_header_100kb": mp(_form(_part("file", png, extra=f"X-Pad: {'p' * 100_000}\r\n")),
                                None),
        "nested_multipart": mp(_form(_part("file", _form(_part("file", png)), None,
                                           "multipart/mixed; boundary=B")), 400),
        "unterminated": mp(_part("file", png), None),
        "truncated_mid_part": mp(_part("file", png)[:-len(png) // 2], None),
        "wrong_boundary": mp(_form(_part("file", png)), 400,
                             "multipart/form-data; boundary=other"),
        "no_boundary": mp(_form(_part("file", png)), 400, "multipart/form-data"),
        "empty_boundary": mp(_form(_part("file", png)), 400, "multipart/form-data; boundary="),
        "boundary_too_long": mp(_form(_part("file", png)), 400,
                                "multipart/form-data; boundary=" + "b" * 200),
        "lf_only": mp(_form(_part("file", png)).replace(b"\r\n", b"\n"), None),
        "garbage_body": mp(b"\x00\xff" * 1000, 400),
        "whitespace_body": mp(b"   \r\n\r\n", 400),
        "gzip_garbage": mp(b"\x1f\x8b not gzip", 400, **{"Content-Encoding": "gzip"}),
        "gzip_bomb": mp(gzip.compress(b"\0" * (64 << 20)), None, **{"Content-Encoding": "gzip"}),
        # raw bodies
        "raw_png": mp(png, 200, "image/png"),
        "raw_jpeg_type_png_bytes": mp(png, 200, "image/jpeg"),
        "raw_text_as_png": mp(b"not an image", 400, "image/png"),
        "raw_empty": mp(b"", 400, "image/png"),
        "raw_over_max_body": mp(big, 413, "image/png"),
        "raw_gzip_garbage": mp(b"\x1f\x8b not gzip", 400, "image/png",
                               **{"Content-Encoding": "gzip"}),
        "raw_gzip_bomb": mp(gzip.compress(b"\0" * (64 << 20)), 413, "image/png",
                            **{"Content-Encoding": "gzip"}),
        "raw_gzip_png": mp(gzip.compress(png), 200, "image/png", **{"Content-Encoding": "gzip"}),
        "raw_deflate_garbage": mp(b"not deflate", 400, "image/png",
                                  **{"Content-Encoding": "deflate"}),
        "raw_unknown_encoding": mp(png, None, "image/png", **{"Content-Encoding": "zz"}),
        "type_gif": mp(png, 415, "image/gif"),
        "type_octet_stream": mp(png, 415, "application/octet-stream"),
        "type_json": mp(b'{"image": "aGk="}', 415, "application/json"),
        "type_missing": mp(png, 415, ""),
        "type_multipart_mixed": mp(_form(_part("file", png)), 415,
                                   "multipart/mixed; boundary=B"),
        "type_uppercase": mp(png, None, "IMAGE/PNG"),
        "type_garbage": mp(png, 415, ";;;=x"),
    }


def queries() -> dict[str, tuple[str, int | None]]:
    return {"top_k_zero": ("?top_k=0", 400), "top_k_negative": ("?top_k=-1", 400),
            "top_k_huge": ("?top_k=" + "9" * 100, 400), "top_k_empty": ("?top_k=", 400),
            "top_k_5000_digits": ("?top_k=" + "9" * 5000, 400),            # was a 500
            "version_5000_digits": ("?version=" + "9" * 5000, 400),        # was a 500
            "top_k_arabic_digit": ("?top_k=%D9%A1", 400), "version_zero": ("?version=0", 400),
            "version_huge": ("?version=" + "9" * 40, 400), "version_text": ("?version=x", 400),
            "two_versions": ("?version=1&version=x", None)}


def corpus(png: bytes) -> list[tuple[str, str, bytes, dict[str, str], int | None]]:
    """Every probe as (label, path, body, headers, wanted status or None)."""
    probes = [(f"image {label}", PREDICT, *_as_file(data), want)
              for label, (data, want) in images().items()]
    probes += [(f"body {label}", PREDICT, body, headers, want)
               for label, (body, headers, want) in bodies(png).items()]
    body, headers = _as_file(png)
    probes += [(f"query {label}", PREDICT + query, body, headers, want)
               for label, (query, want) in queries().items()]
    for label, path, want in (("unknown_model", "/v1/models/nope/predict", 404),
                              ("long_model", f"/v1/models/{'m' * 300}/predict", 404),
                              ("nul_model", "/v1/models/a%00b/predict", 404),
                              ("version_path_text", "/v1/models/digits/versions/x/predict", 400),
                              ("version_path_5000_digits",
                               f"/v1/models/digits/versions/{'9' * 5000}/predict", 400)):
        probes.append((f"path {label}", path, body, headers, want))
    return probes


def _as_file(data: bytes) -> tuple[bytes, dict[str, str]]:
    return _form(_part("file", data)), {"Content-Type": FORM}


# -- running it -----------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1]) / 1024


def _digit_png() -> bytes:
    from daemon.demo import digits_split
    _, x, _, _ = digits_split()
    gray = np.rint(x[0].reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return _encode(Image.fromarray(gray, "L").resize((32, 32), Image.Resampling.NEAREST))


def _judge(label: str, status: int, answer: Any, want: int | None) -> str | None:
    if status >= 500:
        return f"{label}: {status} {str(answer)[:160]}"
    if status >= 400 and not (isinstance(error_code(answer), str) and error_code(answer)):
        return f"{label}: {status} without a stable code: {str(answer)[:160]}"
    if status == 200 and not (isinstance(answer, dict) and answer.get("predictions")):
        return f"{label}: 200 without predictions: {str(answer)[:160]}"
    if want is not None and status != want:
        return f"{label}: {status} {error_code(answer)}, wanted {want}"
    return None


def test_no_hostile_upload_gets_a_5xx_or_hurts_the_worker(ferry):
    (worker,) = ferry.child_pids("http")
    good_body, good_headers = _as_file(_digit_png())
    assert call(ferry, "POST", PREDICT, raw=good_body, headers=good_headers)[0] == 200
    rss_before = _rss_mb(worker)
    probes = corpus(_digit_png())
    failures: list[str] = []
    started = time.monotonic()
    for label, path, body, headers, want in probes:
        try:
            status, _, answer = call(ferry, "POST", path, raw=body, headers=headers)
        except OSError as exc:                      # a dropped connection is a failure too
            failures.append(f"{label}: {exc!r}")
        else:
            if (problem := _judge(label, status, answer, want)) is not None:
                failures.append(problem)
        if ferry.child_pids("http") != [worker]:
            failures.append(f"{label}: the HTTP worker was replaced")
            break
        status, _, answer = call(ferry, "POST", PREDICT, raw=good_body, headers=good_headers)
        if status != 200:
            failures.append(f"{label}: a good upload then got {status} {str(answer)[:120]}")
    rss_after = _rss_mb(worker)
    print(f"\n{len(probes)} hostile uploads in {time.monotonic() - started:.1f} s, "
          f"{len(failures)} failures; worker RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert len(probes) >= 40
    assert not failures, f"{len(failures)} of {len(probes)} probes:\n" + "\n".join(failures)
    assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
    assert "unhandled error" not in ferry.log()


def test_named_uploads_get_their_codes(ferry):
    """The codes the route documents, for the commonest bad uploads."""
    png = _digit_png()
    imgs, forms = images(), bodies(png)
    expect = [(_as_file(b""), 400, "empty_file"),
              (_as_file(imgs["text"][0]), 400, "invalid_image"),
              (_as_file(imgs["truncated_png"][0]), 400, "invalid_image"),
              (_as_file(imgs["png_100000x100000"][0]), 413, "image_too_large"),
              (_as_file(imgs["jpeg_65500x65500"][0]), 413, "image_too_large"),
              (forms["no_file_part"][:2], 400, "missing_file"),
              (forms["two_file_parts"][:2], 400, "too_many_files"),
              (forms["file_over_max_body"][:2], 413, "payload_too_large"),
              (forms["wrong_boundary"][:2], 400, "invalid_multipart"),
              (forms["type_gif"][:2], 415, "unsupported_media_type")]
    got = []
    for (body, headers), _, _ in expect:
        status, _, answer = call(ferry, "POST", PREDICT, raw=body, headers=headers)
        got.append((status, error_code(answer)))
    assert got == [(status, code) for _, status, code in expect]


def test_concurrent_uploads_at_the_pixel_limit_leave_rss_flat(ferry):
    """Eight at once, twice: each decodes ~100 MB of pixels. glibc kept those pages in its
    per-thread arenas, and the worker ended ~900 MB larger for good."""
    (worker,) = ferry.child_pids("http")
    body, headers = _as_file(_png(4999, 4999, 16, 6))
    rss_before = _rss_mb(worker)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            statuses = list(pool.map(lambda _: call(ferry, "POST", PREDICT, raw=body,
                                                    headers=headers)[0], range(8)))
            assert statuses == [200] * 8
    assert ferry.child_pids("http") == [worker]
    assert _rss_mb(worker) - rss_before < RSS_GROWTH_MB, (rss_before, _rss_mb(worker))


def test_uploads_of_countless_tiny_chunks_are_refused_at_once(ferry):
    """7 MB of empty PNG chunks or JPEG markers: Pillow parsed them one by one in Python and
    answered 200 after 3 to 13 s of the worker's CPU; now a bounded count refuses them."""
    imgs = images()
    for label in ("png_490k_text_chunks", "jpeg_1_8m_empty_markers"):
        body, headers = _as_file(imgs[label][0])
        started = time.monotonic()
        status, _, answer = call(ferry, "POST", PREDICT, raw=body, headers=headers)
        elapsed = time.monotonic() - started
        assert (status, error_code(answer)) == (400, "invalid_image"), (label, answer)
        assert elapsed < 3.0, (label, elapsed)
