"""The engine process: one per device, hosting one or more model versions.

Socket I/O runs on its own thread (`EngineIO`), so the compute loop never touches a socket:

    while running: drain_inputs(); step()

Requests reach `EngineHost` decoded; results leave through the I/O thread. Loads run on a
worker thread so a model being loaded never stalls the models already serving. A request for a
version whose first load is under way is held until that load ends (then served, or refused
with the load's error): a restarted engine takes traffic as soon as its loads are queued, and
each model serves the moment it is loaded, the cheap tensor models long before an LLM.
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon import protocol as P
from daemon.errors import FerryError, InternalError, InvalidInput, ModelNotFound
from daemon.process import init_child
from daemon.repository_spec import load_spec
from daemon.shm import Arena, RegionMap, pid_alive, segment_name
from daemon.tensor_bytes import BYTES, decode, encode
from engines.base import (Engine, GenerateRequest, ModelInfo, ProgressOutput, TensorRequest,
                          TensorResult, TokenOutput)

__all__ = ["ENGINE_CLASSES", "EngineIO", "EngineHost", "run_engine", "model_info_to_wire"]

log = logging.getLogger(__name__)

ENGINE_CLASSES = {
    "onnx": "engines.onnx.engine:OnnxEngine",
    "llm": "engines.llm.engine:LLMEngine",
    "tensorrt": "engines.tensorrt.engine:TensorRTEngine",
    "torch": "engines.torch.engine:TorchEngine",
    "diffusion": "engines.diffusion.engine:DiffusionEngine",
}


def model_info_to_wire(info: ModelInfo) -> dict[str, Any]:
    tensor = lambda t: {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}  # noqa: E731
    return {"name": info.name, "version": info.version, "platform": info.platform,
            "kind": info.kind, "inputs": [tensor(t) for t in info.inputs],
            "outputs": [tensor(t) for t in info.outputs], "max_batch_size": info.max_batch_size,
            "extra": info.extra}


class EngineIO(threading.Thread):
    """Owns the ROUTER socket. Inbound messages go to `inbox`; `send()` is thread-safe."""

    def __init__(self, ctx: zmq.Context, endpoint: str, inbox: queue.SimpleQueue) -> None:
        super().__init__(name="engine-io", daemon=True)
        self.ctx, self.endpoint, self.inbox = ctx, endpoint, inbox
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://wake-{id(self)}"
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx.connect(self._wake_addr)
        self._lock = threading.Lock()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.bind(endpoint)
        self.stopping = threading.Event()

    def send(self, identity: bytes, frames: list[Any]) -> None:
        self._outbox.put((identity, frames))
        with self._lock:
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self.stopping.is_set():
            events = dict(poller.poll(100))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            while True:
                try:
                    identity, frames = self._outbox.get_nowait()
                except queue.Empty:
                    break
                self.router.send_multipart([identity, *frames], copy=False)
            if self.router in events:
                for _ in range(256):
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.inbox.put((parts[0].bytes, parts[1:]))
        self.router.close(0)
        self._wake_rx.close(0)
        self._wake_tx.close(0)


@dataclass(slots=True)
class Pending:
    identity: bytes
    key: tuple[str, int]
    engine: Engine
    out_shm: dict[str, P.ShmLoc] | None
    request_id: str
    trace: str = ""              # traced (protocol TRACING): its result carries `timing`
    received: float = 0.0        # time.monotonic() when it arrived


class EngineHost:
    """The compute side: models, requests in flight, and result encoding."""

    def __init__(self, engine_id: str, device: str, io: EngineIO, arena: Arena,
                 regions: RegionMap, inline_threshold: int) -> None:
        self.engine_id, self.device = engine_id, device
        self.io, self.arena, self.regions = io, arena, regions
        self.inline_threshold = inline_threshold
        self.engines: dict[tuple[str, int], Engine] = {}
        self.retiring: list[tuple[tuple[str, int], Engine]] = []   # replaced, finishing work
        self.draining: dict[tuple[str, int], tuple[bytes, str]] = {}
        self.pending: dict[str, Pending] = {}
        self.loads: queue.SimpleQueue = queue.SimpleQueue()
        # model versions a standby loaded before it became this engine (engines/standby.py),
        # adopted by the Load that names the same files, the rest dropped after a while
        self.preloaded: dict[tuple[str, int], Any] = {}
        self.preloaded_until = 0.0
        # versions whose first load is under way → the requests waiting for it, in arrival order
        self.held: dict[tuple[str, int], list[tuple[bytes, P.Message, list[Any]]]] = {}
        self.counters = {"requests": 0, "errors": 0, "results": 0}
        # arena blocks lent to each peer (ZMQ identity) until it sends them back in `frees`;
        # a peer that dies without returning them gets them reclaimed by `sweep_dead_peers`
        self.lent: dict[bytes, set[int]] = {}
        self._next_sweep = 0.0
        self.handlers = {
            "infer": self.on_infer, "generate": self.on_generate, "cancel": self.on_cancel,
            "free": self.on_free, "load": self.on_load, "unload": self.on_unload,
            "stats": self.on_stats, "register_region": self.on_register,
            "unregister_region": self.on_unregister, "set_log_level": self.on_log_level,
        }

    # -- inbound ----------------------------------------------------------------------------
    def handle(self, identity: bytes, frames: list[Any]) -> None:
        msg_id = request_id = ""
        try:
            msg, buffers = P.decode(frames)
            msg_id, request_id = getattr(msg, "id", ""), getattr(msg, "request_id", "")
            for loc in getattr(msg, "frees", ()):
                self._free(loc, identity)
            if not self._hold(identity, msg, buffers):
                self.handlers[msg.TYPE](identity, msg, buffers)
        except FerryError as exc:
            self.counters["errors"] += 1
            msg_id = msg_id or P.peek_id(frames)
            log.log(logging.WARNING if exc.status >= 500 else logging.INFO,
                    "request %s refused: %s", msg_id, exc.message,
                    extra={"request_id": request_id, "code": exc.code})
            self.reply_error(identity, msg_id, exc)
        except KeyError as exc:
            self.reply_error(identity, msg_id, InvalidInput(f"unexpected message {exc}",
                                                             code="bad_message"))

    def _hold(self, identity: bytes, msg: P.Message, buffers: list[Any]) -> bool:
        """Keep a request for a version still loading; True if it was kept."""
        if not isinstance(msg, (P.Infer, P.Generate)):
            return False
        waiting = self.held.get((msg.model, msg.version))
        if waiting is None:
            return False
        waiting.append((identity, msg, buffers))
        return True

    def _release_held(self, key: tuple[str, int], exc: FerryError | None) -> None:
        """A load ended: serve what waited for it, or refuse it with the load's error."""
        for identity, msg, buffers in self.held.pop(key, []):
            if exc is not None:
                self.reply_error(identity, msg.id, exc)  # type: ignore[attr-defined]
                continue
            try:
                self.handlers[msg.TYPE](identity, msg, buffers)
            except FerryError as err:
                self.reply_error(identity, msg.id, err)  # type: ignore[attr-defined]

    def _engine_for(self, model: str, version: int) -> Engine:
        key = (model, version)
        engine = self.engines.get(key)
        if engine is None:
            raise ModelNotFound(f"model {model!r} version {version} is not loaded on engine "
                                f"{self.engine_id}")
        return engine

    def on_infer(self, identity: bytes, msg: P.Infer, buffers: list[Any]) -> None:
        engine = self._engine_for(msg.model, msg.version)
        if msg.id in self.pending:
            raise InvalidInput(f"request id {msg.id!r} is already in flight", code="duplicate_id")
        inputs = {}
        for ref in msg.inputs:
            if ref.name in inputs:
                raise InvalidInput(f"input {ref.name!r} given twice", code="invalid_input")
            inputs[ref.name] = decode(ref, buffers, self.regions)
        now = time.monotonic()
        deadline = now + msg.timeout_ms / 1000 if msg.timeout_ms > 0 else None
        engine.submit(TensorRequest(msg.id, inputs, msg.outputs, deadline, now, msg.progress))
        self.pending[msg.id] = Pending(identity, (msg.model, msg.version), engine, msg.out_shm,
                                       msg.request_id, msg.trace, now)
        self.counters["requests"] += 1

    def on_generate(self, identity: bytes, msg: P.Generate, buffers: list[Any]) -> None:
        engine = self._engine_for(msg.model, msg.version)
        if msg.id in self.pending:
            raise InvalidInput(f"request id {msg.id!r} is already in flight", code="duplicate_id")
        if len(msg.prompt) != 1:
            raise InvalidInput("generate needs exactly one prompt tensor", code="bad_message")
        ids = decode(msg.prompt[0], buffers, self.regions).reshape(-1).tolist()
        from engines.llm.sampling import SamplingParams   # lazy: tensor-only engines skip torch
        try:
            params = SamplingParams(**msg.params)
        except TypeError as exc:
            raise InvalidInput(f"bad sampling parameters: {exc}", code="invalid_parameter")
        now = time.monotonic()
        engine.submit(GenerateRequest(msg.id, ids, params, now, traced=bool(msg.trace)))
        self.pending[msg.id] = Pending(identity, (msg.model, msg.version), engine, None,
                                       msg.request_id, msg.trace, now)
        self.counters["requests"] += 1

    def on_cancel(self, identity: bytes, msg: P.Cancel, _b: list[Any]) -> None:
        pend = self.pending.get(msg.id)
        if pend is None:   # already finished (cancel is idempotent), or still held
            for waiting in self.held.values():
                waiting[:] = [w for w in waiting if w[1].id != msg.id]  # type: ignore[attr-defined]
            return
        self.emit(pend.engine.cancel(msg.id))

    def on_free(self, _identity: bytes, msg: P.Free, _b: list[Any]) -> None:
        pass   # frees were applied in handle()

    def _free(self, loc: P.ShmLoc, identity: bytes) -> None:
        lent = self.lent.get(identity)
        if loc.region != self.arena.name or lent is None or loc.offset not in lent:
            # only a block lent to this very peer is its to return: a stale or forged free
            # must neither fail the request carrying it nor free another peer's block
            log.warning("ignoring a free of a block not lent to the sender")
            return
        lent.discard(loc.offset)
        self.arena.free(loc.offset)

    def sweep_dead_peers(self) -> None:
        """Reclaim the blocks lent to frontends that died (SIGKILL returns nothing) and unmap
        their arenas. Runs at most once a second from the compute loop."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for identity in list(self.lent):
            if _peer_alive(identity):
                if not self.lent[identity]:
                    del self.lent[identity]
                continue
            for offset in self.lent.pop(identity):
                self.arena.free(offset)
        self.regions.forget_dead()

    def on_register(self, identity: bytes, msg: P.RegisterRegion, _b: list[Any]) -> None:
        self.regions.register(msg.name, msg.key, msg.offset, msg.nbytes)
        self.io.send(identity, P.encode(P.RegionReply(msg.id, self.regions.status())))

    def on_unregister(self, identity: bytes, msg: P.UnregisterRegion, _b: list[Any]) -> None:
        self.regions.unregister(msg.name)
        self.io.send(identity, P.encode(P.RegionReply(msg.id, self.regions.status())))

    def on_log_level(self, identity: bytes, msg: P.SetLogLevel, _b: list[Any]) -> None:
        logging.getLogger().setLevel(msg.level.upper())
        self.io.send(identity, P.encode(P.ControlReply(msg.id, True, {"level": msg.level})))

    def on_load(self, identity: bytes, msg: P.Load, _b: list[Any]) -> None:
        key = (msg.name, msg.version)
        if key not in self.engines:   # an in-place reload keeps serving the old weights
            self.held.setdefault(key, [])
        started = time.monotonic()
        ready = self.preloaded.pop(key, None)
        if ready is not None and ready.matches(Path(msg.path)):
            log.info("adopted %s v%d, loaded by the standby", msg.name, msg.version)
            self.loads.put((identity, msg, ready.engine, ready.info, None))
            return
        if ready is not None:
            ready.engine.unload()

        def work() -> None:
            try:
                spec = load_spec(Path(msg.path), msg.name, msg.version)
                module, _, cls_name = ENGINE_CLASSES[spec.engine].partition(":")
                engine: Engine = getattr(importlib.import_module(module), cls_name)()
                info = engine.load(spec, self.device)
                log.info("loaded %s v%d (%s) in %.2f s", msg.name, msg.version, spec.engine,
                         time.monotonic() - started, extra={"load_s": time.monotonic() - started})
                self.loads.put((identity, msg, engine, info, None))
            except FerryError as exc:
                self.loads.put((identity, msg, None, None, exc))
            except Exception as exc:  # a broken model must not take the engine down
                log.exception("loading %s v%d failed", msg.name, msg.version)
                self.loads.put((identity, msg, None, None, FerryError(
                    f"model {msg.name!r} failed to load: {exc}", code="model_load_failed",
                    status=422)))
        threading.Thread(target=work, name=f"load-{msg.name}", daemon=True).start()

    def finish_loads(self) -> None:
        while True:
            try:
                identity, msg, engine, info, exc = self.loads.get_nowait()
            except queue.Empty:
                return
            key = (msg.name, msg.version)
            if exc is not None:
                self.reply_error(identity, msg.id, exc)
                self._release_held(key, exc)
                continue
            old = self.engines.get(key)
            self.engines[key] = engine
            if old is not None:   # an in-place reload: the old one finishes what it holds
                self.retiring.append((key, old))
            log.info("loaded %s v%d on %s", msg.name, msg.version, self.engine_id)
            self.io.send(identity, P.encode(P.Loaded(msg.id, msg.name, msg.version,
                                                     model_info_to_wire(info))))
            self._release_held(key, None)

    def on_unload(self, identity: bytes, msg: P.Unload, _b: list[Any]) -> None:
        key = (msg.name, msg.version)
        if key not in self.engines:
            raise ModelNotFound(f"model {msg.name!r} version {msg.version} is not loaded")
        self.draining[key] = (identity, msg.id)   # unloads once its requests are done

    def _busy(self, engine: Engine) -> bool:
        return engine.has_work() or any(p.engine is engine for p in self.pending.values())

    def finish_unloads(self) -> None:
        for key, old in list(self.retiring):
            if not self._busy(old):
                old.unload()
                self.retiring.remove((key, old))
        for key, (identity, msg_id) in list(self.draining.items()):
            engine = self.engines[key]
            if self._busy(engine):
                continue
            engine.unload()
            del self.engines[key], self.draining[key]
            log.info("unloaded %s v%d from %s", key[0], key[1], self.engine_id)
            self.io.send(identity, P.encode(P.Loaded(msg_id, key[0], key[1], None)))

    def on_stats(self, identity: bytes, msg: P.StatsQuery, _b: list[Any]) -> None:
        models = {f"{name}:{ver}": eng.stats() for (name, ver), eng in self.engines.items()}
        stats = {"engine": self.engine_id, "device": self.device, "pid": os.getpid(),
                 "pending": len(self.pending), "models": models, **self.counters,
                 "loading": [f"{name}:{ver}" for name, ver in self.held],
                 "arena": {"name": self.arena.name, "size": self.arena.size,
                           "used": self.arena.used_bytes, "blocks": self.arena.live_blocks,
                           "high_water": self.arena.high_water}}
        self.io.send(identity, P.encode(P.StatsReply(msg.id, stats)))

    # -- outbound ---------------------------------------------------------------------------
    def reply_error(self, identity: bytes, msg_id: str, exc: FerryError) -> None:
        self.io.send(identity, P.encode(P.ErrorReply(msg_id, exc.status, exc.code, exc.message,
                                                     exc.param)))

    def emit(self, results: list[TensorResult | TokenOutput | ProgressOutput]) -> None:
        for res in results:
            pend = self.pending.get(res.id)
            if pend is None:
                continue
            if isinstance(res, ProgressOutput):     # not the end: the result follows
                self.io.send(pend.identity, P.encode(P.Progress(res.id, res.image, res.step,
                                                                res.steps)))
                continue
            done = not isinstance(res, TokenOutput) or res.finished
            if done:
                del self.pending[res.id]
            if res.error is not None:
                err = res.error if isinstance(res.error, FerryError) else InternalError(
                    f"engine failure: {res.error}")
                log.log(logging.WARNING if err.status >= 500 else logging.INFO,
                        "request %s of %s v%d failed: %s", res.id, *pend.key, err.message,
                        extra={"request_id": pend.request_id, "code": err.code})
                self.reply_error(pend.identity, res.id, err)
            elif isinstance(res, TokenOutput):
                self.io.send(pend.identity, P.encode(P.Tokens(
                    res.id, [int(t) for t in res.token_ids],
                    None if res.logprobs is None else [float(x) for x in res.logprobs],
                    res.finished, res.finish_reason, res.prompt_tokens, res.cached_tokens,
                    None if res.top_logprobs is None else
                    [[[int(t), float(lp)] for t, lp in top] for top in res.top_logprobs],
                    res.timing)))
            else:
                self._send_result(pend, res)
            self.counters["results"] += 1

    def _send_result(self, pend: Pending, res: TensorResult) -> None:
        refs, frames = [], []
        try:
            for name, arr in (res.outputs or {}).items():
                ref, arr = encode(name, arr)   # BYTES serialized; keeps 0-d outputs 0-d
                target = (pend.out_shm or {}).get(name)
                if target is not None:
                    # BYTES may use less of its region than it reserved (Triton's form too)
                    if target.nbytes != arr.nbytes and not (
                            ref.dtype == BYTES and arr.nbytes <= target.nbytes):
                        raise InvalidInput(f"output {name!r} needs {arr.nbytes} bytes, the "
                                           f"region reference holds {target.nbytes}",
                                           code="shm_out_of_bounds")
                    used = P.ShmLoc(target.region, target.offset, arr.nbytes)
                    self.regions.view(used)[:] = arr.reshape(-1).view(np.uint8)
                    ref.shm = used
                elif arr.nbytes >= self.inline_threshold and self._try_put(ref, arr):
                    pass
                else:
                    ref.frame = len(frames)
                    frames.append(arr)
                refs.append(ref)
        except FerryError as exc:
            for ref in refs:
                if ref.shm is not None and ref.shm.region == self.arena.name:
                    self.arena.free(ref.shm.offset)
            self.reply_error(pend.identity, res.id, exc)
            return
        lent = [r.shm.offset for r in refs
                if r.shm is not None and r.shm.region == self.arena.name]
        if lent:
            self.lent.setdefault(pend.identity, set()).update(lent)
        msg = P.InferResult(res.id, refs, int(res.queue_s * 1e6), int(res.compute_s * 1e6),
                            res.batch_size)
        if pend.trace:      # protocol TRACING: [received, batch started, ended]
            msg.timing = [int(pend.received * 1e6), int((pend.received + res.queue_s) * 1e6),
                          int(time.monotonic() * 1e6)]
        self.io.send(pend.identity, P.encode(msg, frames))

    def _try_put(self, ref: P.TensorRef, arr: np.ndarray) -> bool:
        try:
            ref.shm = self.arena.put(arr)
            return True
        except FerryError:   # arena full: the inline frame still delivers the answer
            return False

    # -- loop -------------------------------------------------------------------------------
    def step(self) -> bool:
        """One pass over the hosted models; True if any did work."""
        worked = False
        for key, engine in [*self.engines.items(), *self.retiring]:
            if engine.has_work():
                try:
                    results = engine.step()
                except Exception as exc:   # an engine bug fails its requests, not the process
                    log.exception("engine %s v%d step failed", *key)
                    results = self._fail_all(key, exc)
                if results:
                    worked = True
                    self.emit(results)
        self.finish_loads()
        if self.draining or self.retiring:
            self.finish_unloads()
        if self.preloaded and time.monotonic() > self.preloaded_until:
            for key, ready in self.preloaded.items():   # no Load claimed them: not wanted
                log.info("dropping %s v%d, loaded by the standby but not asked for", *key)
                ready.engine.unload()
            self.preloaded.clear()
        return worked

    def _fail_all(self, key: tuple[str, int], exc: Exception) -> list[TensorResult]:
        out: list[TensorResult] = []
        for rid, pend in list(self.pending.items()):
            if pend.key == key:
                engine = pend.engine
                engine.cancel(rid)
                out.append(TensorResult(rid, error=InternalError(f"engine failure: {exc}")))
        return out

    def wait_hint(self) -> float:
        hints = [h for e in [*self.engines.values(), *(e for _, e in self.retiring)]
                 if (h := e.wait_hint()) is not None]
        return max(0.0, min(hints)) if hints else 0.05


def run_engine(args: dict[str, Any], preloaded: dict[tuple[str, int], Any] | None = None
               ) -> int:
    state = init_child(f"engine-{args['engine_id']}", parent_pid=args["parent_pid"],
                       log_level=args.get("log_level", "info"),
                       log_format=args.get("log_format", "json"))
    ctx = zmq.Context()
    arena = Arena(segment_name(args["instance"], f"eng{args['engine_id']}"),
                  args["arena_mb"] << 20)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        io = EngineIO(ctx, args["endpoint"], inbox)
        host = EngineHost(args["engine_id"], args["device"], io, arena,
                          RegionMap(args["instance"]), args["inline_threshold"])
        host.preloaded = dict(preloaded or {})
        host.preloaded_until = time.monotonic() + PRELOAD_CLAIM_S
        io.start()
        log.info("engine %s on %s listening at %s", args["engine_id"], args["device"],
                 args["endpoint"])
        while state.running:
            drain_inputs(host, inbox)
            host.step()
            host.sweep_dead_peers()
        io.stopping.set()
        io.join(2)
        return 0
    finally:
        arena.close(unlink=True)
        ctx.destroy(linger=0)


# How long a taken-over standby keeps model versions no Load has claimed yet.
PRELOAD_CLAIM_S = 60.0


def _peer_alive(identity: bytes) -> bool:
    """Frontends name their engine links `<pid>-<random>` (see Dispatcher._open_link); an
    identity of another form (a tool's own socket) is taken as alive."""
    pid_text = identity.split(b"-", 1)[0]
    return not (pid_text.isdigit() and 0 < len(pid_text) <= 10) or pid_alive(int(pid_text))


def drain_inputs(host: EngineHost, inbox: queue.SimpleQueue) -> None:
    """Handle everything queued; block only until the earliest model has work to do."""
    wait = host.wait_hint() if host.loads.empty() else 0.0
    try:
        item = inbox.get(timeout=wait) if wait > 0 else inbox.get_nowait()
    except queue.Empty:
        return
    host.handle(*item)
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return
        host.handle(*item)
