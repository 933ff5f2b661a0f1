"""Model management under /admin/ (authentication for /admin/ comes with the security work).

    GET  /admin/models                   every model version: state, SHA-256 id, engine kind,
                                         engines hosting it, error, tensors; on-disk versions
                                         that are not loaded show as "unloaded"
    POST /admin/models/{name}/versions   upload a new version (multipart/form-data):
             model.toml  (field "model.toml" or "config")  the version's model.toml
             weights     (field "weights", with a file name) one weights file, kept under its name
             archive     (field "archive")  .tar, .tar.gz/.tgz, .tar.bz2/.xz or .zip of the
                                            version directory (may hold model.toml instead)

An upload becomes visible only once it is known to work, and a failure leaves nothing behind:

  1. the parts stream into a staging directory inside the repository (`.upload-*`, which the
     repository scan ignores), bounded by server.max_body_mb, with checked file names;
  2. an archive is extracted there by `daemon.upload` (no traversal, links or devices;
     extracted bytes bounded too);
  3. model.toml is parsed (`load_spec`): wrong types give 400 invalid_model_config;
  4. the supervisor's `validate` op loads it in an engine under a private name and unloads it
     (a corrupt model: 422 model_load_failed); [preprocess]/[postprocess] are checked against
     the tensors the engine reports;
  5. the version directory is renamed into `<repo>/<name>/<next version>/` (atomic; the number
     is reserved with mkdir, so concurrent uploads from several workers never collide);
  6. the supervisor's `load` op applies the version policy: the new version loads and warms,
     then the version it replaces drains and unloads. If that fails the directory is moved back
     out, so the index is as before.
The staging directory is removed on every path.
"""
from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from daemon.errors import FerryError, InvalidInput, UnsupportedMediaType
from daemon.preprocess import bind_to_model, classify_spec, image_spec
from daemon.repository import NAME_RE
from daemon.repository_spec import load_spec
from daemon.upload import (LimitedFile, UploadLimits, check_tree, extract_archive,
                           hoist_single_dir, safe_filename)
from engines.base import ModelSpec
from frontends.dispatch import Dispatcher
from frontends.http.appkeys import DISPATCHER, SETTINGS

__all__ = ["routes", "setup"]

routes = web.RouteTableDef()
TOML_FIELDS = ("model.toml", "config")
MAX_TOML_BYTES = 1 << 20
EXTRACT_FACTOR = 4          # an archive may expand to this many times the request limit
_INSTALLED = web.AppKey("admin_models_installed", bool)


@dataclass(slots=True)
class _Parts:
    toml: bool = False
    weights: str | None = None
    archive: bool = False


def setup(app: web.Application) -> None:
    if app.get(_INSTALLED):   # an admin module may include this one as well
        return
    app[_INSTALLED] = True
    app.add_routes(routes)


@routes.get("/admin/models")
async def list_models(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER]
    status, index = await d.control("status"), await d.control("index")
    models: dict[str, list[dict[str, Any]]] = {}
    for name, m in status["models"].items():
        for ver, v in m.get("versions", {}).items():
            info = v.get("info") or {}
            models.setdefault(name, []).append({
                "version": int(ver), "state": v.get("state"), "sha256": v.get("sha256"),
                "engine": v.get("engine"), "engines": v.get("engines", []),
                "error": v.get("error"), "path": v.get("path"),
                "inputs": info.get("inputs", []), "outputs": info.get("outputs", [])})
    for row in index.get("models", []):
        if row.get("state") == "UNAVAILABLE":
            models.setdefault(row["name"], []).append(
                {"version": int(row["version"]), "state": "unloaded", "sha256": None})
    return web.json_response({
        "models": [{"name": n, "versions": sorted(rows, key=lambda r: r["version"])}
                   for n, rows in sorted(models.items())],
        "engines": status.get("engines", {}), "repository": status.get("repository"),
        "state": status.get("state")})


@routes.post("/admin/models/{name}/versions")
async def upload_version(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid model name {name!r}: letters, digits, '_', '.', '-'",
                           code="invalid_model_name", param="name")
    if not request.content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(f"content type {request.content_type!r} is not accepted; "
                                   "send multipart/form-data")
    d, max_body = request.app[DISPATCHER], request.app[SETTINGS].max_body
    loop = asyncio.get_running_loop()
    repo = await _repository_root(d)
    staging = await loop.run_in_executor(None, _make_staging, repo)
    try:
        parts = await _receive(request, staging, max_body)
        limits = UploadLimits(max_file_bytes=max_body, max_total_bytes=EXTRACT_FACTOR * max_body)
        spec = await loop.run_in_executor(None, _assemble, staging, parts, name, limits)
        vdir = staging / "version"
        info = (await d.control("validate", {"name": name, "version": 1,
                                             "path": str(vdir)}))["info"]
        _check_processing(spec, info)
    except BaseException:
        await loop.run_in_executor(None, shutil.rmtree, staging, True)
        raise
    # Past this point the repository changes: finish (and clean up) even if the client goes.
    return await asyncio.shield(_commit(d, repo, name, staging, spec, info))


async def _repository_root(d: Dispatcher) -> Path:
    repo = (await d.control("status")).get("repository") or {}
    if not repo.get("root"):
        raise FerryError("the supervisor does not report its model repository",
                         code="repository_unavailable", status=503)
    return Path(repo["root"])


def _make_staging(repo: Path) -> Path:
    # Inside the repository: the final rename stays on one file system, so it is atomic.
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=repo))
    except OSError as exc:
        raise FerryError(f"cannot write into the model repository: {exc.strerror}",
                         code="repository_not_writable", status=503) from None
    (staging / "version").mkdir()
    return staging


async def _receive(request: web.Request, staging: Path, max_body: int) -> _Parts:
    """Stream every part to disk; the whole request is bounded by `max_body`."""
    got, used = _Parts(), 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):
                raise InvalidInput("nested multipart bodies are not accepted",
                                   code="invalid_multipart")
            target, limit, what = _target_for(part, staging, got)
            with LimitedFile(target, min(limit, max_body - used), what) as out:
                while chunk := await part.read_chunk(1 << 16):
                    out.write(chunk)
            used += out.size
    # aiohttp's errors for a malformed body
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise InvalidInput(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    return got


def _target_for(part: Any, staging: Path, got: _Parts) -> tuple[Path, int, str]:
    field = part.name
    if field in TOML_FIELDS:
        if got.toml:
            raise InvalidInput("model.toml is given twice", code="duplicate_file",
                               param="model.toml")
        got.toml = True
        return staging / "version" / "model.toml", MAX_TOML_BYTES, "model.toml"
    if field == "weights":
        if got.weights is not None:
            raise InvalidInput("send one weights file, or an archive for several",
                               code="duplicate_file", param="weights")
        if not part.filename:
            raise InvalidInput("the weights part needs a file name (the name model.toml's "
                               "'weights' refers to)", code="missing_filename", param="weights")
        got.weights = safe_filename(part.filename)
        if got.weights == "model.toml":
            raise InvalidInput("send model.toml in its own part", code="invalid_input",
                               param="weights")
        return staging / "version" / got.weights, 1 << 62, "the weights file"
    if field == "archive":
        if got.archive:
            raise InvalidInput("send one archive", code="duplicate_file", param="archive")
        got.archive = True
        return staging / "archive", 1 << 62, "the archive"
    raise InvalidInput(f"unexpected form field {field!r}: send 'model.toml', 'weights' or "
                       "'archive'", code="unexpected_field", param=str(field))


def _assemble(staging: Path, parts: _Parts, name: str, limits: UploadLimits) -> ModelSpec:
    """Extract the archive beside the loose parts, then parse model.toml."""
    vdir = staging / "version"
    if parts.archive:
        extract = staging / "extract"
        extract.mkdir()
        extract_archive(staging / "archive", extract, limits)
        (staging / "archive").unlink()
        hoist_single_dir(extract)
        for child in extract.iterdir():
            if (vdir / child.name).exists():
                raise InvalidInput(f"{child.name!r} is both in the archive and a separate part",
                                   code="duplicate_file", param="archive")
            os.rename(child, vdir / child.name)
    elif parts.weights is None:
        raise InvalidInput("no weights: send a 'weights' file part or an 'archive' part",
                           code="missing_weights", param="weights")
    if not (vdir / "model.toml").is_file():
        raise InvalidInput("no model.toml: send a 'model.toml' part or put it in the archive",
                           code="missing_model_toml", param="model.toml")
    check_tree(vdir)
    return load_spec(vdir, name, 1)


def _check_processing(spec: ModelSpec, info: dict[str, Any]) -> None:
    """[preprocess] must fit the input the engine reported, [postprocess] its output."""
    if "preprocess" not in spec.sections:
        return
    post = spec.sections.get("postprocess")
    bind_to_model(image_spec(spec.sections["preprocess"]),
                  classify_spec(post) if post is not None else None,
                  info["inputs"], info["outputs"])


async def _commit(d: Dispatcher, repo: Path, name: str, staging: Path, spec: ModelSpec,
                  info: dict[str, Any]) -> web.Response:
    loop = asyncio.get_running_loop()
    try:
        version, final, created = await loop.run_in_executor(None, _install, repo, name,
                                                             staging)
        try:
            result = await d.control("load", {"model": name})
        except FerryError:
            await loop.run_in_executor(None, _uninstall, repo / name, final, staging, created)
            raise
    finally:
        await loop.run_in_executor(None, shutil.rmtree, staging, True)
    state = (((await d.control("status"))["models"].get(name) or {}).get("versions", {})
             .get(str(version), {}).get("state", "not_selected"))
    body = {"name": name, "version": version, "sha256": spec.sha256, "state": state,
            "engine": spec.engine, "inputs": info.get("inputs", []),
            "outputs": info.get("outputs", []), "loaded": result.get("loaded", []),
            "unloaded": result.get("unloaded", [])}
    return web.json_response(body, status=201,
                             headers={"Location": f"/v2/models/{name}/versions/{version}"})


def _install(repo: Path, name: str, staging: Path) -> tuple[int, Path, bool]:
    """Rename the staged version to `<repo>/<name>/<N>`; N is reserved by an exclusive mkdir
    (rename(2) then replaces that empty directory atomically)."""
    model_dir = repo / name
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        raise FerryError(f"{name!r} in the repository is a symlink or a file; uploads write only "
                         "into real model directories inside the repository",
                         code="model_dir_conflict", status=409)
    created = False
    try:
        model_dir.mkdir()
        created = True
    except FileExistsError:
        pass
    version = _next_version(model_dir)
    while True:
        final = model_dir / str(version)
        try:
            final.mkdir()
            break
        except FileExistsError:
            version += 1
    try:
        os.rename(staging / "version", final)
    except OSError:
        final.rmdir()
        if created:
            _rmdir_if_empty(model_dir)
        raise
    return version, final, created


def _uninstall(model_dir: Path, final: Path, staging: Path, created: bool) -> None:
    os.rename(final, staging / "rolled-back")    # atomic: the repository is as before
    if created:
        _rmdir_if_empty(model_dir)


def _next_version(model_dir: Path) -> int:
    numbers = [int(p.name) for p in model_dir.iterdir()
               if p.name.isascii() and p.name.isdigit()]
    return max(numbers, default=0) + 1


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
