"""The frontends' road to the engines: routing by placement, requests in flight, and replay.

Each frontend process talks to every engine directly (DEALER → engine ROUTER over ipc://), with
no broker hop. The supervisor publishes `Placement` on a PUB socket; when an engine's generation
changes (it died and was restarted) the link is rebuilt and every request it held is sent again.

A generation that already delivered tokens is continued, not restarted (mid-stream failover):
it goes to the restarted engine as prompt + the tokens delivered so far, with `resume` set to
their number (engines/llm/sampling.py), so the engine counts them as output (max_tokens, the
penalties, the grammar, which it re-advances over them, and the seed's positions) and the
continuation draws what the uninterrupted run would have: greedy and seeded streams continue
token for token. The stream's consumer sees one uninterrupted run: stop strings, the
detokenizer and usage live in the frontend and carry across; the continuation's prompt and
cached counts are not counted again. A stream is continued at most `max_failovers` times, and
only while its model version is still served; otherwise it ends with a clear `engine_died`.
A request id is answered at most once: replies for ids no longer in flight are dropped.

Reading a placement (which version a name or SHA-256 id means, which engine serves it) is
frontends/placement.py; a call to the supervisor's control socket, frontends/control_client.py.
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
from daemon.errors import (Cancelled, DeadlineExceeded, EngineDied, FerryError, ModelNotFound,
                           ModelUnavailable)
from daemon.replies import PendingReplies, error_of
from daemon.shm import Arena, RegionMap
from frontends.control_client import call_supervisor
from frontends.load_shed import LoadShedder
from frontends.placement import pick_engine, resolve_in, sha_index
from frontends.spans import DispatchSpan
from frontends.tensor_io import Packed, pack, unpack
from frontends.zmq_reader import LoopSocket

__all__ = ["Dispatcher", "InferOutcome", "Stream", "MAX_FAILOVERS"]

log = logging.getLogger(__name__)

# A stream whose engine died this many times is not continued again (a request that crashes
# its engine would otherwise take it down forever).
MAX_FAILOVERS = 3


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
    # generations, for failover: the client's prompt and params, the tokens delivered so far
    prompt: list[int] | None = None
    params: dict[str, Any] | None = None
    generated: list[int] = field(default_factory=list)
    failovers: int = 0                           # times it was continued on a new engine
    trace: DispatchSpan | None = None            # traced requests: the dispatch span
    on_progress: Callable[[P.Progress], None] | None = None   # infers that asked for progress


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
        self.max_failovers = MAX_FAILOVERS
        # request-path sockets: see LoopSocket
        self.sync_ctx: zmq.SyncContext = zmq.Context.shadow(ctx.underlying)
        self.placement_endpoint, self.control_endpoint = placement_endpoint, control_endpoint
        self.arena, self.regions, self.inline_threshold = arena, regions, inline_threshold
        self.engine_prefix = f"ferry-{instance}-eng"
        self.placement: P.Placement | None = None
        self.placement_changed = asyncio.Event()
        self.links: dict[str, _Link] = {}
        self.inflight: dict[str, _Req] = {}
        self.replies = PendingReplies()     # engine-level calls (stats, regions)
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

    async def until_serving(self, stop: asyncio.Event) -> bool:
        """Wait until the supervisor has loaded its startup models (its state leaves
        "starting"): a frontend spawned beside those loads sets itself up meanwhile and starts
        listening only then, so a client never meets a port that knows no models yet. False
        when `stop` is set first."""
        while self.placement is None or self.placement.state == "starting":
            if stop.is_set():
                return False
            self.placement_changed.clear()
            try:
                await asyncio.wait_for(self.placement_changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return True

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
        self._sha_index = sha_index(msg)
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
        self._drop_orphans(msg)
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
                why = self._cannot_continue(req, link.engine)
                if why:
                    self._fail(req, EngineDied(f"the engine restarted during this stream, "
                                               f"after {req.tokens_seen} tokens; {why}"))
                    continue
                self._continuation(req)
                log.info("continuing stream %s on restarted engine %s after %d tokens "
                         "(failover %d)", req.id, link.engine, req.tokens_seen, req.failovers)
            else:
                log.info("replaying request %s on restarted engine %s", req.id, link.engine)
            self._send(link, req)

    def _cannot_continue(self, req: _Req, engine: str) -> str:
        """Why `req`, a stream that delivered tokens, cannot go on on `engine` ('' if it can)."""
        if req.prompt is None or req.params is None:
            return "it cannot be continued"
        if req.failovers >= self.max_failovers:
            return (f"it was already continued {req.failovers} times and is not continued "
                    "again")
        pl = self.placement
        v = (pl.models.get(req.key[0], {}).get("versions", {}).get(str(req.key[1]))
             if pl is not None else None)
        if v is None or v.get("state") != "ready" or engine not in v.get("engines", []):
            return (f"model {req.key[0]!r} version {req.key[1]} is no longer served there, so "
                    "the stream cannot be continued")
        return ""

    def _continuation(self, req: _Req) -> None:
        """Turn `req` into its continuation: prompt + delivered tokens, `resume` = their count."""
        assert req.prompt is not None and req.params is not None
        old = req.msg
        assert isinstance(old, P.Generate)
        ids = np.asarray(req.prompt + req.generated, dtype=np.int32)
        ref = P.TensorRef("prompt", "int32", (len(ids),), frame=0)
        req.msg = P.Generate(req.id, old.model, old.version, [ref],
                             {**req.params, "resume": len(req.generated)}, old.request_id,
                             trace=old.trace)
        req.buffers = [ids]
        req.failovers += 1

    def _drop_orphans(self, pl: P.Placement) -> None:
        """End the streams waiting for a dead engine whose model version is gone: no restart
        will continue them."""
        for req in list(self.inflight.values()):
            if not req.tokens_seen:
                continue
            link = self.links.get(req.engine)
            if link is not None and link.alive:
                continue
            if str(req.key[1]) not in pl.models.get(req.key[0], {}).get("versions", {}):
                self._fail(req, EngineDied(
                    f"the engine died during this stream, after {req.tokens_seen} tokens, and "
                    f"model {req.key[0]!r} version {req.key[1]} is no longer served, so the "
                    "stream cannot be continued"))

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
        return resolve_in(self.placement, self._sha_index, model, version)

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
        return pick_engine(self.placement, self.links, key)

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
        if req.trace is not None:
            req.trace.finish()
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
        if req.trace is not None:
            req.trace.error = exc.code
        self._finish(req)
        if req.future is not None and not req.future.done():
            req.future.set_exception(exc)
        if req.queue is not None:
            req.queue.put_nowait(exc)

    async def infer(self, model: str, version: int | None, arrays: dict[str, np.ndarray], *,
                    outputs: list[str] | None = None, timeout_s: float | None = None,
                    request_id: str = "", region_refs: list[P.TensorRef] = (),  # type: ignore[assignment]
                    out_shm: dict[str, P.ShmLoc] | None = None,
                    on_progress: Callable[[P.Progress], None] | None = None) -> InferOutcome:
        """Run a tensor model. With `on_progress`, the engine's `Progress` messages (diffusion
        steps) are handed to it as they arrive, on the reply path the result takes. Cancelling
        the awaiting task cancels the request in the engine, which frees its slot."""
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
                      int(timeout_s * 1000) if timeout_s else 0, out_shm, request_id,
                      progress=on_progress is not None)
        future = asyncio.get_running_loop().create_future()
        req = _Req(rid, link.engine, (name, ver), msg, packed.frames, packed, future=future,
                   on_progress=on_progress)
        trace = DispatchSpan.begin(link.engine, name, ver)   # None unless the task is traced
        if trace is not None:
            msg.trace, req.trace = trace.traceparent, trace
        self._register(req)
        # A timer rather than asyncio.wait_for: no extra task on the request path. The engine
        # enforces the deadline itself; this only guards against an engine that never answers.
        timer = (asyncio.get_running_loop().call_later(timeout_s + 5, self._expire, req)
                 if timeout_s else None)
        try:
            result, buffers = await future
        except asyncio.CancelledError:
            self._cancel_in_engine(req)
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
                   timer=metrics.StreamTimer(name, len(prompt_ids)),
                   prompt=[int(t) for t in prompt_ids], params=dict(params))
        trace = DispatchSpan.begin(link.engine, name, ver)
        if trace is not None:
            msg.trace, req.trace = trace.traceparent, trace
        self._register(req)
        limit = timeout_s or self.request_timeout_s
        if limit:
            why = f"the generation ran past the request timeout of {limit:g} s"
            req.deadline = asyncio.get_running_loop().call_later(limit, self._expire, req, why)
        return Stream(self, req)

    def _expire(self, req: _Req, why: str = "") -> None:
        if req.id in self.inflight:
            link = self.links.get(req.engine)
            self._fail(req, DeadlineExceeded(why or f"no reply from engine {req.engine} in "
                                             "time"))
            if link is not None and link.sock is not None and link.alive:
                link.sock.send(P.encode(P.Cancel(req.id)))

    async def cancel(self, rid: str) -> None:
        req = self.inflight.get(rid)
        if req is None:
            return
        self._fail(req, Cancelled("cancelled"))
        self._send_cancel(req)

    def _cancel_in_engine(self, req: _Req) -> None:
        """An infer whose caller went away: forget it here and free its slot in the engine."""
        if req.id in self.inflight:
            self._finish(req)
            self._send_cancel(req)

    def _send_cancel(self, req: _Req) -> None:
        link = self.links.get(req.engine)
        if link is not None and link.sock is not None and link.alive:
            link.sock.send(P.encode(P.Cancel(req.id)))

    # -- engine-level calls (stats, regions) ---------------------------------------------------
    async def call_engine(self, engine: str, msg: P.Message, timeout_s: float = 5.0) -> P.Message:
        link = self.links.get(engine)
        if link is None or link.sock is None or not link.alive:
            raise EngineDied(f"engine {engine} is not available")
        sock = link.sock
        msg_id: str = msg.id  # type: ignore[attr-defined]
        reply: P.Message = await self.replies.call(msg_id, lambda: sock.send(P.encode(msg)),
                                                   timeout_s)
        return reply

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
        result = await call_supervisor(self.ctx, self.control_endpoint, op, args or {},
                                       timeout_s)
        epoch = result.get("epoch") if isinstance(result, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            await self._await_epoch(epoch)
        return result

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
        if self.replies.settle(msg):
            return
        req = self.inflight.get(getattr(msg, "id", ""))
        if req is None:
            return   # answered already (cancelled, timed out, or replayed): never twice
        if isinstance(msg, P.ErrorReply):
            err = error_of(msg)
            if req.failovers and req.tokens_seen:
                err = EngineDied(f"the engine restarted during this stream, after "
                                 f"{req.tokens_seen} tokens, and the stream could not be "
                                 f"continued: {err.message}")
            self._fail(req, err)
        elif isinstance(msg, P.Progress):
            if req.on_progress is not None:
                req.on_progress(msg)
        elif isinstance(msg, P.InferResult) and req.future is not None:
            if req.trace is not None:
                req.trace.reply = msg
            self._finish(req)
            if not req.future.done():
                req.future.set_result((msg, buffers))
        elif isinstance(msg, P.Tokens) and req.queue is not None:
            if req.failovers and msg.prompt_tokens:
                # a continuation's first message: its prompt was counted by the first run
                msg.prompt_tokens = msg.cached_tokens = 0
            req.tokens_seen += len(msg.token_ids)
            req.generated.extend(msg.token_ids)
            if req.timer is not None:
                req.timer.tokens(msg)
            if msg.finished:
                if req.trace is not None:
                    req.trace.reply = msg
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

