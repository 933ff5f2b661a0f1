"""Triton's statistics extension: `GET /v2/models[/{model}[/versions/{version}]]/stats`.

The counts live where the work happens: each engine process keeps per-model-version
`InferenceStats` (engines/inference_stats.py) and reports them in its `stats` reply, so whichever
HTTP worker answers, it asks the engines hosting the wanted versions and sums what they say
(a version may be placed on several engines). An engine that does not answer makes the request
fail with 503 rather than report counts that are silently short.

LLM models are served through the OpenAI routes and keep their own counters (see `/metrics`);
they are left out of the list and a request naming one is refused.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, Callable

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput
from engines.inference_stats import DURATIONS, PHASES
from frontends.dispatch import Dispatcher

__all__ = ["statistics", "merge_model_stats", "empty_model_stat"]

STATS_TIMEOUT_S = 2.0


def empty_model_stat() -> dict[str, Any]:
    """A `$model_stat` (without name and version) of a version that has served nothing."""
    return {"last_inference": 0, "inference_count": 0, "execution_count": 0,
            "inference_stats": {name: {"count": 0, "ns": 0} for name in DURATIONS},
            "batch_stats": []}


def _add(into: dict[str, int], more: Any) -> None:
    if isinstance(more, dict):
        into["count"] += int(more.get("count", 0))
        into["ns"] += int(more.get("ns", 0))


def merge_model_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the `$model_stat` parts several engines report for one model version."""
    out = empty_model_stat()
    batches: dict[int, dict[str, Any]] = {}
    for part in parts:
        out["last_inference"] = max(out["last_inference"], int(part.get("last_inference", 0)))
        out["inference_count"] += int(part.get("inference_count", 0))
        out["execution_count"] += int(part.get("execution_count", 0))
        for name, total in out["inference_stats"].items():
            _add(total, part.get("inference_stats", {}).get(name))
        for b in part.get("batch_stats", []):
            size = int(b["batch_size"])
            into = batches.setdefault(size, {"batch_size": size, **{
                phase: {"count": 0, "ns": 0} for phase in PHASES}})
            for phase in PHASES:
                _add(into[phase], b.get(phase))
    out["batch_stats"] = [batches[size] for size in sorted(batches)]
    return out


def _wanted(d: Dispatcher, model: str | None, version: int | None
            ) -> list[tuple[str, int, list[str]]]:
    """(name, version, engines) of the ready versions asked about, tensor models only."""
    pl = d.placement
    if pl is None:
        raise FerryError("the daemon is starting", code="model_unavailable", status=503)
    if model is None:
        names = sorted(pl.models)
    elif version is not None or model not in pl.models:
        # a version that is unknown or not ready, an unknown name: resolve's error; a
        # SHA-256 id: its model and version
        name, ver, _ = d.resolve(model, version)
        names, version = [name], ver if model not in pl.models else version
    else:
        names = [model]
    out = []
    for name in names:
        versions = pl.models[name].get("versions", {})
        for ver in sorted(versions, key=int):
            v = versions[ver]
            if v.get("state") != "ready" or (version is not None and int(ver) != version):
                continue
            if v.get("info", {}).get("kind") == "llm":
                if model is not None:
                    raise InvalidInput(f"model {name!r} is an LLM: Triton statistics are kept "
                                       "for tensor models; see /metrics for LLM counters",
                                       code="statistics_unsupported", param="model")
                continue
            out.append((name, int(ver), list(v.get("engines", []))))
    return out


async def _engine_stats(d: Dispatcher, engines: set[str]) -> dict[str, dict[str, Any]]:
    async def one(eid: str) -> dict[str, Any]:
        try:
            reply = await d.call_engine(eid, P.StatsQuery(uuid.uuid4().hex),
                                        timeout_s=STATS_TIMEOUT_S)
        except (FerryError, asyncio.TimeoutError):
            raise FerryError(f"engine {eid} did not answer; its statistics would be missing",
                             code="stats_unavailable", status=503) from None
        return reply.stats  # type: ignore[attr-defined]
    ids = sorted(engines)
    return dict(zip(ids, await asyncio.gather(*(one(eid) for eid in ids))))


async def statistics(d: Dispatcher, model: str | None, version: int | None, *,
                     visible: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """`$stats_model_response` for every ready tensor model version (those `visible` allows),
    or for those of `model`."""
    wanted = [w for w in _wanted(d, model, version) if visible is None or visible(w[0])]
    stats = await _engine_stats(d, {e for _, _, engines in wanted for e in engines})
    model_stats = []
    for name, ver, engines in wanted:
        parts = [s.get("models", {}).get(f"{name}:{ver}", {}).get("inference")
                 for eid, s in stats.items() if eid in engines]
        merged = merge_model_stats([p for p in parts if isinstance(p, dict)])
        model_stats.append({"name": name, "version": str(ver), **merged})
    return {"model_stats": model_stats}
