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

`OPS` maps each operation to the typed arguments it reads (each parses the message's `args`
map, refusing a bad one with its own stable code) and its handler. Handlers see the supervisor
only through `ControlHost`, the few attributes and methods they need.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon import protocol as P
from daemon.config import Config
from daemon.control_args import (IndexArgs, LoadArgs, LogLevelArgs, ModelArgs, NoArgs,
                                 RegionArgs, RegionNameArgs, RoleArgs, ValidateArgs)
from daemon.errors import FerryError, InvalidInput, ModelNotFound
from daemon.model_override import materialize
from daemon.model_version import ModelVersion
from daemon.repository import scan, select_versions

__all__ = ["ControlHost", "OPS", "handle_control"]

Result = dict[str, Any]
VersionKey = tuple[str, int]


class ControlHost(Protocol):
    """The supervisor as control operations see it."""
    cfg: Config
    epoch: int
    log_level: str
    frontends_ready: set[str]
    regions: dict[str, dict[str, Any]]
    repository_lock: asyncio.Lock
    models: dict[VersionKey, ModelVersion]

    def alive_engines(self) -> list[str]: ...
    async def engine_call(self, eid: str, msg: P.Message, timeout_s: float = ...) -> P.Message: ...
    async def load_version(self, name: str, version: int, path: Path) -> bool: ...
    async def unload_versions(self, keys: list[VersionKey]) -> None: ...
    async def validate(self, name: str, version: int, path: Path) -> Result: ...
    async def reload(self) -> None: ...
    def placement(self) -> P.Placement: ...
    def publish(self) -> None: ...


# -- handlers ----------------------------------------------------------------------------------

def _by_sha(sup: ControlHost, name: str) -> str:
    """A loaded version's SHA-256 id stands for its model's name."""
    for mv in sup.models.values():
        if mv.sha256 is not None and mv.sha256 == name.lower():
            return mv.name
    return name


async def _index(sup: ControlHost, args: IndexArgs) -> Result:
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
    if args.ready:
        rows = [r for r in rows if r["state"] == "READY"]
    return {"models": rows}


def _check_control_mode(sup: ControlHost) -> None:
    # Triton refuses explicit loads and unloads unless its model control mode allows them
    if sup.cfg.repository.control_mode == "none":
        raise InvalidInput("explicit model load / unload is not allowed when "
                           "repository.control_mode is \"none\"; set it to \"explicit\" "
                           "(or \"poll\")", code="model_control_disabled")


def _repository(sup: ControlHost, args: LoadArgs) -> Path:
    """The repository a load reads: the configured one, or a frontend's upload of the model's
    files (Triton's file: parameters), which must lie under the state directory's uploads."""
    if args.repository is None:
        return Path(sup.cfg.model_repository)
    uploads = (sup.cfg.state_dir / "model-uploads").resolve()
    path = Path(args.repository).resolve()
    if not path.is_relative_to(uploads):
        raise InvalidInput("a load's repository must be an upload under the state directory",
                           code="bad_message")
    return path


async def _load(sup: ControlHost, args: LoadArgs) -> Result:
    name = _by_sha(sup, args.model)
    versions = scan(_repository(sup, args)).get(name)
    if not versions:
        # "failed to load": Triton's wording, which its clients match
        raise ModelNotFound(f"failed to load {name!r}: it is not in the repository",
                            param="model")
    wanted = select_versions(versions, sup.cfg.repository.version_policy)
    overrides = args.checked_overrides()
    async with sup.repository_lock:
        try:
            return await _load_locked(sup, name, wanted, overrides)
        finally:
            _prune_overrides(sup, name)


async def _load_locked(sup: ControlHost, name: str, wanted: dict[int, Path],
                       overrides: dict[str, Any] | None) -> Result:
    if overrides:
        # Triton's parameters.config: engines load a private, rewritten copy, in a directory of
        # its own, so a failed reload never rewrites the copy the serving version came from
        stamp = uuid.uuid4().hex[:12]
        base = _overrides_dir(sup, name)
        wanted = {v: materialize(p, base / f"{v}-{stamp}", overrides)
                  for v, p in wanted.items()}
    loaded = []
    for v, path in sorted(wanted.items()):
        key = (name, v)
        if key in sup.models and sup.models[key].state == "ready" \
                and sup.models[key].path == path and not overrides:
            continue        # idempotent; a new config (or dropping one) reloads in place
        serving = key in sup.models and sup.models[key].state == "ready"
        if not await sup.load_version(name, v, path):
            failed = sup.models[key]
            code, status = failed.error_code
            if not serving:         # a failed reload keeps serving what it had
                del sup.models[key]
                sup.publish()
            raise FerryError(f"model {name!r} version {v} failed to load: "
                             f"{failed.error or 'load failed'}", code=code, status=status)
        loaded.append(v)
    stale = [k for k in sup.models if k[0] == name and k[1] not in wanted]
    await sup.unload_versions(stale)
    # epoch: the placement that shows the result; frontends wait for it before answering
    return {"loaded": loaded, "unloaded": [v for _, v in stale], "epoch": sup.epoch}


def _overrides_dir(sup: ControlHost, name: str) -> Path:
    return sup.cfg.state_dir / "model-overrides" / name


def _prune_overrides(sup: ControlHost, name: str) -> None:
    """Remove override copies of `name` that no loaded version uses (earlier configs, and the
    copy a failed load made)."""
    base = _overrides_dir(sup, name)
    if not base.is_dir():
        return
    used = {m.path for k, m in sup.models.items() if k[0] == name}
    for copy in base.iterdir():
        if copy not in used:
            shutil.rmtree(copy, ignore_errors=True)


async def _unload(sup: ControlHost, args: ModelArgs) -> Result:
    name = _by_sha(sup, args.model)
    keys = [k for k in sup.models if k[0] == name]
    if not keys:
        raise ModelNotFound(f"model {name!r} is not loaded", param="model")
    async with sup.repository_lock:
        await sup.unload_versions(keys)
    return {"unloaded": [v for _, v in keys], "epoch": sup.epoch}


async def _register_region(sup: ControlHost, args: RegionArgs) -> Result:
    name, key, offset, nbytes = args.name, args.key, args.offset, args.nbytes
    if name in sup.regions:
        raise InvalidInput(f"region {name!r} is already registered", code="shm_region_exists")
    if len(sup.regions) >= sup.cfg.shm.max_regions:
        raise FerryError(f"{len(sup.regions)} shared-memory regions are registered, the most "
                         f"shm.max_regions allows; unregister one first",
                         code="shm_too_many_regions", status=429)
    done = []
    try:
        for eid in sup.alive_engines():
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


async def _unregister_region(sup: ControlHost, args: RegionNameArgs) -> Result:
    name = args.name
    names = list(sup.regions) if name is None else [name]
    if name is not None and name not in sup.regions:
        raise InvalidInput(f"region {name!r} is not registered", code="shm_unknown_region")
    for n in names:
        del sup.regions[n]
        for eid in sup.alive_engines():
            try:
                await sup.engine_call(eid, P.UnregisterRegion(uuid.uuid4().hex, n), timeout_s=10)
            except FerryError:
                pass   # a restarted engine never mapped it
    sup.publish()
    return {}


async def _log_level(sup: ControlHost, args: LogLevelArgs) -> Result:
    level = args.level
    if level is None:
        return {"level": sup.log_level.lower()}
    logging.getLogger().setLevel(level.upper())
    sup.log_level = level
    for eid in sup.alive_engines():
        try:
            await sup.engine_call(eid, P.SetLogLevel(uuid.uuid4().hex, level), timeout_s=10)
        except FerryError:
            pass   # a restarting engine starts with sup.log_level
    sup.publish()   # frontends apply it from the placement's config
    return {"level": level, "epoch": sup.epoch}


async def _epoch(sup: ControlHost, args: NoArgs) -> Result:
    return {"epoch": sup.epoch}     # the caller waits until it routes by this epoch


async def _frontend_ready(sup: ControlHost, args: RoleArgs) -> Result:
    sup.frontends_ready.add(args.role)
    return {}


async def _validate(sup: ControlHost, args: ValidateArgs) -> Result:
    return {"info": await sup.validate(args.name, args.version, args.path)}


async def _reload(sup: ControlHost, args: NoArgs) -> Result:
    await sup.reload()
    return {}


async def _status(sup: ControlHost, args: NoArgs) -> Result:
    pl = sup.placement()
    repo = sup.cfg.repository
    return {"state": pl.state, "engines": pl.engines, "models": pl.models,
            "regions": pl.regions,
            "repository": {"root": str(sup.cfg.model_repository),
                           "control_mode": repo.control_mode,
                           "version_policy": repo.version_policy}}


@dataclass(frozen=True, slots=True)
class Op:
    """An operation: how its arguments are read, and what runs them. `precheck` runs first:
    a refusal that holds whatever the arguments are (Triton answers a load in control mode
    "none" with that, even for a bad name)."""
    parse: Callable[[dict[str, Any]], Any]
    run: Callable[[ControlHost, Any], Awaitable[Result]]
    precheck: Callable[[ControlHost], None] | None = None


OPS: dict[str, Op] = {
    "epoch": Op(NoArgs.parse, _epoch),
    "frontend_ready": Op(RoleArgs.parse, _frontend_ready),
    "index": Op(IndexArgs.parse, _index),
    "load": Op(LoadArgs.parse, _load, _check_control_mode),
    "unload": Op(ModelArgs.parse, _unload, _check_control_mode),
    "register_region": Op(RegionArgs.parse, _register_region),
    "unregister_region": Op(RegionNameArgs.parse, _unregister_region),
    "validate": Op(ValidateArgs.parse, _validate),
    "log_level": Op(LogLevelArgs.parse, _log_level),
    "reload": Op(NoArgs.parse, _reload),
    "status": Op(NoArgs.parse, _status),
}


async def handle_control(sup: ControlHost, op: str, args: dict[str, Any]) -> Result:
    entry = OPS.get(op) if isinstance(op, str) else None
    if entry is None:
        raise InvalidInput(f"unknown control operation {op!r}", code="unknown_operation")
    if entry.precheck is not None:
        entry.precheck(sup)
    if not isinstance(args, dict):
        raise InvalidInput("a control message's args are a map", code="bad_message")
    return await entry.run(sup, entry.parse(args))
