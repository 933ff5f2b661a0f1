"""Operations the supervisor performs on request from frontends and the CLI (its control socket).

    epoch            the current placement epoch (frontends catch up before a 404)
    frontend_ready   a frontend is listening
    validate         load a candidate model privately on one engine, then unload it
    index            repository index (Triton's /v2/repository/index)
    load / unload    one model, every version the policy selects (refused in control mode
                     "none", as Triton does); load may carry model.toml overrides
    register_region / unregister_region   client shared-memory regions, daemon-wide
    reload           as SIGHUP
    log_level        read, or set daemon-wide (every process, children restarted later too)
    status           placement and engine states
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput, ModelNotFound
from daemon.model_override import materialize
from daemon.repository import NAME_RE, scan, select_versions

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

__all__ = ["handle_control"]


def _model_arg(args: dict[str, Any]) -> str:
    name = args.get("model")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid model name {name!r}", code="invalid_model_name",
                           param="model")
    return name


def _by_sha(sup: Supervisor, name: str) -> str:
    """A loaded version's SHA-256 id stands for its model's name."""
    for mv in sup.models.values():
        if mv.sha256 is not None and mv.sha256 == name.lower():
            return mv.name
    return name


async def _index(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    on_disk = scan(sup.cfg.model_repository)
    seen = set()
    for (name, version), mv in sorted(sup.models.items()):
        seen.add((name, version))
        row = {"name": name, "version": str(version), "state": mv.state.upper()
               if mv.state != "ready" else "READY"}
        if mv.error:
            row["reason"] = mv.error
        rows.append(row)
    for name, versions in sorted(on_disk.items()):
        for v in sorted(versions):
            if (name, v) not in seen:
                rows.append({"name": name, "version": str(v), "state": "UNAVAILABLE",
                             "reason": "unloaded"})
    if args.get("ready"):        # Triton's "ready": only what can serve now
        rows = [r for r in rows if r["state"] == "READY"]
    return {"models": rows}


def _check_control_mode(sup: Supervisor) -> None:
    # Triton refuses explicit loads and unloads unless its model control mode allows them
    if sup.cfg.repository.control_mode == "none":
        raise InvalidInput("explicit model load / unload is not allowed when "
                           "repository.control_mode is \"none\"; set it to \"explicit\" "
                           "(or \"poll\")", code="model_control_disabled")


def _repository(sup: Supervisor, args: dict[str, Any]) -> Path:
    """The repository a load reads: the configured one, or a frontend's upload of the model's
    files (Triton's file: parameters), which must lie under the state directory's uploads."""
    raw = args.get("repository")
    if raw is None:
        return Path(sup.cfg.model_repository)
    uploads = (sup.cfg.state_dir / "model-uploads").resolve()
    path = Path(str(raw)).resolve()
    if not path.is_relative_to(uploads):
        raise InvalidInput("a load's repository must be an upload under the state directory",
                           code="bad_message")
    return path


async def _load(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    _check_control_mode(sup)
    name = _by_sha(sup, _model_arg(args))
    versions = scan(_repository(sup, args)).get(name)
    if not versions:
        # "failed to load": Triton's wording, which its clients match
        raise ModelNotFound(f"failed to load {name!r}: it is not in the repository",
                            param="model")
    wanted = select_versions(versions, sup.cfg.repository.version_policy)
    overrides = args.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise InvalidInput("overrides must be a map", code="bad_message")
    async with sup._lock:
        if overrides:   # Triton's parameters.config: engines load a private, rewritten copy
            base = sup.cfg.state_dir / "model-overrides" / name
            wanted = {v: materialize(p, base / str(v), overrides) for v, p in wanted.items()}
        loaded = []
        for v, path in sorted(wanted.items()):
            key = (name, v)
            if key in sup.models and sup.models[key].state == "ready" \
                    and sup.models[key].path == path and not overrides:
                continue        # idempotent; a new config (or dropping one) reloads in place
            serving = key in sup.models and sup.models[key].state == "ready"
            if not await sup._load(name, v, path):
                failed = sup.models[key]
                code, status = failed.error_code
                if not serving:         # a failed reload keeps serving what it had
                    del sup.models[key]
                    sup.publish()
                raise FerryError(f"model {name!r} version {v} failed to load: "
                                 f"{failed.error or 'load failed'}", code=code, status=status)
            loaded.append(v)
        stale = [k for k in sup.models if k[0] == name and k[1] not in wanted]
        await sup._unload_many(stale)
    # epoch: the placement that shows the result; frontends wait for it before answering
    return {"loaded": loaded, "unloaded": [v for _, v in stale], "epoch": sup.epoch}


async def _unload(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    _check_control_mode(sup)
    name = _by_sha(sup, _model_arg(args))
    keys = [k for k in sup.models if k[0] == name]
    if not keys:
        raise ModelNotFound(f"model {name!r} is not loaded", param="model")
    async with sup._lock:
        await sup._unload_many(keys)
    return {"unloaded": [v for _, v in keys], "epoch": sup.epoch}


async def _register_region(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    name, key = args.get("name"), args.get("key")
    offset, nbytes = args.get("offset", 0), args.get("nbytes")
    if not (isinstance(name, str) and isinstance(key, str)
            and isinstance(offset, int) and not isinstance(offset, bool)
            and isinstance(nbytes, int) and not isinstance(nbytes, bool)):
        raise InvalidInput("region needs a name, key, offset and byte size",
                           code="shm_bad_region")
    if name in sup.regions:
        raise InvalidInput(f"region {name!r} is already registered", code="shm_region_exists")
    if len(sup.regions) >= sup.cfg.shm.max_regions:
        raise FerryError(f"{len(sup.regions)} shared-memory regions are registered, the most "
                         f"shm.max_regions allows; unregister one first",
                         code="shm_too_many_regions", status=429)
    done = []
    try:
        for eid in sup._alive_engines():
            await sup.engine_call(eid, P.RegisterRegion(uuid.uuid4().hex, name, key, offset,
                                                        nbytes), timeout_s=10)
            done.append(eid)
    except FerryError:
        for eid in done:
            await sup.engine_call(eid, P.UnregisterRegion(uuid.uuid4().hex, name), timeout_s=10)
        raise
    sup.regions[name] = {"name": name, "key": key, "offset": offset, "nbytes": nbytes}
    sup.publish()
    return {}


async def _unregister_region(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    names = list(sup.regions) if name is None else [name]
    if name is not None and name not in sup.regions:
        raise InvalidInput(f"region {name!r} is not registered", code="shm_unknown_region")
    for n in names:
        del sup.regions[n]
        for eid in sup._alive_engines():
            try:
                await sup.engine_call(eid, P.UnregisterRegion(uuid.uuid4().hex, n), timeout_s=10)
            except FerryError:
                pass   # a restarted engine never mapped it
    sup.publish()
    return {}


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


async def _log_level(sup: Supervisor, args: dict[str, Any]) -> dict[str, Any]:
    level = args.get("level")
    if level is None:
        return {"level": sup.log_level.lower()}
    if level not in LOG_LEVELS:
        raise InvalidInput(f"log level {level!r} is not one of {list(LOG_LEVELS)}",
                           code="invalid_log_setting", param="level")
    logging.getLogger().setLevel(level.upper())
    sup.log_level = level
    for eid in sup._alive_engines():
        try:
            await sup.engine_call(eid, P.SetLogLevel(uuid.uuid4().hex, level), timeout_s=10)
        except FerryError:
            pass   # a restarting engine starts with sup.log_level
    sup.publish()   # frontends apply it from the placement's config
    return {"level": level, "epoch": sup.epoch}


async def handle_control(sup: Supervisor, op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "epoch":   # the placement epoch now; the caller waits until it routes by it
        return {"epoch": sup.epoch}
    if op == "frontend_ready":
        sup.frontends_ready.add(str(args.get("role")))
        return {}
    if op == "index":
        return await _index(sup, args)
    if op == "load":
        return await _load(sup, args)
    if op == "unload":
        return await _unload(sup, args)
    if op == "register_region":
        return await _register_region(sup, args)
    if op == "unregister_region":
        return await _unregister_region(sup, args)
    if op == "validate":
        from pathlib import Path
        name, version, path = args.get("name"), args.get("version"), args.get("path")
        if not isinstance(name, str) or not isinstance(version, int) or not isinstance(path, str):
            raise InvalidInput("validate needs name, version and path", code="bad_message")
        return {"info": await sup.validate(name, version, Path(path))}
    if op == "log_level":
        return await _log_level(sup, args)
    if op == "reload":
        await sup.reload()
        return {}
    if op == "status":
        pl = sup.placement()
        repo = sup.cfg.repository
        return {"state": pl.state, "engines": pl.engines, "models": pl.models,
                "regions": pl.regions,
                "repository": {"root": str(sup.cfg.model_repository),
                               "control_mode": repo.control_mode,
                               "version_policy": repo.version_policy}}
    raise InvalidInput(f"unknown control operation {op!r}", code="unknown_operation")
