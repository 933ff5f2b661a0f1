"""WebSocket `/v1/ws`: many generation requests multiplexed on one socket, each named by a
client-chosen `id`.

Client → server (JSON text frames):

    {"type": "auth", "token": "..."}
    {"type": "inference", "id": "r1", "model": "smollm2", "prompt": "..." | "messages": [...],
     "max_tokens": 32, "stream": true, ...}       # any /v1/completions or chat field
    {"type": "inference", "id": "i1", "model": "digits-diffusion", "prompt": "a handwritten 7",
     "n": 2, "size": "64x64", "seed": 7, ...}     # an image model: /v1/images/generations fields
    {"type": "cancel", "id": "r1"}
    {"type": "resume", "stream": "ws-...-0", "last_event": 7}    # see "Resumable" below
    {"type": "ping", ...}                          # anything else in it is echoed back

Server → client:

    {"type": "token", "id": "r1", "choice": 0, "index": 0, "token": "Once"}   # stream: true
    {"type": "complete", "id": "r1", "model": "smollm2", "text": "...", "finish_reason": "stop",
     "choices": [{"index": 0, "text": "...", "finish_reason": "stop"}], "usage": {...}}
    {"type": "error", "id": "r1" | null, "code": "...", "message": "...", "param": ..., "status": 400}
    {"type": "progress", "id": "i1", "image": 0, "step": 3, "steps": 30}   # image models
    {"type": "complete", "id": "i1", "model": "digits-diffusion", "finish_reason": "stop",
     "created": ..., "data": [{"b64_json": "...", "seed": 7}, ...], "usage": {...}}
    {"type": "pong", ...}
    {"type": "auth", "ok": true}

A cancelled request ends with `complete` and finish_reason "cancelled" (with the text so far;
an image request with `data` empty: its rows leave the engine's batch at the next step).
An image request streams one `progress` per image per denoising step (`"stream": false`: none).
Closing the socket cancels every request it holds in the engine at once. Bad messages answer
`error` and leave the socket open.

Resumable (text models): an `inference` with `"resumable": true` outlives the socket. Its
messages carry `"stream"` (its stream id) and `"event"` (1, 2, ...); the first is
`{"type": "stream", "id": "r1", "stream": "ws-...-0", "event": 1}`. When the socket closes the
generation goes on into a retained buffer (frontends/http/resume.py); any socket of the same
key sends `{"type": "resume", "stream": ..., "last_event": n}` within
`server.stream_resume_window_s` and gets the messages after n (the original `id` in them), live
to the end, from whichever worker it reached. Errors, as `error` messages: 400
`invalid_parameter`, 404 `unknown_stream`, 410 `stream_expired` / `stream_lost`, 400
`resume_disabled`; a key's retained streams past `server.stream_resume_max_kb_per_key` end
with a `resume_buffer_full` error.

Auth hook: when the security layer sets `app[WS_AUTH]` to `async (request, token) -> principal`,
the socket is accepted only after the hook returns a principal — for `token=None` at connect
(credentials on the upgrade request; browsers cannot set headers on WebSockets, hence the
message) or for the token of an `auth` message; the hook raises `Unauthorized` to refuse. Without
the hook, `auth` messages are acknowledged and ignored. A socket not authenticated within
AUTH_TIMEOUT_S, or after MAX_AUTH_FAILURES refused `auth` messages, gets an `error`
(`auth_timeout`, `too_many_auth_failures`) and is closed with 1008 (policy violation). A
principal with `may_use(model)` (as daemon.auth.Principal has) is asked before each inference. `app[WS_ADMIT]`, when set, admits
each inference message against the caller's rate limits — `(request, principal) -> done`
(raising RateLimited) — and `done(tokens)` runs when the request ends, with the prompt and
completion tokens it used.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from daemon.errors import FerryError, Forbidden, InvalidInput, RateLimited, Unauthorized
from daemon import protocol as P
from frontends.http.appkeys import DISPATCHER, SETTINGS
from frontends.http.errors import request_id_of
from frontends.http.images import (image_usage, in_openai_terms, is_image_model,
                                   openai_images_body, parse_openai_images, run_images)
from frontends.http.json_body import decode_json
from frontends.http.openai_schema import parse_chat, parse_completion, require_object
from frontends.http.resume import (RESUME_STORE, RetainedStream, local_events, open_events,
                                   StreamLost, owner_of, written)
from frontends.http.textgen import TEXTS, Generation, Usage, encode_prompts, install

__all__ = ["routes", "setup", "WS_AUTH", "WS_ADMIT", "Authenticator", "Admitter",
           "MAX_INFLIGHT"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

Authenticator = Callable[[web.Request, "str | None"], Awaitable[Any]]
Admitter = Callable[[web.Request, Any], "Callable[[int], None] | None"]
WS_AUTH = web.AppKey("ws_authenticator", object)    # an Authenticator; absent: no auth
WS_ADMIT = web.AppKey("ws_admitter", object)        # an Admitter; absent: no rate limits
MAX_INFLIGHT = 64            # concurrent requests per socket
MAX_MESSAGE = 1 << 20
AUTH_TIMEOUT_S = 10.0        # a socket must authenticate within this, or it is closed
MAX_AUTH_FAILURES = 3        # refused `auth` messages before the socket is closed
_HEARTBEAT_S = 30.0


def setup(app: web.Application) -> None:
    install(app)
    app.add_routes(routes)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _Session:
    """One socket: its requests in flight and the handler for each client message type."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request, self.ws = request, ws
        self.tasks: dict[Any, asyncio.Task] = {}
        self.cancelled: set[Any] = set()
        self.replies: set[asyncio.Task] = set()     # answers for requests that never started
        self.resumable: set[Any] = set()            # ids whose generation outlives the socket
        self.relays: dict[str, asyncio.Task] = {}   # stream id → its relay to this socket
        self.auth: Authenticator | None = request.app.get(WS_AUTH)  # type: ignore[assignment]
        self.admit: Admitter | None = request.app.get(WS_ADMIT)  # type: ignore[assignment]
        self.principal: Any = None
        self.auth_failures = 0
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "auth": self.on_auth, "inference": self.on_inference, "cancel": self.on_cancel,
            "ping": self.on_ping, "resume": self.on_resume}

    async def send(self, obj: dict[str, Any]) -> None:
        try:
            await self.ws.send_str(_dumps(obj))
        except ConnectionResetError:
            pass    # the socket is closing; the receive loop ends and cancels what is left

    async def send_error(self, rid: Any, exc: FerryError) -> None:
        await self.send(_error(rid, exc))

    async def on_connect(self) -> asyncio.Task | None:
        """Authenticate from the upgrade's headers; when that fails, an `auth` message may still
        follow, and the returned task closes the socket if none succeeds in AUTH_TIMEOUT_S."""
        if self.auth is None:
            return None
        try:
            self.principal = await self.auth(self.request, None)
        except Unauthorized:
            self.principal = None
            return asyncio.create_task(self._auth_deadline())
        return None

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT_S)
        if self.principal is None:
            await self.refuse(Unauthorized(f"no valid credentials within {AUTH_TIMEOUT_S:g} s",
                                           code="auth_timeout"))

    async def refuse(self, exc: FerryError) -> None:
        """Tell the client why, then close: an unauthenticated socket holds a connection and a
        worker's memory, so it may not linger or keep guessing."""
        await self.send_error(None, exc)
        await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=exc.code.encode())

    async def on_text(self, data: str) -> None:
        rid = None
        try:
            msg = require_object(decode_json(data))
            rid = msg.get("id")
            handler = self.handlers.get(msg.get("type"))  # type: ignore[arg-type]
            if handler is None:
                raise InvalidInput(f"unknown message type {msg.get('type')!r}; expected auth, "
                                   "inference, cancel, resume or ping", code="unknown_type",
                                   param="type")
            await handler(msg)
        except FerryError as exc:
            await self.send_error(rid if _valid_id(rid) else None, exc)
            if self.auth_failures >= MAX_AUTH_FAILURES and self.principal is None:
                await self.refuse(Unauthorized(f"{MAX_AUTH_FAILURES} refused auth messages",
                                               code="too_many_auth_failures"))

    async def on_auth(self, msg: dict[str, Any]) -> None:
        token = msg.get("token")
        if token is not None and not isinstance(token, str):
            raise InvalidInput("'token' must be a string", code="invalid_parameter",
                               param="token")
        if self.auth is not None:
            try:
                self.principal = await self.auth(self.request, token)
            except Unauthorized:
                self.auth_failures += 1
                raise
        await self.send({"type": "auth", "ok": True})

    async def on_ping(self, msg: dict[str, Any]) -> None:
        await self.send({**msg, "type": "pong"})

    async def on_cancel(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        task = self.tasks.get(rid) if _valid_id(rid) else None
        if task is None:
            raise FerryError(f"no request {rid!r} is in flight on this socket",
                             code="unknown_request", status=404, param="id")
        self.cancelled.add(rid)
        task.cancel()

    def _authenticated(self) -> None:
        if self.auth is not None and self.principal is None:
            raise Unauthorized("authenticate first: send {\"type\": \"auth\", "
                               "\"token\": ...}")

    def _owner(self) -> str:
        principal_id = getattr(self.principal, "id", None)
        return str(principal_id) if principal_id is not None else owner_of(self.request)

    async def on_resume(self, msg: dict[str, Any]) -> None:
        self._authenticated()
        sid, n = msg.get("stream"), msg.get("last_event", 0)
        if not isinstance(sid, str) or not 0 < len(sid) <= 200:
            raise InvalidInput("'stream' must be the stream id of a resumable request",
                               code="invalid_parameter", param="stream")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 2**40:
            raise InvalidInput("'last_event' must be the number of the last message received "
                               "(0: from the start)", code="invalid_parameter",
                               param="last_event")
        if sid in self.relays:
            raise InvalidInput(f"stream {sid!r} is already being sent on this socket",
                               code="duplicate_id", param="stream")
        events = await open_events(self.request, sid, n, sse=False, owner=self._owner())
        self._relay(sid, events)

    def _relay(self, sid: str, events: Any) -> None:
        stall_s = self.request.app[RESUME_STORE].window_s   # a socket that reads nothing
                                                            # for the window is dropped
        async def run() -> None:
            try:
                async for event in events:
                    if event is not None:
                        await written(self.request, self.ws.send_str(event.decode()), stall_s)
                    elif self.ws.closed:
                        return
            except StreamLost:
                await self.send_error(None, FerryError(
                    f"stream {sid!r} was lost: the worker that ran it went away",
                    code="stream_lost", status=410))
            except ConnectionResetError:
                return
            finally:
                await events.aclose()
                self.relays.pop(sid, None)
        self.relays[sid] = asyncio.create_task(run())

    async def on_inference(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if not _valid_id(rid):
            raise InvalidInput("'id' must be a string of 1 to 128 characters or an integer",
                               code="invalid_parameter", param="id")
        if self.auth is not None:
            self._authenticated()
            may_use = getattr(self.principal, "may_use", None)   # daemon.auth.Principal
            if may_use is not None and not may_use(str(msg.get("model"))):
                raise Forbidden(f"this credential may not use model {msg.get('model')!r}",
                                code="model_not_allowed", param="model")
        if rid in self.tasks:
            raise InvalidInput(f"request {rid!r} is already in flight on this socket",
                               code="duplicate_id", param="id")
        # A cancelled request is on its way out (its task may not even have started): its slot
        # is free already, or a burst of inference+cancel pairs would be refused for a while.
        if len(self.tasks) - len(self.cancelled) >= MAX_INFLIGHT:
            raise RateLimited(f"at most {MAX_INFLIGHT} requests may be in flight on one socket")
        image = is_image_model(self.request.app[DISPATCHER], msg.get("model"))
        stream = self._retained(msg, image)
        release = self.admit(self.request, self.principal) if self.admit is not None else None
        spent: list[Usage] = []            # run() puts the request's Usage here once started
        if image:
            task = asyncio.create_task(self.run_image(rid, msg, spent))
        elif stream is not None:
            task = asyncio.create_task(self.run(rid, msg, spent, _RetainedSend(stream)))
            stream.producer = task
            self.resumable.add(rid)
            await _RetainedSend(stream)({"type": "stream", "id": rid})
            self._relay(stream.id, local_events(stream, 0))
        else:
            task = asyncio.create_task(self.run(rid, msg, spent))
        task.add_done_callback(lambda done: self._reap(rid, msg.get("model"), done))
        if release is not None:
            # A done callback runs even for a task cancelled before it started (a socket
            # closed at once), where a `finally` in run() would never execute.
            task.add_done_callback(lambda _task: release(sum(u.total for u in spent)))
        self.tasks[rid] = task

    def _retained(self, msg: dict[str, Any], image: bool) -> RetainedStream | None:
        resumable = msg.get("resumable", False)
        if not isinstance(resumable, bool):
            raise InvalidInput("'resumable' must be a boolean", code="invalid_parameter",
                               param="resumable")
        if not resumable:
            return None
        if image:
            raise InvalidInput("image requests are not resumable", code="unsupported_parameter",
                               param="resumable")
        store = self.request.app.get(RESUME_STORE)
        if store is None or not store.enabled:
            raise InvalidInput("resumable streams are off on this server "
                               "(server.stream_resume_window_s = 0)", code="resume_disabled",
                               param="resumable")
        return store.create(store.new_id("ws-"), self._owner(), sse=False)

    async def run(self, rid: Any, msg: dict[str, Any], spent: list[Usage],
                  send: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> None:
        """Generate, then send the request's one terminal message (`complete` or `error`). It
        goes out after the id leaves `tasks`, so no `cancel` can interrupt it halfway. A
        resumable request sends into its retained stream (`send`) instead of the socket."""
        send = self.send if send is None else send
        texts: list[list[str]] = []
        finish: list[str | None] = []
        name, usage = msg.get("model"), None
        try:
            gen, stream = await self._start(msg)
            name, usage = gen.choices[0].tm.name, gen.usage
            spent.append(usage)
            texts = [[] for _ in gen.choices]
            finish = [None] * len(gen.choices)
            counts = [0] * len(gen.choices)
            async with gen:
                async for p in gen.pieces():
                    texts[p.index].append(p.text)
                    finish[p.index] = p.finish_reason
                    if stream and p.text:
                        await send({"type": "token", "id": rid, "choice": p.index,
                                         "index": counts[p.index], "token": p.text})
                        counts[p.index] += 1
            terminal = _complete(rid, name, texts, finish, usage)
        except FerryError as exc:
            terminal = _error(rid, exc)
        except asyncio.CancelledError:
            if rid not in self.cancelled:
                raise        # the socket closed: nobody to tell
            terminal = _complete(rid, name, texts or [[]],
                                 [f or "cancelled" for f in finish] or ["cancelled"], usage)
        finally:
            self.tasks.pop(rid, None)
            self.cancelled.discard(rid)
            self.resumable.discard(rid)
        await send(terminal)

    async def run_image(self, rid: Any, msg: dict[str, Any], spent: list[Usage]) -> None:
        """An image model's `inference` (OpenAI images fields): a `progress` event per image
        per denoising step as the engine takes it (unless `stream` is false), then one
        `complete` with the images, or `error`. Cancelling frees the rows in the engine."""
        d = self.request.app[DISPATCHER]
        name: Any = msg.get("model")
        events: asyncio.Queue[P.Progress | None] = asyncio.Queue()
        pump: asyncio.Task | None = None
        try:
            stream = msg.get("stream", True)
            if not isinstance(stream, bool):
                raise InvalidInput("'stream' must be a boolean", code="invalid_parameter",
                                   param="stream")
            body = {k: v for k, v in msg.items() if k not in ("type", "id", "stream")}
            job = parse_openai_images(d, body)
            name = job.name
            if stream:
                pump = asyncio.create_task(self._progress_events(rid, events))
            try:
                pngs, seeds = await run_images(
                    d, job, timeout_s=self.request.app[SETTINGS].request_timeout_s,
                    request_id=f"{request_id_of(self.request)}:{rid}",
                    on_progress=events.put_nowait if stream else None)
            except FerryError as exc:
                raise in_openai_terms(exc)
            spent.append(Usage(completion_tokens=job.units))
            terminal = {"type": "complete", "id": rid, "model": name, "finish_reason": "stop",
                        **openai_images_body(job, pngs, seeds)}
        except FerryError as exc:
            terminal = _error(rid, exc)
        except asyncio.CancelledError:
            if rid not in self.cancelled:
                raise        # the socket closed: nobody to tell
            terminal = {"type": "complete", "id": rid, "model": name,
                        "finish_reason": "cancelled", "data": [], "usage": image_usage(0)}
        finally:
            self.tasks.pop(rid, None)
            self.cancelled.discard(rid)
            if pump is not None:               # every progress event goes out before the end
                events.put_nowait(None)
                await asyncio.gather(pump, return_exceptions=True)
        await self.send(terminal)

    async def _progress_events(self, rid: Any, events: asyncio.Queue) -> None:
        while (p := await events.get()) is not None:
            await self.send({"type": "progress", "id": rid, "image": p.image, "step": p.step,
                             "steps": p.steps})

    def _reap(self, rid: Any, model: Any, task: asyncio.Task) -> None:
        """A task cancelled before its first step (a `cancel` read in the same batch of frames
        as its `inference`) never runs run()'s body: free its id and answer for it here."""
        if self.tasks.get(rid) is not task:
            return                           # run() already did both
        del self.tasks[rid]
        if rid in self.cancelled:
            self.cancelled.discard(rid)
            if is_image_model(self.request.app[DISPATCHER], model):
                terminal = {"type": "complete", "id": rid, "model": model,
                            "finish_reason": "cancelled", "data": [], "usage": image_usage(0)}
            else:
                terminal = _complete(rid, model, [[]], ["cancelled"], None)
            reply = asyncio.create_task(self.send(terminal))
            self.replies.add(reply)
            reply.add_done_callback(self.replies.discard)

    async def _start(self, msg: dict[str, Any]) -> tuple[Generation, bool]:
        body = {k: v for k, v in msg.items() if k not in ("type", "id", "resumable")}
        body.setdefault("stream", True)
        texts, d = self.request.app[TEXTS], self.request.app[DISPATCHER]
        rid = f"{request_id_of(self.request)}:{msg['id']}"     # the socket's id + the client's
        if "messages" in body:
            chat = parse_chat(body)
            tm = await texts.text_model(chat.model)
            ids = await tm.encode(tm.render_chat(chat.messages), add_special_tokens=False)
            gen = await Generation.start(d, tm, [ids], chat.params, request_id=rid,
                                         prompt_param="messages")
            return gen, chat.params.stream
        req = parse_completion(body)
        tm = await texts.text_model(req.model)
        prompts = await encode_prompts(tm, req.prompts)
        gen = await Generation.start(d, tm, prompts, req.params, request_id=rid)
        return gen, req.params.stream

    async def close(self) -> None:
        """Cancel what the socket held, except resumable generations (they go on, retained,
        until resumed or expired)."""
        tasks = [t for rid, t in self.tasks.items() if rid not in self.resumable]
        tasks += self.relays.values()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _RetainedSend:
    """`send` for a resumable request: each message, numbered, into its retained stream; the
    terminal one ends it. Past the key's retention bound the request fails with
    `resume_buffer_full` (its terminal error is kept regardless)."""

    def __init__(self, stream: RetainedStream) -> None:
        self.stream = stream

    async def __call__(self, obj: dict[str, Any]) -> None:
        stream = self.stream
        if stream.done:
            return
        terminal = obj.get("type") in ("complete", "error")
        data = _dumps({**obj, "stream": stream.id, "event": len(stream.events) + 1}).encode()
        if not stream.append(data, force=terminal):
            raise FerryError(f"this key's resumable streams hold "
                             f"{stream.store.max_bytes_per_key} bytes, the most "
                             "server.stream_resume_max_kb_per_key allows: the stream was ended",
                             code="resume_buffer_full", status=429)
        if terminal:
            stream.finish()
        await asyncio.sleep(0)


def _valid_id(rid: Any) -> bool:
    return (isinstance(rid, str) and 0 < len(rid) <= 128) or (
        isinstance(rid, int) and not isinstance(rid, bool))


def _error(rid: Any, exc: FerryError) -> dict[str, Any]:
    return {"type": "error", "id": rid, "code": exc.code, "message": exc.message,
            "param": exc.param, "status": exc.status}


def _complete(rid: Any, model: Any, texts: list[list[str]], finish: list[str | None],
              usage: Any) -> dict[str, Any]:
    choices = [{"index": i, "text": "".join(t), "finish_reason": f}
               for i, (t, f) in enumerate(zip(texts, finish))]
    return {"type": "complete", "id": rid, "model": model, "text": choices[0]["text"],
            "finish_reason": choices[0]["finish_reason"], "choices": choices,
            "usage": usage.to_dict() if usage is not None else None}


@routes.get("/v1/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=_HEARTBEAT_S, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    session = _Session(request, ws)
    deadline = await session.on_connect()
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await session.send_error(None, InvalidInput(
                    "binary frames are not accepted; send JSON text", code="invalid_json"))
    finally:
        if deadline is not None:
            deadline.cancel()
        await session.close()
    return ws
