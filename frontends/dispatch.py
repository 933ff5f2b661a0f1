"""The frontends' road to the engines: routing by placement, requests in flight, and replay.

Each frontend process talks to every engine directly (DEALER → engine ROUTER over ipc://), with
no broker hop. The supervisor publishes `Placement` on a PUB socket; when an engine's generation
changes (it died and was restarted) the link is rebuilt and every request it held is sent again,
unless it is a stream that already delivered tokens (that one ends with a clear error). A request
id is answered at most once: replies for ids no longer in flight are dropped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
import zmq
import zmq.asyncio

from daemon import metrics
from daemon import protocol as P
from daemon.errors import (EngineDied, FerryError, ModelNotFound, ModelUnavailable,
                           error_from_wire)
from daemon.shm import Arena, RegionMap
from frontends.load_shed import LoadShedder
from frontends.tensor_io import Packed, pack, unpack
from frontends.zmq_reader import LoopSocket

__all__ = ["Dispatcher", "InferOutcome", "Stream"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InferOutcome:
    arrays: dict[str, np.ndarray]
    meta: P.InferResult
    model: str
    version: int
    _release: Any = None

    def release(self) -> None:
        """Return engine-arena blocks; call once the arrays have been read or copied."""
        if self._release is not None:
            self._release()
            self._release = None


@dataclass(slots=True)
class _Req:
    id: str
    engine: str
    key: tuple[str, int]
    msg: P.Message
    buffers: list[Any]
    packed: Packed | None
    future: asyncio.Future | None = None
    queue: asyncio.Queue | None = None
    tokens_seen: int = 0
    timer: metrics.StreamTimer | None = None   # generations: TTFT / inter-token latency
    deadline: asyncio.TimerHandle | None = None  # generations: ends the stream at the deadline


@dataclass(slots=True)
class _Link:
    engine: str
    endpoint: str
    generation: int
    alive: bool
    sock: LoopSocket | None = None
    frees: list[P.ShmLoc] = field(default_factory=list)
    outstanding: int = 0


class Stream:
    """Async iterator over `Tokens` messages of one generation; `cancel()` stops it."""

    def __init__(self, dispatcher: Dispatcher, req: _Req) -> None:
        self._d, self._req = dispatcher, req
        self.id = req.id
        self.done = False

    def __aiter__(self) -> AsyncIterator[P.Tokens]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[P.Tokens]:
        assert self._req.queue is not None
        while not self.done:
            item = await self._req.queue.get()
            if isinstance(item, FerryError):
                self.done = True
                raise item
            if item.finished:
                self.done = True
            yield item

    async def cancel(self) -> None:
        if not self.done:
            self.done = True
            await self._d.cancel(self._req.id)


class Dispatcher:
    def __init__(self, ctx: zmq.asyncio.Context, *, placement_endpoint: str,
                 control_endpoint: str, arena: Arena | None, regions: RegionMap,
                 instance: str, inline_threshold: int,
                 request_timeout_s: float | None = None) -> None:
        self.ctx = ctx
        # server.request_timeout_s: how long a generation may run when its caller sets no limit
        self.request_timeout_s = request_timeout_s
        # request-path sockets: see LoopSocket
        self.sync_ctx: zmq.SyncContext = zmq.Context.shadow(ctx.underlying)
        self.placement_endpoint, self.control_endpoint = placement_endpoint, control_endpoint
        self.arena, self.regions, self.inline_threshold = arena, regions, inline_threshold
        self.engine_prefix = f"ferry-{instance}-eng"
        self.placement: P.Placement | None = None
        self.placement_changed = asyncio.Event()
        self.links: dict[str, _Link] = {}
        self.inflight: dict[str, _Req] = {}
        self.replies: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._sha_index: dict[str, tuple[str, int]] = {}
        self._sub: zmq.Socket | None = None
        # Called with Placement.config whenever it changes (a SIGHUP reload of the settings
        # frontends apply live, e.g. access control).
        self.config_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.shedder = LoadShedder(self.call_engine)     # [server] max_waiting / max_queue_wait_s
        self.config_listeners.append(self.shedder.reconfigure)
        self._config: dict[str, Any] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, wait_s: float = 30.0) -> None:
        # A plain socket the loop watches, so resolve() can also drain it on the spot.
        sub = self.sync_ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.placement_endpoint)
        self._sub = sub
        asyncio.get_running_loop().add_reader(sub.fileno(), self._read_placement)
        self._read_placement()
        self._tasks.append(asyncio.create_task(self._free_loop()))
        deadline = time.monotonic() + wait_s
        while self.placement is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no placement from the supervisor")
            self.placement_changed.clear()
            try:
                await asyncio.wait_for(self.placement_changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        if self._sub is not None:
            asyncio.get_running_loop().remove_reader(self._sub.fileno())
            self._sub.close(0)
            self._sub = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            self._drop_link(link)
        for req in list(self.inflight.values()):
            self._fail(req, EngineDied("frontend shutting down"))

    # -- placement --------------------------------------------------------------------------
    def _read_placement(self) -> bool:
        """Apply every placement message waiting on the socket; True if there was one. ZeroMQ's
        descriptor is edge-triggered, so this drains until the socket reports no input."""
        got = False
        while self._sub is not None and self._sub.poll(0, zmq.POLLIN):
            frames = self._sub.recv_multipart(zmq.NOBLOCK, copy=False)
            got = True
            try:
                msg, _ = P.decode(frames)
            except FerryError:
                log.warning("ignoring a malformed placement message")
                continue
            if isinstance(msg, P.Placement) and (
                    self.placement is None or msg.epoch >= self.placement.epoch):
                self._apply_placement(msg)
        return got

    def _apply_placement(self, msg: P.Placement) -> None:
        self.placement = msg
        if msg.config != self._config:
            self._config = msg.config
            level = msg.config.get("log_level")     # set daemon-wide through /v2/logging
            if level in ("debug", "info", "warning", "error", "critical"):
                logging.getLogger().setLevel(level.upper())
            for listener in self.config_listeners:
                try:
                    listener(msg.config)
                except Exception:      # a listener's bug must not stop placement updates
                    log.exception("applying reloaded settings failed")
        index: dict[str, tuple[str, int]] = {}
        for name, m in msg.models.items():
            for ver, v in m.get("versions", {}).items():
                if v.get("sha256"):
                    index[v["sha256"]] = (name, int(ver))
        self._sha_index = index
        self._sync_regions(msg.regions)
        # the arenas of engines that died or were replaced stay mapped until forgotten
        self.regions.forget_own({f"{self.engine_prefix}{eid}-{e.get('pid')}"
                                 for eid, e in msg.engines.items()})
        for eid, e in msg.engines.items():
            link = self.links.get(eid)
            if link is None or link.generation != e["generation"]:
                if link is not None:
                    self._drop_link(link)
                link = _Link(eid, e["endpoint"], e["generation"], False)
                self.links[eid] = link
            if e["alive"] and not link.alive:
                self._open_link(link)
                self._replay(link)
            link.alive = bool(e["alive"])
        self.placement_changed.set()

    def _open_link(self, link: _Link) -> None:
        sock = self.sync_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)   # requests are bounded by the frontends, not by drops
        sock.setsockopt(zmq.RCVHWM, 0)
        # A link belongs to one engine process: never reconnect to a successor on the same
        # path (it has not loaded its models yet); placement opens a new link for it instead.
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
        # `<pid>-<random>`: the engine reclaims what it lent this link once the pid is gone
        sock.setsockopt(zmq.ROUTING_ID, f"{os.getpid()}-{uuid.uuid4().hex[:12]}".encode())
        sock.connect(link.endpoint)
        link.sock = LoopSocket(sock, lambda frames: self._on_frames(link, frames))
        link.alive = True

    def _drop_link(self, link: _Link) -> None:
        if link.sock is not None:
            link.sock.close()
        link.sock, link.alive = None, False
        link.frees.clear()   # the dead engine's arena was reclaimed with it

    def _replay(self, link: _Link) -> None:
        for req in list(self.inflight.values()):
            if req.engine != link.engine:
                continue
            if req.tokens_seen:
                self._fail(req, EngineDied("the engine restarted after this stream began; "
                                           "partial output was delivered"))
                continue
            log.info("replaying request %s on restarted engine %s", req.id, link.engine)
            self._send(link, req)

    # -- model resolution --------------------------------------------------------------------
    def resolve(self, model: str, version: int | None = None) -> tuple[str, int, dict]:
        """(name, version, info) for a model name or SHA-256 id; version None → latest."""
        try:
            return self._resolve(model, version)
        except (ModelNotFound, ModelUnavailable):
            # A load or unload answered by another worker may have published a placement this
            # one has not read yet: read it now rather than refuse on stale routing.
            if not self._read_placement():
                raise
            return self._resolve(model, version)

    def _resolve(self, model: str, version: int | None) -> tuple[str, int, dict]:
        pl = self.placement
        if pl is None:
            raise ModelUnavailable("the daemon is starting")
        if model not in pl.models and model in self._sha_index:
            model, sha_ver = self._sha_index[model]
            version = sha_ver if version is None else version
        entry = pl.models.get(model)
        if entry is None:
            # Triton's wording: its clients and examples match "Request for unknown model"
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

    async def resolve_fresh(self, model: str, version: int | None = None
                            ) -> tuple[str, int, dict]:
        """`resolve`, but a miss first checks that this worker's placement is current: another
        worker may have just loaded the model (read-your-writes across frontend processes).
        Costs one supervisor round trip, and only when the model is not found or not ready."""
        try:
            return self.resolve(model, version)
        except (ModelNotFound, ModelUnavailable):
            await self.control("epoch", timeout_s=5.0)   # waits until we route by that epoch
            return self.resolve(model, version)

    def _pick_engine(self, key: tuple[str, int]) -> _Link:
        assert self.placement is not None
        v = self.placement.models[key[0]]["versions"][str(key[1])]
        candidates = [self.links[e] for e in v.get("engines", []) if e in self.links]
        if not candidates:
            raise ModelUnavailable(f"no engine hosts {key[0]!r} version {key[1]}")
        alive = [l for l in candidates if l.alive]
        pool = alive or candidates      # a restarting engine still takes requests: they wait
        return min(pool, key=lambda l: l.outstanding)

    # -- requests -----------------------------------------------------------------------------
    def _send(self, link: _Link, req: _Req) -> None:
        if link.sock is None or not link.alive:
            return   # sent on replay when the engine is back
        carries_frees = bool(link.frees) and hasattr(req.msg, "frees")
        if carries_frees:
            req.msg.frees, link.frees = link.frees, []  # type: ignore[attr-defined]
        frames = P.encode(req.msg, req.buffers)
        if carries_frees:
            req.msg.frees = []  # type: ignore[attr-defined]   # a replay must not free twice
        if not link.sock.send(frames):
            log.info("engine %s unreachable; request %s waits for its restart", link.engine,
                     req.id)

    def _register(self, req: _Req) -> None:
        self.inflight[req.id] = req
        link = self.links[req.engine]
        link.outstanding += 1
        self._send(link, req)

    def _finish(self, req: _Req) -> None:
        if self.inflight.pop(req.id, None) is None:
            return
        link = self.links.get(req.engine)
        if link is not None:
            link.outstanding -= 1
        if req.deadline is not None:
            req.deadline.cancel()
        if req.packed is not None and self.arena is not None:
            for loc in req.packed.blocks:
                self.arena.free(loc.offset)
            req.packed.blocks.clear()

    def _fail(self, req: _Req, exc: FerryError) -> None:
        self._finish(req)
        if req.future is not None and not req.future.done():
            req.future.set_exception(exc)
        if req.queue is not None:
            req.queue.put_nowait(exc)

    async def infer(self, model: str, version: int | None, arrays: dict[str, np.ndarray], *,
                    outputs: list[str] | None = None, timeout_s: float | None = None,
                    request_id: str = "", region_refs: list[P.TensorRef] = (),  # type: ignore[assignment]
                    out_shm: dict[str, P.ShmLoc] | None = None) -> InferOutcome:
        for ref in region_refs:
            assert ref.shm is not None
            self.regions.check_client(ref.shm.region)
        for loc in (out_shm or {}).values():
            self.regions.check_client(loc.region)
        name, ver, _info = await self.resolve_fresh(model, version)
        link = self._pick_engine((name, ver))
        packed = pack(arrays, self.arena, self.inline_threshold, list(region_refs))
        rid = uuid.uuid4().hex
        msg = P.Infer(rid, name, ver, packed.refs, outputs,
                      int(timeout_s * 1000) if timeout_s else 0, out_shm, request_id)
        future = asyncio.get_running_loop().create_future()
        req = _Req(rid, link.engine, (name, ver), msg, packed.frames, packed, future=future)
        self._register(req)
        # A timer rather than asyncio.wait_for: no extra task on the request path. The engine
        # enforces the deadline itself; this only guards against an engine that never answers.
        timer = (asyncio.get_running_loop().call_later(timeout_s + 5, self._expire, req)
                 if timeout_s else None)
        try:
            result, buffers = await future
        except asyncio.CancelledError:
            self._finish(req)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        metrics.observe_infer(name, result.queue_us, result.compute_us, result.batch_size)
        arrays_out, frees = unpack(result.outputs, buffers, self.regions, self.engine_prefix)
        # only blocks the engine allocated are freed, never a client's own output window
        frees = [f for f in frees if not out_shm or f not in out_shm.values()]
        engine = req.engine

        def release() -> None:
            lk = self.links.get(engine)
            if lk is not None and lk.alive:
                lk.frees.extend(frees)
        return InferOutcome(arrays_out, result, name, ver, release if frees else None)

    async def generate(self, model: str, version: int | None, prompt_ids: list[int],
                       params: dict[str, Any], request_id: str = "",
                       timeout_s: float | None = None) -> Stream:
        """Start one generation. At `timeout_s` (default: `request_timeout_s`) after the call it
        is cancelled in the engine, its KV blocks freed, and the stream raises a 504
        `deadline_exceeded`: every path (SSE, JSON, WebSocket, ZMQ, batch items) ends here."""
        name, ver, _info = await self.resolve_fresh(model, version)
        link = self._pick_engine((name, ver))
        await self.shedder.check(link.engine, name, ver)   # 429 overloaded before any cost
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        rid = uuid.uuid4().hex
        ref = P.TensorRef("prompt", "int32", (len(prompt_ids),), frame=0)
        msg = P.Generate(rid, name, ver, [ref], params, request_id)
        req = _Req(rid, link.engine, (name, ver), msg, [prompt], None, queue=asyncio.Queue(),
                   timer=metrics.StreamTimer(name, len(prompt_ids)))
        self._register(req)
        limit = timeout_s or self.request_timeout_s
        if limit:
            why = f"the generation ran past the request timeout of {limit:g} s"
            req.deadline = asyncio.get_running_loop().call_later(limit, self._expire, req, why)
        return Stream(self, req)

    def _expire(self, req: _Req, why: str = "") -> None:
        if req.id in self.inflight:
            link = self.links.get(req.engine)
            self._fail(req, FerryError(why or f"no reply from engine {req.engine} in time",
                                       code="deadline_exceeded", status=504))
            if link is not None and link.sock is not None and link.alive:
                link.sock.send(P.encode(P.Cancel(req.id)))

    async def cancel(self, rid: str) -> None:
        req = self.inflight.get(rid)
        if req is None:
            return
        link = self.links.get(req.engine)
        self._fail(req, FerryError("cancelled", code="cancelled", status=499))
        if link is not None and link.sock is not None and link.alive:
            link.sock.send(P.encode(P.Cancel(rid)))

    # -- engine-level calls (stats, regions) ---------------------------------------------------
    async def call_engine(self, engine: str, msg: P.Message, timeout_s: float = 5.0) -> P.Message:
        link = self.links.get(engine)
        if link is None or link.sock is None or not link.alive:
            raise EngineDied(f"engine {engine} is not available")
        fut = asyncio.get_running_loop().create_future()
        self.replies[msg.id] = fut  # type: ignore[attr-defined]
        try:
            link.sock.send(P.encode(msg))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.replies.pop(msg.id, None)  # type: ignore[attr-defined]

    async def engine_stats(self) -> list[dict[str, Any]]:
        out = []
        for eid, link in list(self.links.items()):
            if link.alive:
                reply = await self.call_engine(eid, P.StatsQuery(uuid.uuid4().hex))
                out.append(reply.stats)  # type: ignore[attr-defined]
        return out

    async def register_region(self, name: str, key: str, offset: int, nbytes: int) -> None:
        """Register a client region daemon-wide: the supervisor keeps the registry, maps it in
        every engine and publishes it, so every frontend process sees it."""
        await self.control("register_region", {"name": name, "key": key, "offset": offset,
                                                "nbytes": nbytes})
        await self._await_regions(lambda names: name in names)

    async def unregister_region(self, name: str | None) -> None:
        """Drop one region (or all, for None) everywhere."""
        await self.control("unregister_region", {"name": name})
        await self._await_regions(lambda names: name not in names if name else not names)

    async def _await_regions(self, cond: Any, timeout_s: float = 5.0) -> None:
        await self._await_placement(
            lambda pl: cond({r["name"] for r in pl.regions}), timeout_s)

    async def _await_placement(self, cond: Any, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the placement this worker routes by satisfies
        `cond`; publishing is asynchronous, so a control reply can overtake it."""
        deadline = time.monotonic() + timeout_s
        while self.placement is None or not cond(self.placement):
            self.placement_changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.placement_changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _sync_regions(self, published: list[dict[str, Any]]) -> None:
        want = {r["name"]: r for r in published}
        have = {r["name"] for r in self.regions.status()}
        for name in have - want.keys():
            self.regions.unregister(name)
        for name in want.keys() - have:
            r = want[name]
            try:
                self.regions.register(name, r["key"], r["offset"], r["nbytes"])
            except FerryError as exc:
                log.warning("cannot map published region %s: %s", name, exc.message)

    async def control(self, op: str, args: dict[str, Any] | None = None,
                      timeout_s: float = 120.0) -> dict[str, Any]:
        """Ask the supervisor (repository load/unload, index, reload)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.control_endpoint)
        try:
            await sock.send_multipart(P.encode(P.Control(uuid.uuid4().hex, op, args or {})))
            if not await sock.poll(int(timeout_s * 1000)):
                raise FerryError("the supervisor did not answer", code="supervisor_timeout",
                                 status=504)
            reply, _ = P.decode(await sock.recv_multipart())
        finally:
            sock.close(0)
        if not isinstance(reply, P.ControlReply):
            raise FerryError("unexpected reply from the supervisor", code="internal_error")
        if not reply.ok:
            raise error_from_wire(reply.error or {})
        epoch = reply.result.get("epoch") if isinstance(reply.result, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            await self._await_epoch(epoch)
        return reply.result

    async def _await_epoch(self, epoch: int, timeout_s: float = 5.0) -> None:
        """Read your writes: after a load or unload, answer once this worker routes by the
        placement that op published (the reply can overtake the PUB message)."""
        await self._await_placement(lambda pl: pl.epoch >= epoch, timeout_s)

    # -- replies ------------------------------------------------------------------------------
    def _on_frames(self, link: _Link, frames: list[Any]) -> None:
        try:
            msg, buffers = P.decode(frames)
        except FerryError as exc:
            log.error("malformed reply from engine %s: %s", link.engine, exc.message)
            return
        self._on_reply(msg, buffers)

    def _on_reply(self, msg: P.Message, buffers: list[Any]) -> None:
        rid = getattr(msg, "id", "")
        fut = self.replies.get(rid)
        if fut is not None:
            if isinstance(msg, P.ErrorReply):
                fut.set_exception(error_from_wire(_err_dict(msg)))
            elif not fut.done():
                fut.set_result(msg)
            return
        req = self.inflight.get(rid)
        if req is None:
            return   # answered already (cancelled, timed out, or replayed): never twice
        if isinstance(msg, P.ErrorReply):
            self._fail(req, error_from_wire(_err_dict(msg)))
        elif isinstance(msg, P.InferResult) and req.future is not None:
            self._finish(req)
            if not req.future.done():
                req.future.set_result((msg, buffers))
        elif isinstance(msg, P.Tokens) and req.queue is not None:
            req.tokens_seen += len(msg.token_ids)
            if req.timer is not None:
                req.timer.tokens(msg)
            if msg.finished:
                self._finish(req)
            req.queue.put_nowait(msg)

    async def _free_loop(self) -> None:
        """Frees ride on the next request to an engine; idle links flush them here."""
        while True:
            await asyncio.sleep(0.02)
            for link in self.links.values():
                if link.frees and link.sock is not None and link.alive:
                    frees, link.frees = link.frees, []
                    link.sock.send(P.encode(P.Free(frees)))


def _err_dict(msg: P.ErrorReply) -> dict[str, Any]:
    return {"status": msg.status, "code": msg.code, "message": msg.message, "param": msg.param}
