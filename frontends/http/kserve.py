"""KServe v2 / Triton HTTP routes: health, metadata, infer, system shared memory, repository."""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, TypeGuard

import numpy as np
from aiohttp import web

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput, ModelNotFound, UnsupportedMediaType
from daemon.model_override import parse_config, parse_files, write_upload
from frontends.dispatch import Dispatcher
from frontends.http.appkeys import DISPATCHER, SETTINGS
from frontends.http.errors import request_id_of
from frontends.http.images import reserve_tensor_units
from frontends.http.json_body import decode_json
from frontends.http.kserve_classify import classify_output, labels_for
from frontends.http.kserve_codec import NUMPY_TO_KSERVE, encode_outputs, parse_infer, parse_raw
from frontends.http.kserve_settings import get_logging, get_trace, set_logging, set_trace
from frontends.http.kserve_stats import statistics
from frontends.http.security import ACCESS, principal_of
from frontends.http.textgen import USAGE, Usage

__all__ = ["routes", "SERVER_EXTENSIONS"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
SERVER_EXTENSIONS = ["binary_tensor_data", "system_shared_memory", "model_repository",
                     "model_configuration", "parameters", "statistics", "logging",
                     "classification"]
_VERSIONED = "/v2/models/{model}/versions/{version}"


def _version(request: web.Request) -> int | None:
    raw = request.match_info.get("version")
    if raw is None or raw == "":
        return None
    # "²".isdigit(), yet int("²") fails; int() refuses over 4300 digits; int64 has 18
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidInput(f"version {raw[:32]!r} must be a positive integer of at most 18 "
                           "digits", param="version")
    return int(raw)


def _tensor_meta(t: dict[str, Any]) -> dict[str, Any]:
    return {"name": t["name"], "datatype": NUMPY_TO_KSERVE.get(t["dtype"], t["dtype"]),
            "shape": t["shape"]}


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    from daemon import __version__
    return web.json_response({"name": "ferry", "version": __version__,
                              "extensions": SERVER_EXTENSIONS})


# Triton's logging and trace extensions (frontends/http/kserve_settings.py). "trace" is not in
# SERVER_EXTENSIONS: Ferry does not trace, and its settings routes say so.
routes.get("/v2/logging")(get_logging)
routes.post("/v2/logging")(set_logging)
for _prefix in ("/v2", "/v2/models/{model}"):
    routes.get(_prefix + "/trace/setting")(get_trace)
    routes.post(_prefix + "/trace/setting")(set_trace)


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    pl = request.app[DISPATCHER].placement
    return web.Response(status=200 if pl is not None and pl.state == "ready" else 503)


# Before /v2/models/{model}: "/v2/models/stats" is the statistics of every model (as in
# Triton), not the metadata of a model named "stats".
@routes.get("/v2/models/stats")
@routes.get("/v2/models/{model}/stats")
@routes.get(_VERSIONED + "/stats")
async def model_statistics(request: web.Request) -> web.Response:
    version = _version(request)
    principal = principal_of(request)    # a key with a model allow-list sees only its models
    return web.json_response(await statistics(
        request.app[DISPATCHER], request.match_info.get("model"), version,
        visible=principal.may_use if principal is not None else None))


@routes.get("/v2/models/{model}")
@routes.get(_VERSIONED)
async def model_metadata(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER]
    name, version, info = d.resolve(request.match_info["model"], _version(request))
    versions = sorted(int(v) for v in d.placement.models[name]["versions"])  # type: ignore[union-attr]
    return web.json_response({
        "name": name, "versions": [str(v) for v in versions], "platform": info["platform"],
        "inputs": [_tensor_meta(t) for t in info["inputs"]],
        "outputs": [_tensor_meta(t) for t in info["outputs"]],
    })


@routes.get("/v2/models/{model}/ready")
@routes.get(_VERSIONED + "/ready")
async def model_ready(request: web.Request) -> web.Response:
    version = _version(request)     # a malformed version is the client's 400, not "not ready"
    try:
        request.app[DISPATCHER].resolve(request.match_info["model"], version)
    except ModelNotFound:
        raise
    except FerryError:
        return web.Response(status=503)
    return web.Response(status=200)


@routes.get("/v2/models/{model}/config")
@routes.get(_VERSIONED + "/config")
async def model_config(request: web.Request) -> web.Response:
    d = request.app[DISPATCHER]
    name, version, info = d.resolve(request.match_info["model"], _version(request))
    entry = d.placement.models[name]["versions"][str(version)]  # type: ignore[union-attr]
    batched = int(info["max_batch_size"]) > 0
    return web.json_response({
        "name": name, "platform": info["platform"], "backend": entry.get("engine", ""),
        "max_batch_size": info["max_batch_size"],
        "input": [_config_tensor(t, batched) for t in info["inputs"]],
        "output": [_config_tensor(t, batched) for t in info["outputs"]],
        "version_policy": {"specific": {"versions": [version]}},
        "parameters": entry.get("config", {}),
        "sha256": entry.get("sha256"),
    })


def _config_tensor(t: dict[str, Any], batched: bool) -> dict[str, Any]:
    """A tensor as Triton's model config states it: dims without the batch dim of a batching
    model, BYTES as TYPE_STRING."""
    datatype = _tensor_meta(t)["datatype"]
    return {"name": t["name"], "data_type": "TYPE_" + ("STRING" if datatype == "BYTES"
                                                       else datatype),
            "dims": t["shape"][1:] if batched else t["shape"]}


@routes.post("/v2/models/{model}/infer")
@routes.post(_VERSIONED + "/infer")
async def infer(request: web.Request) -> web.Response:
    ctype = request.content_type
    # Like Triton, any content type carries the JSON header (curl sends form-urlencoded by
    # default); only multipart bodies, which cannot be a KServe request, are refused.
    if ctype.startswith("multipart/"):
        raise UnsupportedMediaType(f"content type {ctype!r} is not accepted; send "
                                   "application/json (with the binary-data extension if needed)")
    body = await request.read()
    d, settings = request.app[DISPATCHER], request.app[SETTINGS]
    head_length = request.headers.get("Inference-Header-Content-Length")
    if head_length is not None and head_length.strip() == "0":     # Triton's raw binary form
        _, _, info = d.resolve(request.match_info["model"], _version(request))
        parsed = parse_raw(body, info["inputs"], int(info["max_batch_size"]))
    else:
        parsed = parse_infer(body, head_length)
    out_shm = {o.name: o.shm for o in parsed.outputs or () if o.shm is not None}
    # A timeout past the wire's bound (24.8 days) is as good as none: clamp, do not refuse.
    timeout_ms = min(parsed.timeout_ms, P.MAX_TIMEOUT_MS)
    timeout_s = timeout_ms / 1000 if timeout_ms else settings.request_timeout_s
    log.debug("infer %s: %d inputs, %d by shared memory", request.match_info["model"],
              len(parsed.arrays), len(parsed.region_refs),
              extra={"request_id": request_id_of(request)})
    # an image model's images count against the key's budget as on its other routes
    units = await reserve_tensor_units(d, request.match_info["model"], _version(request),
                                       parsed.arrays)
    outcome = await d.infer(
        request.match_info["model"], _version(request), parsed.arrays,
        outputs=[o.name for o in parsed.outputs] if parsed.outputs else None,
        timeout_s=timeout_s, request_id=request_id_of(request),
        region_refs=parsed.region_refs, out_shm=out_shm or None)
    try:
        arrays = outcome.arrays
        classes = {o.name: o.classification for o in parsed.outputs or () if o.classification}
        if classes:
            arrays = _classified(d, outcome.model, outcome.version, arrays, classes)
        entries, chunks = encode_outputs(arrays, parsed, out_shm)
    finally:
        outcome.release()
    if units:
        request[USAGE] = Usage(completion_tokens=units)
    head: dict[str, Any] = {"model_name": outcome.model, "model_version": str(outcome.version),
                            "outputs": entries}
    if parsed.id is not None:
        head["id"] = parsed.id
    head_bytes = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return web.Response(body=head_bytes, content_type="application/json")
    resp = web.Response(body=b"".join([head_bytes, *chunks]),
                        content_type="application/octet-stream")
    resp.headers["Inference-Header-Content-Length"] = str(len(head_bytes))
    return resp


def _classified(d: Dispatcher, model: str, version: int, arrays: dict[str, np.ndarray],
                classes: dict[str, int]) -> dict[str, np.ndarray]:
    """The outputs with the classification parameter, as their top-k class strings."""
    _, _, info = d.resolve(model, version)
    entry = d.placement.models[model]["versions"][str(version)]  # type: ignore[union-attr]
    labels = labels_for(entry)
    batched = int(info.get("max_batch_size", 0)) > 0
    return {name: classify_output(name, arr, classes[name], batched, labels.get(name, ()))
            if name in classes else arr for name, arr in arrays.items()}


# -- system shared memory (Triton extension) ---------------------------------------------------

@routes.get("/v2/systemsharedmemory/status")
@routes.get("/v2/systemsharedmemory/region/{region}/status")
async def shm_status(request: web.Request) -> web.Response:
    regions = request.app[DISPATCHER].placement.regions  # type: ignore[union-attr]
    wanted = request.match_info.get("region")
    out = [{"name": r["name"], "key": r["key"], "offset": r["offset"], "byte_size": r["nbytes"]}
           for r in regions if wanted is None or r["name"] == wanted]
    if wanted is not None and not out:
        raise InvalidInput(f"Unable to find system shared memory region: {wanted!r}",
                           code="shm_unknown_region")
    return web.json_response(out)


@routes.post("/v2/systemsharedmemory/region/{region}/register")
async def shm_register(request: web.Request) -> web.Response:
    body = await _json_object(request)
    key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
    if not isinstance(key, str) or not isinstance(offset, int) or not isinstance(size, int) \
            or max(abs(offset), abs(size)) >= 2**63:      # the control message's msgpack ints
        raise InvalidInput("'key' (string), 'offset' and 'byte_size' (integers below 2**63) "
                           "are required", code="shm_bad_region")
    await request.app[DISPATCHER].register_region(request.match_info["region"], key, offset, size)
    return web.json_response({})


@routes.post("/v2/systemsharedmemory/unregister")
@routes.post("/v2/systemsharedmemory/region/{region}/unregister")
async def shm_unregister(request: web.Request) -> web.Response:
    try:
        await request.app[DISPATCHER].unregister_region(request.match_info.get("region"))
    except FerryError as exc:         # the supervisor's error, rebuilt from the wire
        if exc.code != "shm_unknown_region":
            raise
        # Triton answers 200 for a region that is not registered: nothing to undo
    return web.json_response({})


# -- CUDA shared memory: the routes Triton clients call, answered clearly ----------------------
# Registering a CUDA IPC handle needs an engine on that GPU to open it; this build does not open
# them yet (issue 9), so no region is ever registered: status lists none, unregister has nothing
# to do, and register says why after checking the request's form.

@routes.get("/v2/cudasharedmemory/status")
@routes.get("/v2/cudasharedmemory/region/{region}/status")
async def cuda_shm_status(request: web.Request) -> web.Response:
    region = request.match_info.get("region")
    if region is not None:
        raise InvalidInput(f"CUDA shared-memory region {region!r} is not registered",
                           code="shm_unknown_region")
    return web.json_response([])


@routes.post("/v2/cudasharedmemory/region/{region}/register")
async def cuda_shm_register(request: web.Request) -> web.Response:
    body = await _json_object(request)
    handle, device, size = body.get("raw_handle"), body.get("device_id"), body.get("byte_size")
    b64 = handle.get("b64") if isinstance(handle, dict) else None
    if not isinstance(b64, str) or not _is_int(device) or device < 0 \
            or not _is_int(size) or size <= 0:
        raise InvalidInput("'raw_handle' ({\"b64\": string}), 'device_id' (integer >= 0) and "
                           "'byte_size' (integer > 0) are required", code="shm_bad_region")
    pl = request.app[DISPATCHER].placement
    gpus = sorted(e["device"] for e in (pl.engines.values() if pl is not None else ())
                  if str(e.get("device", "")).startswith("cuda"))
    if not gpus:
        raise InvalidInput("CUDA shared memory needs an engine on a CUDA device and this daemon "
                           "runs none; use system shared memory (/v2/systemsharedmemory)",
                           code="cuda_shm_unavailable", param="device_id")
    raise FerryError("CUDA shared-memory registration is not supported by this build yet; use "
                     "system shared memory (/v2/systemsharedmemory)",
                     code="cuda_shm_unsupported", status=501)


@routes.post("/v2/cudasharedmemory/unregister")
@routes.post("/v2/cudasharedmemory/region/{region}/unregister")
async def cuda_shm_unregister(request: web.Request) -> web.Response:
    return web.json_response({})         # none is ever registered


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = decode_json(await request.read())
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", code="invalid_json")
    return body


def _is_int(value: object) -> TypeGuard[int]:
    """An integer (not a bool) that fits the control messages' 64-bit msgpack ints."""
    return isinstance(value, int) and not isinstance(value, bool) and value < 2**63


# -- repository (Triton model repository extension) ---------------------------------------------

@routes.post("/v2/repository/index")
async def repository_index(request: web.Request) -> web.Response:
    body = await _optional_object(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("'ready' must be a boolean", param="ready")
    result = await request.app[DISPATCHER].control("index", {"ready": ready})
    return web.json_response(result.get("models", []))


@routes.post("/v2/repository/models/{model}/load")
async def repository_load(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    params = (await _optional_object(request)).get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object", param="parameters")
    args: dict[str, Any] = {"model": model}
    files = parse_files(model, params)
    if files:
        # Triton's upload: the files are the model, the config (required) describes it
        if "config" not in params:
            raise InvalidInput(f"failed to load {model!r}: model files need a config too",
                               code="invalid_model_config", param="parameters.config")
        overrides = parse_config(model, params["config"], upload=True)
        access = request.app.get(ACCESS)       # holds the state directory's path
        if access is None:
            raise FerryError("the state directory is not open", code="security_unavailable",
                             status=503)
        base = access.settings.state_dir / "model-uploads"
        args["repository"] = str(await asyncio.to_thread(write_upload, base, model,
                                                         overrides, files))
    elif "config" in params:
        args["overrides"] = parse_config(model, params["config"])
    await request.app[DISPATCHER].control("load", args)
    return web.json_response({})


@routes.post("/v2/repository/models/{model}/unload")
async def repository_unload(request: web.Request) -> web.Response:
    await _optional_object(request)
    await request.app[DISPATCHER].control("unload", {"model": request.match_info["model"]})
    return web.json_response({})


async def _optional_object(request: web.Request) -> dict[str, Any]:
    """The repository routes' body: a JSON object, or nothing at all."""
    raw = await request.read()
    return await _json_object(request) if raw.strip() else {}


# -- Ferry's own health routes --------------------------------------------------------------------

@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


# Absolute file system paths in load errors: /readyz is open to anyone, so they are masked.
_ABS_PATH = re.compile(r"(?<![\w.])/[^\s:'\"]+")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Per-model state; `errors` says why each failed version failed (its load error, paths
    masked): a model whose config or tokenizer Ferry cannot serve never reads "ready"."""
    pl = request.app[DISPATCHER].placement
    state = pl.state if pl is not None else "starting"
    models: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    if pl is not None:
        for name, m in pl.models.items():
            versions = m.get("versions", {})
            models[name] = {v: d.get("state") for v, d in versions.items()}
            failed = {v: _ABS_PATH.sub("<path>", str(d.get("error") or "load failed"))
                      for v, d in versions.items() if d.get("state") == "failed"}
            if failed:
                errors[name] = failed
    body = {"status": state, "models": models, **({"errors": errors} if errors else {})}
    return web.json_response(body, status=200 if state == "ready" else 503)
