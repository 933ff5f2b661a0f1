"""Load shedding: refuse a generation the engine could not start soon, before it costs anything.

With `[server] max_waiting` (requests waiting in an engine's queue for a model) or
`max_queue_wait_s` (how long the oldest of them has waited) set, the HTTP text paths ask
`precheck()` before they tokenize, and `Dispatcher.generate` asks `check()` before it sends
anything: a generation that would push the queue past the limit, or
join a queue whose head has already waited the limit, is refused with 429 `overloaded` and
`Retry-After`, which a router of the field (vllm-router, sglang-router, llm-d) takes as "try
another host". Nothing was sent to the engine, so no KV block was taken. HTTP (JSON, SSE,
WebSocket), ZMQ and batch items all start generations through the dispatcher; batch items
wait and retry rather than fail (frontends/http/batch_runner.py).

Every worker judges by a snapshot of the engine's own stats (its queue, running batch and
batch limit), refreshed in the background once it is older than `FRESH_S` and awaited when
older than `STALE_S` (after an idle spell) or before refusing on one that is not fresh, plus
the generations this worker sent since that snapshot was asked for. Generations other workers sent within those few tens of milliseconds
are not seen: the bound is approximate by that much, never by more.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from daemon import protocol as P
from daemon.errors import FerryError, Overloaded

__all__ = ["ShedLimits", "LoadShedder", "FRESH_S", "STALE_S"]

log = logging.getLogger(__name__)

FRESH_S = 0.05     # a snapshot this young is used as it is
STALE_S = 1.0      # one older than this is refreshed before it is believed

QUERY_TIMEOUT_S = 1.0
# Dispatcher.call_engine: (engine id, message, timeout) → the engine's reply
EngineCall = Callable[..., Awaitable[P.Message]]


@dataclass(slots=True, frozen=True)
class ShedLimits:
    max_waiting: int = 0            # 0: off
    max_queue_wait_s: float = 0.0   # 0: off

    @property
    def on(self) -> bool:
        return self.max_waiting > 0 or self.max_queue_wait_s > 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ShedLimits:
        """From the `load_shedding` table the supervisor publishes with the placement."""
        section = config.get("load_shedding") or {}
        try:
            return cls(int(section.get("max_waiting", 0)),
                       float(section.get("max_queue_wait_s", 0.0)))
        except (TypeError, ValueError):
            log.warning("ignoring malformed load-shedding settings %r", section)
            return cls()


@dataclass(slots=True)
class _Snapshot:
    asked_at: float = 0.0           # when the stats were asked for (time.monotonic())
    models: dict[str, dict[str, Any]] = field(default_factory=dict)   # "name:ver" → stats
    refreshing: asyncio.Task | None = None


class LoadShedder:
    def __init__(self, call: EngineCall) -> None:
        self.call = call
        self.limits = ShedLimits()
        self._snaps: dict[str, _Snapshot] = {}
        # generations sent per (engine, "name:ver"), and that count when a snapshot was asked
        self._sent: dict[tuple[str, str], int] = {}
        self._sent_at_ask: dict[tuple[str, str], int] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.limits = ShedLimits.from_config(config)

    async def precheck(self, engines: list[str], model: str, version: int) -> None:
        """Raise `Overloaded` if every engine hosting `model` v`version` would refuse a
        generation now: called before tokenizing, so a refused request costs no tokenizer
        time either. `check()` still decides (and counts) when the generation starts."""
        if not self.limits.on or not engines:
            return
        refusal: Overloaded | None = None
        for engine in engines:
            refusal = await self._verdict(engine, f"{model}:{version}")
            if refusal is None:
                return
        if refusal is not None:
            raise refusal

    async def check(self, engine: str, model: str, version: int) -> None:
        """Raise `Overloaded` if a generation for `model` v`version` on `engine` would exceed
        the limits; otherwise count it as sent."""
        key = f"{model}:{version}"
        if self.limits.on:
            refusal = await self._verdict(engine, key)
            if refusal is not None:
                raise refusal
        self._sent[(engine, key)] = self._sent.get((engine, key), 0) + 1

    async def _verdict(self, engine: str, key: str) -> Overloaded | None:
        snap = self._snaps.setdefault(engine, _Snapshot())
        age = time.monotonic() - snap.asked_at
        if age > STALE_S:
            await self._refreshed(engine, snap)
        elif age > FRESH_S:
            self._start_refresh(engine, snap)
        refusal = self._judge(engine, key, snap)
        if refusal is not None and time.monotonic() - snap.asked_at > FRESH_S:
            # refuse on a fresh view only: the queue may have drained since
            await self._refreshed(engine, snap)
            refusal = self._judge(engine, key, snap)
        return refusal

    def _start_refresh(self, engine: str, snap: _Snapshot) -> asyncio.Task:
        if snap.refreshing is None:
            snap.refreshing = asyncio.ensure_future(self._refresh(engine, snap))
        return snap.refreshing

    async def _refreshed(self, engine: str, snap: _Snapshot) -> None:
        await asyncio.shield(self._start_refresh(engine, snap))

    async def _refresh(self, engine: str, snap: _Snapshot) -> None:
        asked = time.monotonic()
        counts = {k: n for k, n in self._sent.items() if k[0] == engine}
        try:
            reply = await self.call(engine, P.StatsQuery(uuid.uuid4().hex),
                                    timeout_s=QUERY_TIMEOUT_S)
            stats = getattr(reply, "stats", {})
        except asyncio.TimeoutError:
            log.debug("no load snapshot of engine %s in time; keeping the last", engine)
            return      # a busy engine: its last queue is still the best evidence
        except FerryError as exc:
            # The engine is gone (dead or restarting): the queue it had is no evidence of the
            # next one's, and refusing by it would answer 429 "queue full" for a host whose
            # trouble is a 503. Judge nothing until it answers again.
            log.debug("no load snapshot of engine %s: %s", engine, exc)
            stats = {}
        finally:
            snap.refreshing = None
        snap.asked_at, snap.models = asked, stats.get("models", {})
        for k, n in counts.items():
            self._sent_at_ask[k] = n

    def _judge(self, engine: str, key: str, snap: _Snapshot) -> Overloaded | None:
        s = snap.models.get(key)
        if not s or "waiting" not in s:
            return None     # not an LLM, or not known yet: nothing to judge by
        lim = self.limits
        since = self._sent.get((engine, key), 0) - self._sent_at_ask.get((engine, key), 0)
        free_slots = max(0, int(s.get("max_num_seqs", 0)) - int(s.get("running", 0)))
        # this one and those sent since the snapshot queue once the free batch slots are taken
        waiting = max(0, int(s["waiting"]) + since + 1 - free_slots)
        if lim.max_waiting and waiting > lim.max_waiting:
            return Overloaded(f"the engine's queue for {key} is full ({lim.max_waiting} "
                              "requests waiting); retry later or on another host",
                              retry_after=1.0)
        oldest = float(s.get("oldest_waiting_s", 0.0))
        if lim.max_queue_wait_s and oldest > 0 and waiting > 0:
            waited = oldest + time.monotonic() - snap.asked_at
            if waited >= lim.max_queue_wait_s:
                return Overloaded(f"requests for {key} have waited {waited:.1f} s in the "
                                  f"engine's queue (limit {lim.max_queue_wait_s:g} s); retry "
                                  "later or on another host",
                                  retry_after=float(max(1, math.ceil(waited))))
        return None
