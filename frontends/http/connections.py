"""Slow and surplus clients on an HTTP worker: what keeps 200 slowloris sockets from pinning a
worker's connections and memory forever.

- Request heads: aiohttp closes a connection that has no complete request head
  `header_timeout_s` after it opened, or after its last response (its keep-alive timer, which
  `FrontendRunner` sets to that value; idle keep-alive connections close after it too).
- Request bodies: `body_deadline_middleware` gives a body `body_timeout_s` from the request
  head to arrive in full. A handler still reading it then gets `BodyTimeout` (408
  `body_timeout`), and the connection is closed after the answer, since the rest of the body
  is never read.
- Connections: a worker holds at most `max_connections`; past that a new connection gets a
  503 `too_many_connections` (JSON, `Retry-After: 1`) and is closed at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from daemon.errors import FerryError
from frontends.http.appkeys import SETTINGS
from frontends.http.errors import error_response

__all__ = ["BodyTimeout", "FrontendRunner", "body_deadline_middleware"]

log = logging.getLogger(__name__)


class BodyTimeout(FerryError):
    status, code = 408, "body_timeout"


class _CappedServer(web.Server):
    """aiohttp's connection manager, refusing connections past `max_connections`."""

    max_connections: int = 512
    refused: int = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("refused %d connection(s): this worker holds max_connections=%d",
                            self.refused, self.max_connections)
            transport.write(_busy_response(self.max_connections))
            transport.close()       # the handler then sees connection_lost and ends
            return
        super().connection_made(handler, transport)


def _busy_response(limit: int) -> bytes:
    body = json.dumps({"error": {
        "code": "too_many_connections", "type": "service_unavailable", "param": None,
        "message": f"this worker already holds {limit} connections (server.max_connections); "
                   "retry shortly"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class FrontendRunner(web.AppRunner):
    """An AppRunner whose server bounds request-head time and the number of connections."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, max_connections: int,
                 **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=header_timeout_s, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; this subclass only
        # overrides connection_made and adds no state, so the instance takes it as it is.
        server.__class__ = _CappedServer
        assert isinstance(server, _CappedServer)
        server.max_connections = self._max_connections
        return server


@web.middleware
async def body_deadline_middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    content = request.content
    if content.is_eof() or not request.body_exists:
        return await handler(request)
    timeout = request.app[SETTINGS].body_timeout_s
    expired = False

    def expire() -> None:
        nonlocal expired
        if not content.is_eof():
            expired = True
            content.set_exception(BodyTimeout(
                f"the request body did not arrive within {timeout:g} s of its head "
                "(server.body_timeout_s)"))
    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        resp = await handler(request)
    except FerryError as exc:
        if not expired:
            raise
        resp = error_response(request, exc if isinstance(exc, BodyTimeout) else BodyTimeout(
            exc.message))
    finally:
        timer.cancel()
    if expired and not resp.prepared:
        resp.force_close()          # the rest of the body is never read: the connection ends
    return resp
