"""Model lifecycle against real daemons: version swaps under load (poll and explicit modes) with
zero failed requests, unload with requests in flight, SHA-256 ids, the `ferry models` CLI, and
uploads (POST /admin/models/{name}/versions) that either fully succeed or leave nothing."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
import pytest

from tests.integration.daemon_proc import REPO, Daemon, http_get, orphan_segments
from tests.integration.forms import Part, get, post, post_form
from tests.integration.lifecycle_models import (SLOW_TOML, const_digits_onnx, const_digits_toml,
                                                copy_version, slow_echo_onnx, write_version)
from tests.integration.secure_daemon import SecureDaemon

pytestmark = pytest.mark.timeout(180)
CONST_CLASS = 7          # what every replacement digits version answers
POLL = '[repository]\ncontrol_mode = "poll"\npoll_interval_s = 0.5\n'
EXPLICIT = '[repository]\ncontrol_mode = "explicit"\n'


def _stop(d: Daemon) -> None:
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments()


@pytest.fixture(scope="module")
def poll_daemon(demo_models, tmp_path_factory):
    repo = tmp_path_factory.mktemp("pollrepo")
    copy_version(demo_models / "digits" / "1", repo, "digits", 1)
    d = Daemon(repo, workers=2, extra_config=POLL).start()
    yield d
    _stop(d)


@pytest.fixture(scope="module")
def explicit_daemon(demo_models, tmp_path_factory):
    repo = tmp_path_factory.mktemp("explicitrepo")
    copy_version(demo_models / "digits" / "1", repo, "digits", 1)
    write_version(repo, "slow", 1, {"model.onnx": slow_echo_onnx(), "model.toml": SLOW_TOML})
    (repo / "linked").symlink_to(demo_models / "digits", target_is_directory=True)
    d = SecureDaemon(repo, workers=2, extra_config=EXPLICIT, server_extra="max_body_mb = 4")
    out = d.cli("tokens", "create", "--name", "lifecycle", "--scopes", "admin,infer")
    assert out.returncode == 0, out.stderr
    d.admin_key = out.stdout.strip()   # /admin/* always needs a key
    d.start()
    yield d
    _stop(d)


@pytest.fixture(scope="module")
def digit():
    """A test-split image the trained model gets right and whose label is not CONST_CLASS."""
    from daemon.demo import digits_split
    _, x, _, y = digits_split()
    i = next(i for i in range(len(y)) if y[i] not in (CONST_CLASS, 3, 5, 6))
    return x[i], int(y[i])


def _index(d: Daemon) -> dict[tuple[str, str], str]:
    status, rows = post(d.url + "/v2/repository/index", b"", "application/json")
    assert status == 200
    return {(r["name"], r["version"]): r["state"] for r in rows}  # type: ignore[union-attr]


async def _until(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _ensure_loaded(d: Daemon, name: str) -> None:
    """Each test starts from a loaded model, whatever an earlier one left (load is idempotent)."""
    status, body = post(f"{d.url}/v2/repository/models/{name}/load", b"", None)
    assert status == 200, body


def _kserve_body(name: str, data: list[float], shape: list[int]) -> dict:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}]}


async def _swap_under_load(d: Daemon, pixels: np.ndarray, switch: Callable[[], Awaitable[None]],
                           clients: int = 8) -> list[tuple[int, str, int]]:
    """8 clients infer on `digits` (no version named) while `switch` installs version 2;
    returns (status, model_version or error code, argmax) per request."""
    url = f"{d.url}/v2/models/digits/infer"
    body = _kserve_body("pixels", pixels.tolist(), [1, 64])
    results: list[tuple[int, str, int]] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    async with s.post(url, json=body) as r:
                        payload = await r.json(content_type=None)
                except aiohttp.ClientError as exc:
                    results.append((0, repr(exc), -1))
                    continue
                if r.status == 200:
                    results.append((200, payload["model_version"],
                                    int(np.argmax(payload["outputs"][0]["data"]))))
                else:
                    results.append((r.status, str(payload.get("code")), -1))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        await _until(lambda: len(results) >= 40, 30, "traffic on version 1")
        await switch()
        await _until(lambda: [r[1] for r in results[-2 * clients:]] == ["2"] * 2 * clients, 60,
                     "traffic to move to version 2")
        await _until(lambda: _index(d).get(("digits", "1")) == "UNAVAILABLE", 30,
                     "version 1 to drain and unload")
        seen = len(results)
        await _until(lambda: len(results) >= seen + 40, 30, "traffic after the unload")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return results


def _check_swap(results: list[tuple[int, str, int]], label: int) -> None:
    failed = [r for r in results if r[0] != 200]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    v1 = [r for r in results if r[1] == "1"]
    v2 = [r for r in results if r[1] == "2"]
    assert v1 and v2 and len(v1) + len(v2) == len(results)
    assert {r[2] for r in v1} == {label} and {r[2] for r in v2} == {CONST_CLASS}
    assert results[-1][1] == "2"


def _digits_v2_files() -> dict[str, bytes | str]:
    return {"model.onnx": const_digits_onnx(CONST_CLASS), "model.toml": const_digits_toml()}


# -- swaps under load -----------------------------------------------------------------------------

def test_poll_mode_swap_under_load_fails_nothing(poll_daemon, digit):
    pixels, label = digit

    async def switch() -> None:   # written beside the repository's models, renamed into place
        write_version(poll_daemon.repo, "digits", 2, _digits_v2_files())

    results = asyncio.run(_swap_under_load(poll_daemon, pixels, switch))
    _check_swap(results, label)


def test_poll_mode_broken_new_version_keeps_the_old_one_serving(poll_daemon, digit):
    """A version that fails to load must not take down the one it was meant to replace."""
    pixels, _ = digit
    url = f"{poll_daemon.url}/v2/models/digits/infer"
    body = json.dumps(_kserve_body("pixels", pixels.tolist(), [1, 64])).encode()
    write_version(poll_daemon.repo, "digits", 3, {"model.onnx": b"\0corrupt onnx",
                                                  "model.toml": const_digits_toml()})

    async def wait_failed() -> None:
        await _until(lambda: _index(poll_daemon).get(("digits", "3")) not in (
            None, "UNAVAILABLE", "LOADING"),
                     30, "version 3 to fail")
    asyncio.run(wait_failed())
    index = _index(poll_daemon)
    assert index[("digits", "3")] == "FAILED" and index[("digits", "2")] == "READY"
    status, out = post(url, body, "application/json")
    assert status == 200 and out["model_version"] == "2"


def test_explicit_mode_swap_under_load_fails_nothing(explicit_daemon, digit):
    pixels, label = digit
    d = explicit_daemon

    async def switch() -> None:
        write_version(d.repo, "digits", 2, _digits_v2_files())
        assert _index(d)[("digits", "2")] == "UNAVAILABLE"      # explicit: disk alone loads nothing
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{d.url}/v2/repository/models/digits/load") as r:
                assert r.status == 200, await r.text()

    results = asyncio.run(_swap_under_load(d, pixels, switch))
    _check_swap(results, label)


# -- unload with requests in flight ----------------------------------------------------------------

async def _unload_in_flight(d: Daemon, n: int = 16) -> tuple[list, list, list]:
    url = f"{d.url}/v2/models/slow/infer"
    async with aiohttp.ClientSession() as s:
        async def infer(i: float) -> tuple[int, Any]:
            async with s.post(url, json=_kserve_body("x", [i], [1, 1])) as r:
                return r.status, await r.json(content_type=None)

        async def draining() -> bool:
            async with s.get(f"{d.url}/v2/models/slow/ready") as r:
                return r.status != 200

        inflight = [asyncio.create_task(infer(float(i))) for i in range(n)]
        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        unload = asyncio.create_task(s.post(f"{d.url}/v2/repository/models/slow/unload"))
        deadline = time.monotonic() + 10
        while not await draining():     # a probe sent earlier would queue behind the others
            assert time.monotonic() < deadline, "the model never started draining"
            await asyncio.sleep(0.01)
        during = []
        while not unload.done():
            status, body = await infer(99.0)
            during.append((status, body.get("code")))
        assert (await unload).status == 200
        after = [await infer(1.0) for _ in range(3)]
        done = [await t for t in inflight]
    return done, during, after


def test_unload_lets_requests_in_flight_finish(explicit_daemon):
    d = explicit_daemon
    _ensure_loaded(d, "slow")
    done, during, after = asyncio.run(_unload_in_flight(d))
    assert [s for s, _ in done] == [200] * 16
    assert [b["outputs"][0]["data"][0] for _, b in done] == [float(i) for i in range(16)]
    assert (503, "model_unavailable") in during            # refused at once while it drains
    assert set(during) <= {(503, "model_unavailable"), (404, "model_not_found")}
    for status, body in after:
        assert (status, body["code"]) in {(404, "model_not_found"), (503, "model_unavailable")}
    deadline = time.monotonic() + 5
    while (status := http_get(f"{d.url}/v2/models/slow")[0]) != 404:
        assert status == 503 and time.monotonic() < deadline
    assert _index(d)[("slow", "1")] == "UNAVAILABLE"
    status, _ = post(f"{d.url}/v2/repository/models/slow/load", b"", None)
    assert status == 200
    status, body = post(f"{d.url}/v2/models/slow/infer",
                        json.dumps(_kserve_body("x", [4.0], [1, 1])).encode(), "application/json")
    assert status == 200 and body["outputs"][0]["data"] == [4.0]


# -- SHA-256 ids ------------------------------------------------------------------------------------

def test_sha256_id_works_wherever_a_name_does(explicit_daemon):
    d = explicit_daemon
    _ensure_loaded(d, "slow")
    sha = hashlib.sha256((d.repo / "slow" / "1" / "model.onnx").read_bytes()).hexdigest()
    status, cfg = http_get(f"{d.url}/v2/models/slow/config")
    assert status == 200 and cfg["sha256"] == sha
    status, meta = http_get(f"{d.url}/v2/models/{sha}")
    assert status == 200 and meta["name"] == "slow"
    assert http_get(f"{d.url}/v2/models/{sha}/versions/1/ready")[0] == 200
    body = json.dumps(_kserve_body("x", [2.5], [1, 1])).encode()
    status, out = post(f"{d.url}/v2/models/{sha}/infer", body, "application/json")
    assert status == 200 and out["model_name"] == "slow" and out["outputs"][0]["data"] == [2.5]
    assert post(f"{d.url}/v2/repository/models/{sha}/unload", b"", None)[0] == 200
    assert http_get(f"{d.url}/v2/models/{sha}")[0] == 404
    assert post(f"{d.url}/v2/repository/models/slow/load", b"", None)[0] == 200
    assert http_get(f"{d.url}/v2/models/{'0' * 64}")[0] == 404


# -- the CLI ------------------------------------------------------------------------------------------

def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "models", *args,
                           "--config", str(d.config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_ferry_models_cli(explicit_daemon):
    d = explicit_daemon
    _ensure_loaded(d, "slow")
    out = _cli(d, "list")
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:3]) for line in out.stdout.splitlines()}
    assert ("slow", "1", "READY") in rows
    out = _cli(d, "show", "slow")
    assert out.returncode == 0 and json.loads(out.stdout)["versions"]["1"]["state"] == "ready"
    out = _cli(d, "unload", "slow")
    assert out.returncode == 0 and json.loads(out.stdout)["unloaded"] == [1]
    assert ("slow", "1", "UNAVAILABLE") in {tuple(l.split()[:3])
                                            for l in _cli(d, "list").stdout.splitlines()}
    assert http_get(f"{d.url}/v2/models/slow")[0] in (404, 503)
    out = _cli(d, "load", "slow")
    assert out.returncode == 0 and json.loads(out.stdout)["loaded"] == [1]
    assert http_get(f"{d.url}/v2/models/slow")[0] == 200
    for args, code in ((("show", "nope"), "model_not_found"), (("load", "nope"), "model_not_found"),
                       (("unload",), "usage"), (("load", "../x"), "invalid_model_name")):
        out = _cli(d, *args)
        assert out.returncode == 1 and f"[{code}]" in out.stderr, (args, out.stderr)


# -- uploads ------------------------------------------------------------------------------------------

def _upload(d: Daemon, name: str, parts: list[Part]) -> tuple[int, dict]:
    return post_form(f"{d.url}/admin/models/{name}/versions", parts, key=d.admin_key)


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def _zip(files: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            if modes and name in modes:
                info.create_system, info.external_attr = 3, modes[name] << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _predicts(d: Daemon, name: str, cls: int) -> bool:
    body = json.dumps(_kserve_body("pixels", [1.0] * 64, [1, 64])).encode()
    status, out = post(f"{d.url}/v2/models/{name}/infer", body, "application/json")
    return status == 200 and int(np.argmax(out["outputs"][0]["data"])) == cls


def test_upload_versions_as_files_tar_and_zip(explicit_daemon):
    d = explicit_daemon
    toml, weights = const_digits_toml().encode(), const_digits_onnx(3)
    status, body = _upload(d, "uploaded", [Part("model.toml", toml, "model.toml"),
                                           Part("weights", weights, "model.onnx")])
    assert status == 201, body
    assert (body["version"], body["state"]) == (1, "ready")
    assert body["sha256"] == hashlib.sha256(weights).hexdigest()
    assert _predicts(d, "uploaded", 3)
    # an archive with a top-level directory, model.toml inside it
    tgz = _tar({"pkg/model.toml": toml, "pkg/model.onnx": const_digits_onnx(5)})
    status, body = _upload(d, "uploaded", [Part("archive", tgz, "pkg.tar.gz")])
    assert status == 201 and body["version"] == 2 and body["unloaded"] == [1], body
    assert _predicts(d, "uploaded", 5)
    zipped = _zip({"model.onnx": const_digits_onnx(6)})
    status, body = _upload(d, "uploaded", [Part("config", toml, "model.toml"),
                                           Part("archive", zipped, "m.zip")])
    assert status == 201 and body["version"] == 3, body
    assert _predicts(d, "uploaded", 6)
    status, view = get(f"{d.url}/admin/models", d.admin_key)
    assert status == 200
    versions = {m["name"]: m["versions"] for m in view["models"]}
    assert [(v["version"], v["state"]) for v in versions["uploaded"]] == \
        [(1, "unloaded"), (2, "unloaded"), (3, "ready")]
    assert versions["uploaded"][2]["engines"] and versions["uploaded"][2]["sha256"]
    assert view["repository"]["control_mode"] == "explicit"
    assert not list(d.repo.glob(".upload-*"))


def _bad_uploads() -> list[tuple[str, list[Part], tuple[int, str]]]:
    toml, weights = const_digits_toml().encode(), const_digits_onnx(3)
    good_toml, good_w = Part("model.toml", toml, "model.toml"), Part("weights", weights, "model.onnx")
    wrong = const_digits_toml().replace("max_batch_size = 64", 'max_batch_size = "lots"').encode()
    bad_pre = const_digits_toml().replace("width = 8", 'width = "8"').encode()
    mismatch = const_digits_toml().replace("width = 8", "width = 16").encode()
    named = const_digits_toml().replace('weights = "model.onnx"', 'weights = "w.onnx"').encode()
    big = os.urandom(1024) * (5 << 10)                                     # 5 MiB > 4 MiB
    return [
        ("corrupt model", [good_toml, Part("weights", b"\x08\x01garbage" * 100, "model.onnx")],
         (422, "model_load_failed")),
        ("wrong types", [Part("model.toml", wrong), good_w], (400, "invalid_model_config")),
        ("bad preprocess", [Part("model.toml", bad_pre), good_w], (400, "invalid_model_config")),
        ("preprocess vs model", [Part("model.toml", mismatch), good_w],
         (400, "invalid_model_config")),
        ("not toml", [Part("model.toml", b"engine = = onnx"), good_w],
         (400, "invalid_model_config")),
        ("weights missing", [Part("model.toml", named), good_w], (400, "invalid_model_config")),
        ("tar traversal", [good_toml, Part("archive", _tar({"../../escape.onnx": weights}))],
         (400, "unsafe_path")),
        ("tar absolute", [good_toml, Part("archive", _tar({"/tmp/ferry-upload-escape": b"x"}))],
         (400, "unsafe_path")),
        ("tar symlink", [good_toml, Part("archive", _tar({}, {"model.onnx": "/etc/passwd"}))],
         (400, "unsafe_member")),
        ("zip traversal", [good_toml, Part("archive", _zip({"../escape.onnx": weights}))],
         (400, "unsafe_path")),
        ("zip symlink", [good_toml, Part("archive", _zip({"model.onnx": b"/etc/passwd"},
                                                         {"model.onnx": stat.S_IFLNK | 0o777}))],
         (400, "unsafe_member")),
        ("file name traversal", [good_toml, Part("weights", weights, "../../escape.onnx")],
         (400, "unsafe_path")),
        ("absolute file name", [good_toml, Part("weights", weights, "/tmp/escape.onnx")],
         (400, "unsafe_path")),
        ("oversized file", [good_toml, Part("weights", big, "model.onnx")],
         (413, "upload_too_large")),
        ("archive bomb", [good_toml, Part("archive", _tar({"model.onnx": bytes(6 << 20)}))],
         (413, "upload_too_large")),
        ("corrupt archive", [good_toml, Part("archive", b"\x1f\x8b" + os.urandom(300))],
         (400, "invalid_archive")),
        ("no model.toml", [good_w], (400, "missing_model_toml")),
        ("no weights", [good_toml], (400, "missing_weights")),
        ("stray field", [good_toml, good_w, Part("notes", b"hi")], (400, "unexpected_field")),
        ("two tomls", [good_toml, good_toml, good_w], (400, "duplicate_file")),
    ]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


def test_bad_uploads_leave_nothing_behind(explicit_daemon):
    d = explicit_daemon
    outer = d.repo.parent
    before_tree, before_index = _tree(outer), _index(d)
    for what, parts, want in _bad_uploads():
        status, body = _upload(d, "digits", parts)
        assert (status, body.get("error", {}).get("code")) == want, (what, body)
        assert body["error"]["message"]
        status, body = _upload(d, "fresh-model", parts)
        assert (status, body["error"]["code"]) == want, (what, body)
    assert _tree(outer) == before_tree
    assert _index(d) == before_index
    assert not Path("/tmp/ferry-upload-escape").exists() and not Path("/tmp/escape.onnx").exists()
    status, view = get(f"{d.url}/admin/models", d.admin_key)
    assert "fresh-model" not in {m["name"] for m in view["models"]}


def test_upload_refuses_bad_requests(explicit_daemon, demo_models):
    d = explicit_daemon
    toml = Part("model.toml", const_digits_toml().encode())
    weights = Part("weights", const_digits_onnx(1), "model.onnx")
    status, body = post(f"{d.url}/admin/models/digits/versions", b"{}", "application/json",
                        key=d.admin_key)
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    status, body = _upload(d, "bad%20name!", [toml, weights])
    assert (status, body["error"]["code"]) == (400, "invalid_model_name")
    status, body = _upload(d, "..", [toml, weights])
    assert status in (400, 404)
    status, body = post(f"{d.url}/admin/models/digits/versions", b"--x\r\nbroken",
                        "multipart/form-data; boundary=x", key=d.admin_key)
    assert (status, body["error"]["code"]) == (400, "invalid_multipart")
    status, body = post_form(f"{d.url}/admin/models/digits/versions", [toml, weights])
    assert (status, body["error"]["code"]) == (401, "missing_credentials")
    # a model directory that links out of the repository is never written through
    shared = sorted(p.name for p in (demo_models / "digits").iterdir())
    status, body = _upload(d, "linked", [toml, weights])
    assert (status, body["error"]["code"]) == (409, "model_dir_conflict")
    assert sorted(p.name for p in (demo_models / "digits").iterdir()) == shared


def test_explicit_mode_loads_only_the_startup_models(demo_models, tmp_path_factory):
    """As Triton's explicit mode with --load-model: named models at start, others on request."""
    repo = tmp_path_factory.mktemp("startuprepo")
    copy_version(demo_models / "digits" / "1", repo, "digits", 1)
    write_version(repo, "slow", 1, {"model.onnx": slow_echo_onnx(), "model.toml": SLOW_TOML})
    d = Daemon(repo, workers=1,
               extra_config=EXPLICIT + 'startup_models = ["dig*"]\n').start()
    try:
        assert _index(d) == {("digits", "1"): "READY", ("slow", "1"): "UNAVAILABLE"}
        assert http_get(d.url + "/v2/models/slow/ready")[0] != 200
        status, _ = post(d.url + "/v2/repository/models/slow/load", b"", "application/json")
        assert status == 200
        assert _index(d)[("slow", "1")] == "READY"
    finally:
        _stop(d)
