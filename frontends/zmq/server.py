"""The binary ZeroMQ frontend: a ROUTER socket (ipc:// or tcp://) speaking daemon.protocol.

Clients send `Infer`, `Generate`, `Cancel`, `RegisterRegion`, `UnregisterRegion` and
`StatsQuery`; each request runs as its own task, so one slow request never holds up another.
Tensors arrive as inline frames (forwarded zero-copy) or as references into a region the client
registered; results go back inline, or into the client's region when it asked for that.

Access control (frontends/access.py, the same rules as HTTP): `Infer` and `Generate` carry the
caller's API key or JWT in `auth`; the key's scope (`infer`), model list, IP allow-list (the TCP
peer; an ipc:// peer is local and guarded by the socket file's mode) and rate limits apply, and
each request is logged; an `Infer` to an image model reserves its images' units from the key's
tokens per minute (frontends/image_units.py), as HTTP does. With auth required, region and stats messages, which carry no
credential, are accepted only over ipc://.

Tracing (frontends/spans.py): each `Infer` and `Generate` gets a server span (`ZMQ infer`,
`ZMQ generate`) with the dispatcher's and the engine's spans under it, written to the same ring
as the HTTP workers' (GET /traces) and exported over OTLP when configured. A client continues its
own trace by putting a W3C traceparent in the message's optional `trace` field; a malformed one
starts a new trace, as over HTTP (never an error). The reply does not carry the context back:
the client knows its trace id.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from daemon import protocol as P
from daemon.errors import FerryError, Forbidden, InternalError, InvalidInput
from daemon.process import init_child, run_until_signalled
from daemon.shm import Arena, RegionMap, segment_name
from daemon.tensor_bytes import decode, encode
from frontends.access import Access, AccessSettings
from frontends.dispatch import Dispatcher
from frontends.image_units import tensor_units
from frontends.spans import ServerSpan, Tracer, run_flusher
from frontends.zmq_reader import LoopSocket

__all__ = ["ZmqFrontend", "run_zmq"]

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Any, list[Any], "str | None"], Awaitable[None]]
# Infer and Generate carry their own credential; a Cancel reaches only its sender's stream. The
# rest (regions, stats) carry none: with auth required they are accepted only over ipc://.
_REMOTE_OK = (P.Infer, P.Generate, P.Cancel)


def _peer_ip(frame: Any) -> str | None:
    """The TCP peer's address; None for ipc:// (ZeroMQ reports "localhost:…" there)."""
    try:
        peer = frame.get("Peer-Address")
        return str(ipaddress.ip_address(peer))
    except (AttributeError, ValueError, zmq.ZMQError):
        return None


class ZmqFrontend:
    def __init__(self, dispatcher: Dispatcher, sock: zmq.Socket,
                 request_timeout_s: float, access: Access | None = None,
                 tracer: Tracer | None = None) -> None:
        self.d, self.timeout_s, self.access = dispatcher, request_timeout_s, access
        self.tracer = tracer
        self.streams: dict[tuple[bytes, str], Any] = {}
        self.tasks: set[asyncio.Task] = set()
        self.accepting = True
        # what each accepted message type runs: (identity, message, buffers, peer)
        self._handlers: dict[type, Handler] = {
            P.Infer: lambda i, m, b, p: self.traced(self.on_infer, i, m, b, p),
            P.Generate: lambda i, m, b, p: self.traced(self.on_generate, i, m, b, p),
            P.Cancel: self.on_cancel, P.RegisterRegion: self.on_register_region,
            P.UnregisterRegion: self.on_unregister_region, P.StatsQuery: self.on_stats}
        self.sock = LoopSocket(sock, self._on_message)

    def _on_message(self, frames: list[Any]) -> None:
        if not self.accepting:
            return   # draining: the client's own timeout answers it; nothing half-done here
        identity, *rest = frames
        task = asyncio.create_task(self.handle(identity.bytes, rest, _peer_ip(identity)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.accepting = False
        if self.tasks:   # drain: finish what was accepted
            await asyncio.wait(self.tasks, timeout=self.timeout_s)
        self.sock.close()

    async def send(self, identity: bytes, msg: P.Message, buffers: list[Any] | None = None
                   ) -> None:
        self.sock.send([identity, *P.encode(msg, buffers)])

    async def handle(self, identity: bytes, frames: list[Any], peer: str | None = None) -> None:
        msg_id = ""
        try:
            msg, buffers = P.decode(frames)
            msg_id = getattr(msg, "id", "")
            run = self._handlers.get(type(msg))
            if type(msg) not in _REMOTE_OK and peer is not None and self.access is not None \
                    and self.access.required:
                raise Forbidden(f"{msg.TYPE!r} messages carry no credential and are accepted "
                                "only over the local ipc:// endpoint", code="local_only")
            if run is None:
                raise InvalidInput(f"message type {msg.TYPE!r} is not accepted here",
                                   code="bad_message")
            await run(identity, msg, buffers, peer)
        except FerryError as exc:
            msg_id = msg_id or P.peek_id(frames)
            await self.send(identity, P.ErrorReply(msg_id, exc.status, exc.code, exc.message,
                                                   exc.param, getattr(exc, "retry_after", None)))
        except Exception as exc:
            log.exception("zmq request failed")
            err = InternalError(f"internal error: {type(exc).__name__}")
            await self.send(identity, P.ErrorReply(msg_id, err.status, err.code, err.message))

    async def on_cancel(self, identity: bytes, msg: P.Cancel, buffers: list[Any],
                        peer: str | None) -> None:
        stream = self.streams.get((identity, msg.id))      # only the sender's own stream
        if stream is not None:
            await stream.cancel()

    async def on_register_region(self, identity: bytes, msg: P.RegisterRegion,
                                 buffers: list[Any], peer: str | None) -> None:
        await self.d.register_region(msg.name, msg.key, msg.offset, msg.nbytes)
        await self.send(identity, P.RegionReply(msg.id, self.d.regions.status()))

    async def on_unregister_region(self, identity: bytes, msg: P.UnregisterRegion,
                                   buffers: list[Any], peer: str | None) -> None:
        if not msg.name:
            raise InvalidInput("UnregisterRegion needs the region's name",
                               code="shm_bad_region", param="name")
        await self.d.unregister_region(msg.name)
        await self.send(identity, P.RegionReply(msg.id, self.d.regions.status()))

    async def on_stats(self, identity: bytes, msg: P.StatsQuery, buffers: list[Any],
                       peer: str | None) -> None:
        await self.send(identity, P.StatsReply(msg.id, {"engines": await self.d.engine_stats()}))

    async def traced(self, run: Any, identity: bytes, msg: P.Infer | P.Generate,
                     buffers: list[Any], peer: str | None) -> None:
        """`guarded` inside the request's server span (when tracing is on)."""
        tracer = self.tracer
        if tracer is None or not tracer.enabled:
            return await self.guarded(run, identity, msg, buffers, peer)
        server = ServerSpan(tracer, msg.trace, f"ZMQ {msg.TYPE}")
        error, code = True, None
        try:
            await self.guarded(run, identity, msg, buffers, peer)
            error = False
        except FerryError as exc:     # a client's error is not the server's (OpenTelemetry)
            error, code = exc.status >= 500, exc.code
            raise
        finally:
            attrs: dict[str, Any] = {"rpc.system": "ferry-zmq", "ferry.model": msg.model,
                                     "ferry.request_id": msg.request_id or msg.id}
            if code is not None:
                attrs["error.type"] = code
            server.end(error, **attrs)

    async def guarded(self, run: Any, identity: bytes, msg: P.Infer | P.Generate,
                      buffers: list[Any], peer: str | None) -> None:
        """Authenticate, rate-limit, run and log one Infer or Generate."""
        if self.access is None:
            return await run(identity, msg, buffers)
        started, status, code, principal, admission = time.monotonic(), 500, None, None, None
        used: int | None = None
        try:
            try:
                model = self.d.resolve(msg.model)[0]
            except FerryError:
                model = msg.model           # unknown: the dispatcher answers 404 below
            principal = await self.access.authenticate(msg.auth or None, peer, "infer", model)
            admission = self.access.admit(principal)
            if isinstance(msg, P.Generate):   # prompt + max_tokens, from tokens per minute
                self.access.reserve(admission, _generate_cost(msg))
            units = self._image_units(msg, buffers) if isinstance(msg, P.Infer) else 0
            if units:                          # an image model's images, as on HTTP
                self.access.reserve(admission, units)
            used = await run(identity, msg, buffers)
            if units:
                used = units
            status = 200
        except FerryError as exc:
            status, code = exc.status, exc.code
            raise
        finally:
            if admission is not None:
                self.access.release(admission)
                # A Generate that ran to its end is settled to its tokens; one that failed
                # or was cut off keeps its whole reservation charged.
                self.access.settle(admission, used if isinstance(used, int) and status == 200
                                   else admission.reserved)
            self.access.record(msg.request_id or msg.id, principal=principal, model=msg.model,
                               route=f"ZMQ {msg.TYPE}", status=status, code=code,
                               total_ms=(time.monotonic() - started) * 1000.0)

    def _image_units(self, msg: P.Infer, buffers: list[Any]) -> int:
        """What an Infer to an image model costs (frontends/image_units.py); `num_images` is
        read from its inline frame (in a client region it counts as the model's maximum)."""
        arrays: dict[str, np.ndarray] = {}
        for ref in msg.inputs:
            if ref.name != "num_images":
                continue
            if ref.shm is not None:
                arrays[ref.name] = np.array([1 << 30], dtype=np.int64)   # clamped to the max
            else:
                try:
                    arrays[ref.name] = decode(ref, buffers)
                except FerryError:
                    pass                       # on_infer refuses it
        return tensor_units(self.d, msg.model, msg.version or None, arrays)

    async def on_infer(self, identity: bytes, msg: P.Infer, buffers: list[Any]) -> None:
        arrays, region_refs = {}, []
        for ref in msg.inputs:
            if ref.shm is not None:
                region_refs.append(ref)
            else:
                arrays[ref.name] = decode(ref, buffers)
        timeout = msg.timeout_ms / 1000 if msg.timeout_ms else self.timeout_s
        outcome = await self.d.infer(msg.model, msg.version or None, arrays, outputs=msg.outputs,
                                     timeout_s=timeout, request_id=msg.request_id,
                                     region_refs=region_refs, out_shm=msg.out_shm)
        try:
            refs: list[P.TensorRef] = []
            out_frames: list[np.ndarray] = []
            for name, arr in outcome.arrays.items():
                ref, data = encode(name, arr)
                if msg.out_shm and name in msg.out_shm:
                    ref.shm = msg.out_shm[name]
                else:       # a view of memory release() frees must be copied; BYTES is fresh
                    ref.frame = len(out_frames)
                    out_frames.append(data.copy() if outcome._release and arr.dtype != object
                                      else data)
                refs.append(ref)
        finally:
            outcome.release()
        meta = outcome.meta
        await self.send(identity, P.InferResult(msg.id, refs, meta.queue_us, meta.compute_us,
                                                meta.batch_size), out_frames)

    async def on_generate(self, identity: bytes, msg: P.Generate, buffers: list[Any]) -> int:
        """Stream the generation to the client; returns the tokens it used (prompt + output)."""
        if len(msg.prompt) != 1 or msg.prompt[0].shm is not None:
            raise InvalidInput("generate needs one inline prompt tensor", code="bad_message")
        ref = msg.prompt[0]
        if ref.dtype not in ("int32", "int64"):
            raise InvalidInput("prompt must be int32/int64 token ids", code="invalid_input")
        ids = decode(ref, buffers).reshape(-1).tolist()
        if ids and not -2**31 <= min(ids) <= max(ids) < 2**31:   # ids travel on as int32
            raise InvalidInput("a prompt token id is outside the vocabulary", param="prompt")
        stream = await self.d.generate(msg.model, msg.version or None, ids, msg.params,
                                       msg.request_id)
        self.streams[(identity, msg.id)] = stream
        generated = 0
        try:
            async for tok in stream:
                tok.id = msg.id
                generated += len(tok.token_ids)
                await self.send(identity, tok)
        finally:
            self.streams.pop((identity, msg.id), None)
        return len(ids) + generated


def _generate_cost(msg: P.Generate) -> int:
    """The most tokens a Generate may use: its prompt plus max_tokens (the engine's 16 if
    unset)."""
    prompt = sum(math.prod(ref.shape) for ref in msg.prompt)
    asked = msg.params.get("max_tokens", 16)
    return prompt + (asked if isinstance(asked, int) and asked > 0 else 16)


async def _serve(args: dict[str, Any], stop: asyncio.Event) -> None:
    ctx = zmq.asyncio.Context()
    arena = Arena(segment_name(args["instance"], "zmq"), args["arena_mb"] << 20)
    d = Dispatcher(ctx, placement_endpoint=args["placement"], control_endpoint=args["control"],
                   arena=arena, regions=RegionMap(args["instance"]), instance=args["instance"],
                   inline_threshold=args["inline_threshold"],
                   request_timeout_s=args["request_timeout_s"])
    sock: zmq.SyncSocket = zmq.Context.shadow(ctx.underlying).socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    access = None
    tracer = Tracer("zmq")
    d.config_listeners.append(tracer.configure)          # [tracing], also on SIGHUP
    stop_flush = asyncio.Event()
    flusher = asyncio.get_running_loop().create_task(run_flusher(
        tracer, lambda: access.state.db if access is not None else None, stop_flush))
    try:
        access = await Access.open(AccessSettings.from_args(args))
        d.config_listeners.append(lambda config: access.reconfigure(config.get("auth") or {}))
        await d.start()
        if not await d.until_serving(stop):
            return
        sock.bind(args["bind"])
        if args["bind"].startswith("ipc://"):
            # UMask=0077 under systemd: let local clients in the service's group connect.
            os.chmod(args["bind"][len("ipc://"):], 0o660)
        await d.control("frontend_ready", {"role": "zmq"})
        log.info("zmq frontend serving on %s", args["bind"])
        await ZmqFrontend(d, sock, args["request_timeout_s"], access, tracer).serve(stop)
    finally:
        stop_flush.set()
        await asyncio.gather(flusher, return_exceptions=True)
        if access is not None:
            await access.close()
        sock.close(0)
        await d.close()
        arena.close(unlink=True)
        ctx.destroy(linger=0)


def run_zmq(args: dict[str, Any]) -> int:
    init_child("zmq", parent_pid=args["parent_pid"], log_level=args.get("log_level", "info"),
               log_format=args.get("log_format", "json"))
    return run_until_signalled(lambda stop: _serve(args, stop))
