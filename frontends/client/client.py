"""Python clients for Ferry's binary ZeroMQ frontend: `FerryClient` (sync) and
`AsyncFerryClient` (asyncio, concurrent requests and token streams on one socket).

Arrays go inline (zero-copy frames) by default. On the same host, `register_region()` creates a
POSIX shared-memory segment owned by the client and registers it with the daemon; `infer(...,
use_shm=True)` then copies inputs there once and sends only references. Arrays are encoded and
decoded by the daemon's tensor codec (daemon/tensor_bytes.py), so the client refuses before
sending what the daemon would refuse, with the same codes, and checks every result it reads.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from typing import Any, AsyncIterator

import numpy as np
import zmq
import zmq.asyncio

from daemon import protocol as P
from daemon.errors import DeadlineExceeded, FerryError
from daemon.replies import error_of
from daemon.shm import Arena
from daemon.tensor_bytes import decode, encode, from_buffer

__all__ = ["ClientRegion", "FerryClient", "AsyncFerryClient"]


class ClientRegion:
    """A client-owned shared-memory segment registered with the daemon under `name`."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.arena = Arena(f"fyc-{os.getpid()}-{secrets.token_hex(4)}", size)

    @property
    def key(self) -> str:
        return self.arena.name

    def put(self, name: str, arr: np.ndarray) -> P.TensorRef:
        ref, data = encode(name, arr)
        ref.shm = self.store(data)
        return ref

    def store(self, arr: np.ndarray) -> P.ShmLoc:
        """Copy an encoded (native-order, C-contiguous) `arr` into the region; where it
        landed."""
        loc = self.arena.put(arr)
        return P.ShmLoc(self.name, loc.offset, loc.nbytes)

    def reserve(self, nbytes: int) -> P.ShmLoc:
        off = self.arena.alloc(nbytes)
        return P.ShmLoc(self.name, off, nbytes)

    def read(self, ref: P.TensorRef) -> np.ndarray:
        assert ref.shm is not None
        data = memoryview(self.arena.buf)[ref.shm.offset:ref.shm.offset + ref.shm.nbytes]
        return from_buffer(ref.name, ref.dtype, ref.shape, data).copy()

    def free(self, loc: P.ShmLoc) -> None:
        self.arena.free(loc.offset)

    def close(self) -> None:
        self.arena.close(unlink=True)


def _infer_message(model: str, inputs: dict[str, np.ndarray], *, version: int | None,
                   outputs: list[str] | None, timeout_s: float | None, region: ClientRegion | None,
                   out_shm: dict[str, P.ShmLoc] | None, request_id: str, auth: str = ""
                   ) -> tuple[P.Infer, list[Any], list[P.ShmLoc]]:
    refs: list[P.TensorRef] = []
    frames: list[np.ndarray] = []
    held: list[P.ShmLoc] = []
    encoded = [encode(name, arr) for name, arr in inputs.items()]   # refuse before storing any
    for ref, data in encoded:
        if region is not None:
            ref.shm = region.store(data)
            held.append(ref.shm)
        else:
            ref.frame = len(frames)
            frames.append(data)
        refs.append(ref)
    msg = P.Infer(uuid.uuid4().hex, model, version or 0, refs, outputs,
                  int(timeout_s * 1000) if timeout_s else 0, out_shm, request_id, auth=auth)
    return msg, frames, held


def _result_arrays(msg: P.Message, buffers: list[Any], region: ClientRegion | None
                   ) -> dict[str, np.ndarray]:
    if isinstance(msg, P.ErrorReply):
        raise error_of(msg)
    if not isinstance(msg, P.InferResult):
        raise FerryError(f"unexpected reply {msg.TYPE!r}", code="bad_message")
    out = {}
    for ref in msg.outputs:
        if ref.shm is not None:
            if region is None:
                raise FerryError("result in shared memory but no region", code="bad_message")
            out[ref.name] = region.read(ref)
        else:
            out[ref.name] = decode(ref, buffers)
    return out


class FerryClient:
    """Synchronous client: one request at a time on one DEALER socket. `api_key` (an API key
    or admin JWT) is sent with every request when the daemon requires authentication."""

    def __init__(self, endpoint: str, *, timeout_s: float = 60.0, api_key: str = "") -> None:
        self.api_key = api_key
        self.ctx: zmq.SyncContext = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout_s = timeout_s
        self.region: ClientRegion | None = None

    def _call(self, msg: P.Message, frames: list[Any] | None = None) -> tuple[P.Message, list]:
        self.sock.send_multipart(P.encode(msg, frames), copy=False)
        while True:
            if not self.sock.poll(int(self.timeout_s * 1000)):
                raise DeadlineExceeded("no reply from the daemon in time")
            reply, buffers = P.decode(self.sock.recv_multipart(copy=False))
            if getattr(reply, "id", None) == getattr(msg, "id", None):
                return reply, buffers

    def register_region(self, name: str, size: int) -> ClientRegion:
        region = ClientRegion(name, size)
        try:
            reply, _ = self._call(P.RegisterRegion(uuid.uuid4().hex, name, region.key, 0,
                                                   region.arena.size))
            _check(reply)
        except BaseException:
            region.close()
            raise
        self.region = region
        return region

    def unregister_region(self) -> None:
        if self.region is not None:
            reply, _ = self._call(P.UnregisterRegion(uuid.uuid4().hex, self.region.name))
            self.region.close()
            self.region = None
            _check(reply)

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: int | None = None,
              outputs: list[str] | None = None, timeout_s: float | None = None,
              use_shm: bool = False, out_shm: dict[str, P.ShmLoc] | None = None,
              request_id: str = "") -> dict[str, np.ndarray]:
        region = self.region if use_shm or out_shm else None
        if use_shm and region is None:
            raise FerryError("register_region() first to use shared memory", code="no_region")
        msg, frames, held = _infer_message(model, inputs, version=version, outputs=outputs,
                                           timeout_s=timeout_s, region=region if use_shm else None,
                                           out_shm=out_shm, request_id=request_id,
                                           auth=self.api_key)
        try:
            reply, buffers = self._call(msg, frames)
            return _result_arrays(reply, buffers, region)
        finally:
            for loc in held:
                region.free(loc)  # type: ignore[union-attr]

    def stats(self) -> dict[str, Any]:
        reply, _ = self._call(P.StatsQuery(uuid.uuid4().hex))
        _check(reply)
        return reply.stats  # type: ignore[attr-defined]

    def send_raw(self, frames: list[Any]) -> tuple[P.Message, list]:
        """Send pre-encoded frames and return the next reply (for protocol tests)."""
        self.sock.send_multipart(frames)
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise DeadlineExceeded("no reply")
        return P.decode(self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        if self.region is not None:
            try:
                self.unregister_region()
            except FerryError:
                pass
        self.sock.close(0)

    def __enter__(self) -> FerryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(reply: P.Message) -> None:
    if isinstance(reply, P.ErrorReply):
        raise error_of(reply)


class AsyncFerryClient:
    """asyncio client: many concurrent requests and streams over one socket. `api_key` as
    for FerryClient."""

    def __init__(self, endpoint: str, *, timeout_s: float = 60.0, api_key: str = "") -> None:
        self.api_key = api_key
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout_s = timeout_s
        self.region: ClientRegion | None = None
        self._waiters: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def _read_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            msg, buffers = P.decode(frames)
            q = self._waiters.get(getattr(msg, "id", ""))
            if q is not None:
                q.put_nowait((msg, buffers))

    async def _start(self, msg_id: str) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop())
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[msg_id] = q
        return q

    async def _call(self, msg: P.Message, frames: list[Any] | None = None
                    ) -> tuple[P.Message, list]:
        q = await self._start(msg.id)  # type: ignore[attr-defined]
        try:
            await self.sock.send_multipart(P.encode(msg, frames), copy=False)
            return await asyncio.wait_for(q.get(), self.timeout_s)
        finally:
            self._waiters.pop(msg.id, None)  # type: ignore[attr-defined]

    async def register_region(self, name: str, size: int) -> ClientRegion:
        region = ClientRegion(name, size)
        try:
            reply, _ = await self._call(P.RegisterRegion(uuid.uuid4().hex, name, region.key, 0,
                                                         region.arena.size))
            _check(reply)
        except BaseException:
            region.close()
            raise
        self.region = region
        return region

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *,
                    version: int | None = None, outputs: list[str] | None = None,
                    timeout_s: float | None = None, use_shm: bool = False,
                    request_id: str = "") -> dict[str, np.ndarray]:
        region = self.region if use_shm else None
        if use_shm and region is None:
            raise FerryError("register_region() first to use shared memory", code="no_region")
        msg, frames, held = _infer_message(model, inputs, version=version, outputs=outputs,
                                           timeout_s=timeout_s, region=region, out_shm=None,
                                           request_id=request_id, auth=self.api_key)
        try:
            reply, buffers = await self._call(msg, frames)
            return _result_arrays(reply, buffers, region)
        finally:
            for loc in held:
                region.free(loc)  # type: ignore[union-attr]

    async def generate(self, model: str, prompt_ids: list[int], params: dict[str, Any], *,
                       version: int | None = None) -> AsyncIterator[P.Tokens]:
        rid = uuid.uuid4().hex
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        msg = P.Generate(rid, model, version or 0,
                         [P.TensorRef("prompt", "int32", (len(prompt),), frame=0)], params,
                         auth=self.api_key)
        q = await self._start(rid)
        finished = False
        try:
            await self.sock.send_multipart(P.encode(msg, [prompt]), copy=False)
            while not finished:
                reply, _ = await asyncio.wait_for(q.get(), self.timeout_s)
                finished = isinstance(reply, P.ErrorReply) or reply.finished
                _check(reply)
                yield reply
        finally:
            self._waiters.pop(rid, None)
            if not finished:   # the caller stopped early: free the engine's blocks now
                await self.sock.send_multipart(P.encode(P.Cancel(rid)))

    async def close(self) -> None:
        if self.region is not None:   # before the reader stops: it delivers the reply
            try:
                reply, _ = await self._call(P.UnregisterRegion(uuid.uuid4().hex,
                                                               self.region.name))
            finally:
                self.region.close()
                self.region = None
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)
