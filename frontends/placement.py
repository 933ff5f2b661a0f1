"""Reading the supervisor's `Placement` in a frontend: which model and version a name or SHA-256
id means, and which engine serves it. Pure functions over one placement; the dispatcher
(frontends/dispatch.py) holds the placement it routes by and the links to the engines."""
from __future__ import annotations

from typing import Any, Protocol, TypeVar

from daemon import metrics
from daemon import protocol as P
from daemon.errors import ModelNotFound, ModelUnavailable

__all__ = ["sha_index", "resolve_in", "pick_engine", "EngineLink"]

ShaIndex = dict[str, tuple[str, int]]


class EngineLink(Protocol):
    """What picking an engine reads of a frontend's link to it."""
    alive: bool
    outstanding: int            # requests sent and not yet answered


Link = TypeVar("Link", bound=EngineLink)


def sha_index(pl: P.Placement) -> ShaIndex:
    """SHA-256 id of each published version → (model, version)."""
    index: ShaIndex = {}
    for name, m in pl.models.items():
        for ver, v in m.get("versions", {}).items():
            if v.get("sha256"):
                index[v["sha256"]] = (name, int(ver))
    return index


def resolve_in(pl: P.Placement | None, index: ShaIndex, model: str, version: int | None
               ) -> tuple[str, int, dict[str, Any]]:
    """(name, version, info) of a ready version for a model name or SHA-256 id; version None:
    the newest ready one. 404 model_not_found in Triton's wording (its clients match "Request
    for unknown model"); 503 model_unavailable for a version not ready or a daemon starting."""
    if pl is None:
        raise ModelUnavailable("the daemon is starting")
    if model not in pl.models and model in index:
        model, sha_ver = index[model]
        version = sha_ver if version is None else version
    entry = pl.models.get(model)
    if entry is None:
        raise ModelNotFound(f"Request for unknown model: {model!r} is not found",
                            param="model")
    versions = entry.get("versions", {})
    if version is None:
        ready = [int(v) for v, d in versions.items() if d.get("state") == "ready"]
        if not ready:
            raise ModelUnavailable(f"model {model!r} has no ready version")
        version = max(ready)
    v = versions.get(str(version))
    if v is None:
        raise ModelNotFound(f"Request for unknown model: {model!r} version {version} is "
                            "not found", param="version")
    if v.get("state") != "ready":
        raise ModelUnavailable(f"model {model!r} version {version} is {v.get('state')}")
    metrics.note_model(model)
    return model, version, v["info"]


def pick_engine(pl: P.Placement, links: dict[str, Link], key: tuple[str, int]) -> Link:
    """The least loaded live engine hosting `key`; a restarting one when none is alive (its
    requests wait for it)."""
    v = pl.models[key[0]]["versions"][str(key[1])]
    candidates = [links[e] for e in v.get("engines", []) if e in links]
    if not candidates:
        raise ModelUnavailable(f"no engine hosts {key[0]!r} version {key[1]}")
    alive = [link for link in candidates if link.alive]
    return min(alive or candidates, key=lambda link: link.outstanding)
