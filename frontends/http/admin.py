"""Admin API: sessions, API keys, the request log and the host's resources.

    POST   /admin/login                 {"username", "password", "scopes"?, "ttl_s"?} -> JWT
    POST   /admin/tokens                create; the plaintext `api_key` is in this reply only
    GET    /admin/tokens[?include_revoked=true]
    GET    /admin/tokens/{id}
    DELETE /admin/tokens/{id}           revoke (idempotent)
    POST   /admin/tokens/{id}/rotate    new secret, same id and settings; old secret refused
    GET    /admin/requests?model=&status=&key_id=&since=&until=&limit=&cursor=
    GET    /admin/system                CPU, memory, the daemon's processes, shared memory, GPUs

Every route but login needs the `admin` scope (frontends/http/security.py), whatever
`auth.required` says. Users are created with `ferry users create NAME`. A change made here
takes effect in this process at once and in the other frontend processes within the
authenticator's 2 s cache.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.cli_tokens import parse_expiry
from daemon.errors import FerryError, InvalidInput, Unauthorized
from frontends.http.json_body import decode_json
from frontends.http.security import ACCESS, client_ip

__all__ = ["routes", "setup", "json_object", "parse_time"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
_SESSION_TTL_S = 3600
_KEY_FIELDS = {"name", "scopes", "models", "rpm", "tpm", "max_concurrent", "expires",
               "expires_at", "allow_ips"}
_LOG_FILTERS = {"model", "status", "key_id", "since", "until", "limit", "cursor"}
_SHM = Path("/dev/shm")


def setup(app: web.Application) -> None:
    app.add_routes(routes)


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (any content type: curl's default form type included)."""
    raw = await request.read()
    body = decode_json(raw) if raw else None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_json")
    return body


def parse_time(value: str, param: str) -> float:
    """Unix seconds from `1735689600(.5)` or ISO 8601 (naive means UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{param} must be Unix seconds or an ISO 8601 time",
                           param=param) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _access(request: web.Request):
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    return access


# -- sessions -----------------------------------------------------------------------------------

@routes.post("/admin/login")
async def login(request: web.Request) -> web.Response:
    access = _access(request)
    access.admit_login(client_ip(request))
    body = await json_object(request)
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise InvalidInput("'username' and 'password' (strings) are required",
                           code="missing_parameter")
    scopes = body.get("scopes", ["admin"])
    ttl = body.get("ttl_s", _SESSION_TTL_S)
    if not isinstance(scopes, list) or not _strings(scopes):
        raise InvalidInput("'scopes' must be a list of strings", param="scopes")
    user = await access.state.users.verify(username, password)
    if user is None:
        raise Unauthorized("wrong username or password", code="invalid_credentials")
    token = access.jwt.issue(f"user:{user.username}", scopes, ttl, token_version=user.token_version)
    log.info("admin session for %r issued (scopes %s)", user.username, sorted(set(scopes)))
    return web.json_response({"access_token": token, "token_type": "bearer",
                              "expires_in": ttl, "scopes": sorted(set(scopes))})


# -- API keys -----------------------------------------------------------------------------------

def _key_args(body: dict[str, Any]) -> dict[str, Any]:
    unknown = set(body) - _KEY_FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}; expected {sorted(_KEY_FIELDS)}",
                           code="unknown_parameter", param=sorted(unknown)[0])
    if body.get("name") is None:     # null too: it is dropped below, like every null
        raise InvalidInput("'name' is required", code="missing_parameter", param="name")
    args: dict[str, Any] = {
        k: body[k] for k in ("name", "scopes", "models", "rpm", "tpm", "max_concurrent",
                             "allow_ips") if k in body and body[k] is not None}
    expires = body.get("expires", body.get("expires_at"))
    if expires is not None:
        args["expires_at"] = parse_expiry(expires, time.time())
    for field in ("scopes", "models", "allow_ips"):
        value = args.get(field)
        if value is not None and not _strings(value):
            raise InvalidInput(f"'{field}' must be a list of strings", param=field)
    return args


def _strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value))


@routes.post("/admin/tokens")
async def create_token(request: web.Request) -> web.Response:
    access = _access(request)
    created = await access.state.keys.create(**_key_args(await json_object(request)))
    return web.json_response({**created.key.to_dict(), "api_key": created.plaintext},
                             status=201)


@routes.get("/admin/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    include = request.query.get("include_revoked", "false").lower() in ("1", "true", "yes")
    keys = await _access(request).state.keys.list(include_revoked=include)
    return web.json_response({"object": "list", "data": [k.to_dict() for k in keys]})


@routes.get("/admin/tokens/{key_id}")
async def get_token(request: web.Request) -> web.Response:
    key = await _access(request).state.keys.get(request.match_info["key_id"])
    return web.json_response(key.to_dict())


@routes.delete("/admin/tokens/{key_id}")
async def revoke_token(request: web.Request) -> web.Response:
    access = _access(request)
    key = await access.state.keys.revoke(request.match_info["key_id"])
    access.auth.invalidate(key.id)
    return web.json_response(key.to_dict())


@routes.post("/admin/tokens/{key_id}/rotate")
async def rotate_token(request: web.Request) -> web.Response:
    access = _access(request)
    created = await access.state.keys.rotate(request.match_info["key_id"])
    access.auth.invalidate(created.key.id)
    return web.json_response({**created.key.to_dict(), "api_key": created.plaintext})


# -- request log --------------------------------------------------------------------------------

def _log_filters(query: Any) -> dict[str, Any]:
    unknown = set(query) - _LOG_FILTERS
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; expected "
                           f"{sorted(_LOG_FILTERS)}", code="unknown_parameter",
                           param=sorted(unknown)[0])
    out: dict[str, Any] = {k: query[k] for k in ("model", "key_id", "cursor") if k in query}
    for name in ("status", "limit"):
        if name in query:
            raw = query[name]
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
                raise InvalidInput(f"{name} must be a positive integer", param=name)
            out[name] = int(raw)
    for name in ("since", "until"):
        if name in query:
            out[name] = parse_time(query[name], name)
    return out


@routes.get("/admin/requests")
async def request_log(request: web.Request) -> web.Response:
    records, cursor = await _access(request).state.requests.query(**_log_filters(request.query))
    data = []
    for r in records:
        row = r.to_dict()
        if row["body"] is None:
            del row["body"]
        data.append(row)
    return web.json_response({"object": "list", "data": data, "next_cursor": cursor})


# -- system -------------------------------------------------------------------------------------

@routes.get("/admin/system")
async def system(request: web.Request) -> web.Response:
    state_dir = _access(request).settings.state_dir
    return web.json_response(await asyncio.to_thread(_snapshot, state_dir))


def _snapshot(state_dir: Path) -> dict[str, Any]:
    import psutil

    mem, swap = psutil.virtual_memory(), psutil.swap_memory()
    disk = psutil.disk_usage(str(state_dir))
    return {
        "time": time.time(),
        "cpu": {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(interval=0.1),
                "load_avg": list(os.getloadavg())},
        "memory": {"total": mem.total, "available": mem.available, "used": mem.used,
                   "percent": mem.percent, "swap_total": swap.total, "swap_used": swap.used},
        "disk": {"path": str(state_dir), "total": disk.total, "used": disk.used,
                 "free": disk.free},
        "processes": (procs := _processes()),
        "shared_memory": _segments({p["pid"] for p in procs}),
        "gpus": _gpus(),
    }


def _role(proc: Any) -> str:
    """`supervisor`, or the role a child was started with (`python -m daemon.child ROLE`)."""
    try:
        cmd = proc.cmdline()
    except Exception:   # psutil.Error: the process is gone or not ours to read
        return "unknown"
    if len(cmd) > 3 and cmd[2] == "daemon.child":
        return cmd[3]
    return "supervisor"


def _processes() -> list[dict[str, Any]]:
    """The daemon's processes: the supervisor (this worker's parent) and all its children."""
    import psutil

    try:
        root = psutil.Process(os.getppid())
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [psutil.Process()]
    out = []
    for proc in procs:
        try:
            with proc.oneshot():
                info = proc.memory_info()
                out.append({"pid": proc.pid, "role": _role(proc), "rss": info.rss,
                            "vms": info.vms, "threads": proc.num_threads(),
                            "cpu_times": sum(proc.cpu_times()[:2]),
                            "started_at": proc.create_time()})
        except psutil.Error:
            continue
    return out


def _segments(pids: set[int]) -> dict[str, Any]:
    """The daemon's POSIX shared-memory segments (`ferry-<instance>-<role>-<owner pid>`, owned
    by one of `pids`): size mapped and bytes actually resident."""
    segments = []
    try:
        entries = list(_SHM.iterdir())
    except OSError:
        entries = []
    for path in entries:
        owner = path.name.rsplit("-", 1)[-1]
        if not path.name.startswith("ferry-") or not owner.isdigit() or int(owner) not in pids:
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        segments.append({"name": path.name, "size": st.st_size, "resident": st.st_blocks * 512})
    return {"segments": sorted(segments, key=lambda s: s["name"]),
            "total_size": sum(s["size"] for s in segments),
            "total_resident": sum(s["resident"] for s in segments)}


def _gpus() -> list[dict[str, Any]]:
    """Per-GPU utilisation and memory through NVML; [] where there is no NVIDIA driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:   # ImportError, or pynvml.NVMLError: no library or no driver
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            entry = {"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                     "utilization_percent": util.gpu, "memory_utilization_percent": util.memory,
                     "memory_total": mem.total, "memory_used": mem.used, "memory_free": mem.free}
            try:
                entry["temperature_c"] = pynvml.nvmlDeviceGetTemperature(
                    handle, pynvml.NVML_TEMPERATURE_GPU)
            except pynvml.NVMLError:
                pass
            out.append(entry)
        return out
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed: %s", exc)
        return []
    finally:
        pynvml.nvmlShutdown()
