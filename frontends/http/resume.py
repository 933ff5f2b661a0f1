"""Resumable streams: a streamed chat or completion that survives the client's connection.

A client opts in per request with `"stream_options": {"resumable": true}` (the default stays:
a disconnect cancels the generation at once and frees its KV blocks). Such a stream's events
carry SSE ids `<stream id>/<n>` (n = 1, 2, ...; the stream id is the completion's `id`, also
sent as the `Ferry-Stream-Id` header) and are retained by the HTTP worker that runs it. When
the connection drops the generation goes on, into the retained buffer; the client reconnects
within `server.stream_resume_window_s` with

    POST the same route (any body) + header  Last-Event-ID: <stream id>/<n>
    GET  /v1/streams/<stream id>       (+ Last-Event-ID, or ?last_event_id=<n>; none: from 1)

and gets events n+1... (what it missed, then the rest live), never a regenerated stream. Only
the key that started a stream may resume it (another key's stream is "unknown"). Errors, all
before any event is sent: 400 invalid_last_event_id (malformed, or past what was sent),
404 unknown_stream, 410 stream_expired (the window passed with no reader: the generation was
cancelled and its events dropped). Each key retains at most
`server.stream_resume_max_kb_per_key`; a stream that would pass it ends with a
`resume_buffer_full` error event. A stream owned by another HTTP worker (workers share the
port) is relayed from its owner over ZeroMQ ipc (`resume-<worker>.sock` in the runtime
directory); a stream whose worker is not answering (dead, not yet back) is 410 stream_lost, and
once that worker has restarted its store is empty: 404 unknown_stream.

A resumed request is charged no tokens (the original request pays for the generation, which
it keeps running until the end); it is logged as a request of its own.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import msgpack
import zmq
import zmq.asyncio
from aiohttp import web

from daemon.errors import FerryError, InvalidInput
from frontends.http.errors import request_id_of
from frontends.http.sse import client_gone

__all__ = ["StreamStore", "RetainedStream", "RetainedSink", "RESUME_STORE", "setup",
           "configure", "relay", "open_events", "local_events", "resume_from_header",
           "resume_response", "owner_of", "written", "StreamLost"]

log = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"
_POLL_S = 0.25                  # how often a waiting relay looks for a gone client
_TOMBSTONES = 4096              # expired ids remembered (for 410 rather than 404)
_FORWARD_FIRST_REPLY_S = 2.0    # an owner worker that does not answer in this is gone
_BEAT_S = 1.0                   # an owner with nothing new for a relay says so this often
_OWNER_SILENT_S = 10.0          # a relay that hears nothing for this has lost its owner
_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"}


def _err(message: str, code: str, status: int, param: str | None = None) -> FerryError:
    return FerryError(message, code=code, status=status, param=param)


class RetainedStream:
    """One resumable stream's events (each a whole SSE event with its id) and its state."""

    def __init__(self, store: StreamStore, stream_id: str, owner: str, sse: bool) -> None:
        self.store = store
        self.id = stream_id
        self.owner = owner
        self.sse = sse                  # SSE events (with `id:` lines) or WebSocket messages
        self.events: list[bytes] = []
        self.size = 0
        self.done = False
        self.readers = 0
        self.idle_since: float | None = time.monotonic()
        self.producer: asyncio.Future[Any] | None = None
        self._changed = asyncio.Event()

    def append(self, data: bytes, *, force: bool = False) -> bool:
        """Add one event (SSE: `data: ...\\n\\n`, given its `id:` line here; WebSocket: the
        message, which carries its number itself); False (nothing added) when it would take
        the owner past its retention bound, unless `force`."""
        event = f"id: {self.id}/{len(self.events) + 1}\n".encode() + data if self.sse else data
        if not self.store.charge(self.owner, len(event), force):
            return False
        self.events.append(event)
        self.size += len(event)
        self._wake()
        return True

    def finish(self) -> None:
        self.done = True
        self._wake()

    def attach(self) -> None:
        self.readers += 1
        self.idle_since = None

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0:
            self.idle_since = time.monotonic()

    async def changed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class StreamStore:
    """This worker's resumable streams, the per-key retention bound, and expiry."""

    def __init__(self, worker: int, window_s: float, max_bytes_per_key: int,
                 workers: int = 1) -> None:
        self.worker = worker
        self.workers = workers
        self.window_s = window_s
        self.max_bytes_per_key = max_bytes_per_key
        self.streams: dict[str, RetainedStream] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._bytes: collections.Counter[str] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex}-{self.worker}"

    def create(self, stream_id: str, owner: str, *, sse: bool = True) -> RetainedStream:
        stream = RetainedStream(self, stream_id, owner, sse)
        self.streams[stream_id] = stream
        return stream

    def charge(self, owner: str, nbytes: int, force: bool) -> bool:
        if not force and self._bytes[owner] + nbytes > self.max_bytes_per_key:
            return False
        self._bytes[owner] += nbytes
        return True

    def retained_bytes(self, owner: str) -> int:
        return self._bytes[owner]

    def lookup(self, stream_id: str, owner: str) -> RetainedStream:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.owner == owner:
            return stream
        if stream is None and stream_id in self._gone:
            raise _err(f"stream {stream_id!r} is no longer retained: it was not resumed within "
                       f"{self.window_s:g} s", "stream_expired", 410)
        raise _err(f"no stream {stream_id!r} to resume", "unknown_stream", 404)

    def expire(self, now: float | None = None) -> int:
        """Drop streams nobody has read for the window (cancelling their generations)."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for stream in list(self.streams.values()):
            if stream.readers or stream.idle_since is None:
                continue
            if now - stream.idle_since < self.window_s:
                continue
            self.drop(stream)
            dropped += 1
        return dropped

    def drop(self, stream: RetainedStream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.producer is not None and not stream.producer.done():
            stream.producer.cancel()
        self._bytes[stream.owner] -= stream.size
        if self._bytes[stream.owner] <= 0:
            del self._bytes[stream.owner]
        stream.events.clear()
        stream.finish()
        self._gone[stream.id] = "expired"
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)


class RetainedSink:
    """What the stream writer (frontends/http/openai.py `_stream`) writes to instead of the
    connection: events go into the retained stream, whoever reads it."""

    def __init__(self, stream: RetainedStream, request: web.Request) -> None:
        self.stream = stream
        self.request = request

    async def open(self) -> None:
        return None

    async def send(self, obj: Any) -> None:
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        if self.stream.done:
            raise ConnectionResetError("the stream was dropped")
        if not self.stream.append(b"data: " + data.encode() + b"\n\n"):
            self._overflow()
            raise ConnectionResetError("the stream passed its retention bound")
        await asyncio.sleep(0)      # let relays write as the tokens come

    async def close(self) -> None:
        if not self.stream.done:
            self.stream.append(_DONE, force=True)
            self.stream.finish()

    def _overflow(self) -> None:
        from frontends.http.errors import error_body
        limit = self.stream.store.max_bytes_per_key
        body = error_body(429, "resume_buffer_full",
                          f"this key's resumable streams hold {limit} bytes, the most "
                          "server.stream_resume_max_kb_per_key allows: the stream was ended",
                          request_id_of(self.request), None)
        data = json.dumps(body, separators=(",", ":")).encode()
        self.stream.append(b"data: " + data + b"\n\n", force=True)
        self.stream.append(_DONE, force=True)
        self.stream.finish()


def _response(request: web.Request, stream_id: str) -> web.StreamResponse:
    return web.StreamResponse(headers={**_HEADERS, "X-Request-ID": request_id_of(request),
                                       "Ferry-Stream-Id": stream_id})


Events = AsyncIterator["bytes | None"]     # None: nothing new for a while (look at the client)


async def local_events(stream: RetainedStream, start: int) -> Events:
    stream.attach()
    try:
        i = start
        while True:
            while i < len(stream.events):
                yield stream.events[i]
                i += 1
            if stream.done:
                return
            await stream.changed(_POLL_S)
            if i == len(stream.events) and not stream.done:
                yield None
    finally:
        stream.detach()


async def relay(request: web.Request, resp: web.StreamResponse, events: Events) -> None:
    """Write the events to the client, live, until the stream ends or the client goes. A
    client that takes nothing for the window counts as gone (its connection is dropped), or
    one that stops reading would keep its stream, and its key's retention, forever."""
    stall_s = request.app[RESUME_STORE].window_s
    try:
        if not resp.prepared:
            await resp.prepare(request)
        async for event in events:
            if event is not None:
                await written(request, resp.write(event), stall_s)
            elif client_gone(request):
                return
        await written(request, resp.write_eof(), stall_s)
    except StreamLost:
        log.warning("[%s] resumable stream: its owner worker went silent, dropped",
                    request_id_of(request))
        if request.transport is not None:
            request.transport.abort()
    except ConnectionResetError:
        return
    finally:
        await events.aclose()     # type: ignore[attr-defined]


async def written(request: web.Request, write: Awaitable[None], stall_s: float) -> None:
    """`write` (to the client of `request`), or ConnectionResetError once it has waited
    `stall_s` for a client that does not read: the connection is then aborted."""
    try:
        await asyncio.wait_for(write, stall_s)
    except asyncio.TimeoutError:
        log.info("[%s] resumable stream: the client read nothing for %g s, dropped",
                 request_id_of(request), stall_s)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None


# -- resuming ---------------------------------------------------------------------------------

def _digits(s: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '٣'."""
    return s.isascii() and s.isdigit()


def _parse_event_id(value: str) -> tuple[str, int]:
    sid, sep, n = value.strip().rpartition("/")
    if not sep or not sid or not _digits(n) or len(n) > 12 or len(sid) > 200:
        raise InvalidInput("'Last-Event-ID' must be '<stream id>/<event number>' as the "
                           "stream's events carry it", code="invalid_last_event_id",
                           param="Last-Event-ID")
    return sid, int(n)


def owner_of(request: web.Request) -> str:
    from frontends.http.security import principal_of
    principal = principal_of(request)
    return principal.id if principal is not None else "anonymous"


def _worker_of(stream_id: str) -> int | None:
    _, sep, tail = stream_id.rpartition("-")
    return int(tail) if sep and _digits(tail) and len(tail) <= 3 else None


def _check_start(stream: RetainedStream, n: int) -> None:
    if n > len(stream.events):
        raise InvalidInput(f"event {n} of stream {stream.id!r} was never sent (it has sent "
                           f"{len(stream.events)} so far)", code="invalid_last_event_id",
                           param="Last-Event-ID")


async def resume_from_header(request: web.Request) -> web.StreamResponse | None:
    """For the generation routes: a request with `Last-Event-ID` resumes that stream (its
    body is not read); None when the header is absent."""
    value = request.headers.get("Last-Event-ID")
    if value is None:
        return None
    sid, n = _parse_event_id(value)
    return await resume_response(request, sid, n)


async def open_events(request: web.Request, sid: str, n: int, *, sse: bool,
                      owner: str | None = None) -> Events:
    """The events of stream `sid` after its n-th, from this worker or relayed from the one
    that owns it; raises the FerryError that says why not before anything is sent."""
    store = request.app.get(RESUME_STORE)
    if store is None or not store.enabled:
        raise _err("resumable streams are off (server.stream_resume_window_s = 0)",
                   "resume_disabled", 400)
    owner = owner_of(request) if owner is None else owner
    worker = _worker_of(sid)
    if worker is None or worker >= store.workers or (worker != store.worker
                                                      and _CTX not in request.app):
        raise _err(f"no stream {sid!r} to resume", "unknown_stream", 404)
    if worker != store.worker:
        return await _forwarded(request, worker, sid, n, owner, sse)
    stream = store.lookup(sid, owner)
    _check_kind(stream, sse)
    _check_start(stream, n)
    return local_events(stream, n)


def _check_kind(stream: RetainedStream, sse: bool) -> None:
    if stream.sse != sse:
        where = "an SSE route" if stream.sse else "the WebSocket (a `resume` message)"
        raise _err(f"stream {stream.id!r} is resumed through {where}", "unknown_stream", 404)


async def resume_response(request: web.Request, sid: str, n: int) -> web.StreamResponse:
    events = await open_events(request, sid, n, sse=True)
    resp = _response(request, sid)
    await relay(request, resp, events)
    return resp


async def get_stream(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["stream_id"]
    header = request.headers.get("Last-Event-ID")
    query = request.query.get("last_event_id")
    if header is not None:
        hsid, n = _parse_event_id(header)
        if hsid != sid:
            raise InvalidInput("'Last-Event-ID' names another stream than the path",
                               code="invalid_last_event_id", param="Last-Event-ID")
    elif query is not None:
        if not _digits(query) or len(query) > 12:
            raise InvalidInput("'last_event_id' must be an event number",
                               code="invalid_last_event_id", param="last_event_id")
        n = int(query)
    else:
        n = 0
    return await resume_response(request, sid, n)


# -- between workers --------------------------------------------------------------------------

class _Forwarder:
    """Serves this worker's streams to the other workers (a ROUTER at resume-<k>.sock)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, store: StreamStore) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.store = store
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.tails: dict[bytes, asyncio.Task[None]] = {}

    def start(self) -> None:
        Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
        self.sock.bind(self.endpoint)

    async def serve(self) -> None:
        while True:
            ident, payload = await self.sock.recv_multipart()
            try:
                msg = msgpack.unpackb(payload)
                op = msg["op"]
            except Exception:   # noqa: BLE001 - only other workers of this daemon connect
                continue
            old = self.tails.pop(ident, None)
            if old is not None:
                old.cancel()
            if op == "tail":
                self.tails[ident] = asyncio.ensure_future(self._tail(ident, msg))

    async def _tail(self, ident: bytes, msg: dict[str, Any]) -> None:
        try:
            try:
                stream = self.store.lookup(str(msg["sid"]), str(msg["owner"]))
                _check_kind(stream, bool(msg["sse"]))
                _check_start(stream, int(msg["start"]))
            except FerryError as exc:
                await self.sock.send_multipart([ident, b"err", msgpack.packb(exc.to_wire())])
                return
            await self._send([ident, b"ok"])
            stream.attach()
            try:
                i = int(msg["start"])
                beat = time.monotonic()
                while True:
                    while i < len(stream.events):
                        await self._send([ident, b"ev", stream.events[i]])
                        i += 1
                        beat = time.monotonic()
                    if stream.done:
                        await self._send([ident, b"end"])
                        return
                    await stream.changed(_POLL_S)
                    if time.monotonic() - beat >= _BEAT_S:
                        await self._send([ident, b"hb"])
                        beat = time.monotonic()
            finally:
                stream.detach()
        except zmq.ZMQError:        # the reading worker went away
            return
        finally:
            if self.tails.get(ident) is asyncio.current_task():
                del self.tails[ident]

    async def _send(self, frames: list[bytes]) -> None:
        """Wait while the reader's pipe is full. A ROUTER_MANDATORY socket reports itself
        writable when any peer's pipe has room and then answers EAGAIN for this one: that is
        a reader behind (it catches up, or its worker drops it and the send fails with
        EHOSTUNREACH), not one gone."""
        delay = 0.001
        while True:
            try:
                await self.sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                await asyncio.sleep(delay)
                delay = min(2 * delay, _POLL_S / 5)

    def close(self) -> None:
        for task in self.tails.values():
            task.cancel()
        self.sock.close(linger=0)
        Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


async def _forwarded(request: web.Request, worker: int, sid: str, n: int, owner: str,
                     sse: bool) -> Events:
    ctx: zmq.asyncio.Context = request.app[_CTX]
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(request.app[_ENDPOINTS](worker))
    try:
        await sock.send(msgpack.packb({"op": "tail", "sid": sid, "start": n, "owner": owner,
                                       "sse": sse}))
        if not await sock.poll(_FORWARD_FIRST_REPLY_S * 1000):
            raise _err(f"stream {sid!r} was lost: the worker that ran it is not answering",
                       "stream_lost", 410)
        first = await sock.recv_multipart()
        if first[0] == b"err":
            wire = msgpack.unpackb(first[1])
            raise _err(wire["message"], wire["code"], wire["status"], wire.get("param"))
    except BaseException:
        sock.close(linger=0)
        raise
    return _relayed(sock)


class StreamLost(ConnectionResetError):
    """The worker that owns a relayed stream went silent (it died): the reader's connection
    is dropped, so its client reconnects (and learns 410 stream_lost) rather than waits."""


async def _relayed(sock: zmq.asyncio.Socket) -> Events:
    heard = time.monotonic()
    try:
        while True:
            if not await sock.poll(_POLL_S * 1000):
                if time.monotonic() - heard > _OWNER_SILENT_S:
                    raise StreamLost("the worker that owns the stream went silent")
                yield None
                continue
            frames = await sock.recv_multipart()
            heard = time.monotonic()
            if frames[0] == b"end":
                return
            yield frames[1] if frames[0] == b"ev" else None
    finally:
        try:
            sock.send(msgpack.packb({"op": "stop"}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        sock.close(linger=100)


# -- wiring -----------------------------------------------------------------------------------

RESUME_STORE = web.AppKey("resume_store", StreamStore)
_CTX = web.AppKey("resume_zmq_ctx", zmq.asyncio.Context)
_ENDPOINTS: web.AppKey[Callable[[int], str]] = web.AppKey("resume_endpoints")
_TASKS = web.AppKey("resume_tasks", list)


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/streams/{stream_id}", get_stream)


def configure(app: web.Application, *, worker: int, workers: int, window_s: float,
              max_bytes_per_key: int, runtime_dir: str | None) -> None:
    """Called by the HTTP worker before it starts (frontends/http/server.py)."""
    store = StreamStore(worker, window_s, max_bytes_per_key, workers)
    app[RESUME_STORE] = store
    if not store.enabled:
        return
    forwarder: _Forwarder | None = None
    if runtime_dir is not None:
        ctx = zmq.asyncio.Context.instance()

        def endpoint(k: int) -> str:
            return f"ipc://{runtime_dir}/resume-{k}.sock"

        app[_CTX] = ctx
        app[_ENDPOINTS] = endpoint
        forwarder = _Forwarder(ctx, endpoint(worker), store)

    async def start(app: web.Application) -> None:
        tasks = [asyncio.ensure_future(_reaper(store))]
        if forwarder is not None:
            forwarder.start()
            tasks.append(asyncio.ensure_future(forwarder.serve()))
        app[_TASKS] = tasks

    async def stop(app: web.Application) -> None:
        for task in app.get(_TASKS, []):
            task.cancel()
        for stream in list(store.streams.values()):
            store.drop(stream)
        if forwarder is not None:
            forwarder.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


async def _reaper(store: StreamStore) -> None:
    period = max(0.2, min(5.0, store.window_s / 4))
    while True:
        await asyncio.sleep(period)
        dropped = store.expire()
        if dropped:
            log.info("resumable streams: %d expired unread", dropped)
