"""The HTTP error middleware (frontends/http/errors.py) on a real aiohttp server: a timeout no
handler turned into an error is a 504 `deadline_exceeded`, not a 500; errors rebuilt from the
wire keep their status, code and Retry-After."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon.errors import Overloaded, error_from_wire
from frontends.http.errors import error_middleware


async def _wait_past_deadline(request: web.Request) -> web.Response:
    await asyncio.wait_for(asyncio.Event().wait(), 0.01)
    return web.Response(text="unreachable")


async def _timeout_block(request: web.Request) -> web.Response:
    async with asyncio.timeout(0.01):
        await asyncio.Event().wait()
    return web.Response(text="unreachable")


async def _crash(request: web.Request) -> web.Response:
    raise ValueError("a bug")


async def _engine_shed(request: web.Request) -> web.Response:
    raise error_from_wire(Overloaded("the queue is full", retry_after=2.2).to_wire())


def _app() -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/v1/slow", _wait_past_deadline)
    app.router.add_get("/v1/block", _timeout_block)
    app.router.add_get("/v2/models/m/infer", _wait_past_deadline)
    app.router.add_get("/v1/crash", _crash)
    app.router.add_get("/v1/shed", _engine_shed)
    return app


async def _get_all(paths: list[str]) -> list[tuple[int, dict, dict]]:
    server = TestServer(_app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            out = []
            for path in paths:
                async with s.get(server.make_url(path),
                                 headers={"X-Request-ID": f"rid{len(out)}"}) as resp:
                    out.append((resp.status, dict(resp.headers), await resp.json()))
            return out
    finally:
        await server.close()


@pytest.mark.timeout(30)
def test_a_timeout_reaching_the_middleware_is_a_504_and_a_bug_still_a_500():
    (slow, block, kserve, crash, shed) = asyncio.run(asyncio.wait_for(_get_all(
        ["/v1/slow", "/v1/block", "/v2/models/m/infer", "/v1/crash", "/v1/shed"]), 25))
    for n, (status, headers, body) in enumerate((slow, block)):
        assert status == 504, body
        assert body["error"]["code"] == "deadline_exceeded"
        assert body["error"]["type"] == "timeout_error"
        assert body["error"]["request_id"] == f"rid{n}" == headers["X-Request-ID"]
    status, _, body = kserve                 # KServe's shape: error is the message string
    assert status == 504 and body["code"] == "deadline_exceeded"
    assert isinstance(body["error"], str) and body["request_id"] == "rid2"
    status, _, body = crash
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "a bug" not in str(body)          # nothing of the exception leaks
    status, headers, body = shed
    assert status == 429 and body["error"]["code"] == "overloaded"
    assert headers["Retry-After"] == "3"
