"""Server-sent events for streamed HTTP responses, and noticing a client that went away.

aiohttp (>= 3.9) no longer cancels a handler when its client disconnects, and a streamed
generation only learns of it at its next write. `until_disconnect` closes that gap: it runs the
handler's work as a task and cancels it as soon as the connection is gone, so the engine request
is cancelled (and its KV blocks freed) within one poll period even while no token is flowing,
for instance during a long prefill or a non-streamed request. vLLM polls the same way
(`request.is_disconnected()`); the connection state is a field read, so polling costs nothing.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Protocol, TypeVar

from aiohttp import web

from frontends.http.errors import request_id_of

__all__ = ["SSEResponse", "EventSink", "client_gone", "until_disconnect", "DISCONNECT_POLL_S"]

T = TypeVar("T")
DISCONNECT_POLL_S = 0.05
_DONE = b"data: [DONE]\n\n"


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def until_disconnect(request: web.Request, work: Awaitable[T],
                           poll_s: float = DISCONNECT_POLL_S) -> T | None:
    """The result of `work`, or None when the client disconnected first (work is cancelled
    and has finished its cleanup when this returns)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    gone = False
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle, gone
        if task.done():
            return
        if client_gone(request):
            gone = True
            task.cancel()
            return
        handle = loop.call_later(poll_s, check)

    handle = loop.call_later(poll_s, check)
    try:
        return await task      # cancelling this handler cancels the task with it
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if gone and me is not None and not me.cancelling():
            return None
        raise
    except ConnectionResetError:   # a write noticed first
        if client_gone(request):
            return None
        raise
    finally:
        if handle is not None:
            handle.cancel()


class EventSink(Protocol):
    """Where a stream writer sends its events: the connection (SSEResponse), or a resumable
    stream's retained buffer (frontends/http/resume.py)."""

    request: web.Request

    async def open(self) -> None: ...

    async def send(self, obj: Any) -> None: ...

    async def close(self) -> None: ...


class SSEResponse:
    """`text/event-stream` with one JSON object per `data:` line, ended by `data: [DONE]`."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",              # nginx: do not buffer the stream
            "X-Request-ID": request_id_of(request)})

    async def open(self) -> None:
        await self.resp.prepare(self.request)

    async def send(self, obj: Any) -> None:
        """Raises ConnectionResetError once the client has gone."""
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        await self.resp.write(b"data: " + data.encode() + b"\n\n")

    async def close(self) -> None:
        await self.resp.write(_DONE)
        await self.resp.write_eof()
