"""The HTTP security middleware on a real aiohttp app with a real state directory and rate-limit
table: route policies, auth off vs required, the concurrency cap, tokens-per-minute charged from
`usage`, model names in bodies, the global IP allow-list, and request-log rows."""
from __future__ import annotations

import asyncio
import functools
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from frontends.http.errors import error_middleware
from frontends.http.security import ACCESS, install, policy_for

pytestmark = pytest.mark.timeout(60)


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 45))
    return wrapper


class App:
    """A small app with the real route patterns, the security layer installed, served."""

    def __init__(self, tmp_path, *, required: bool = True, allow_ips=(), cors=()) -> None:
        self.gate = asyncio.Event()
        self.app = web.Application(middlewares=[error_middleware])
        routes = web.RouteTableDef()

        @routes.post("/v2/models/{model}/infer")
        async def infer(request):
            return web.json_response({"model_name": request.match_info["model"]})

        @routes.get("/healthz")
        async def healthz(request):
            return web.json_response({"status": "live"})

        @routes.get("/admin/tokens")
        async def tokens(request):
            return web.json_response({"data": []})

        @routes.post("/v1/completions")
        async def completions(request):
            try:
                body = json.loads(await request.read())  # the middleware read it first
            except ValueError:
                return web.json_response({"error": {"code": "handler_saw_bad_json"}},
                                         status=400)
            return web.json_response({"model": body["model"], "choices": [],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                                "total_tokens": 12}})

        @routes.get("/v1/slow")
        async def slow(request):
            await self.gate.wait()
            return web.json_response({})

        @routes.get("/v1/boom")
        async def boom(request):
            raise RuntimeError("handler defect")

        self.app.add_routes(routes)
        install(self.app, {"state_dir": str(tmp_path / "state"),
                           "control": f"ipc://{tmp_path / 'run'}/control.sock",
                           "auth": {"required": required, "allow_ips": list(allow_ips)},
                           "cors_origins": list(cors), "log_bodies": False})
        self.server = TestServer(self.app, host="127.0.0.1")

    async def __aenter__(self) -> App:
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.server.close()

    @property
    def access(self):
        return self.app[ACCESS]

    async def key(self, **kw) -> str:
        return (await self.access.state.keys.create("k", **kw)).plaintext

    async def call(self, method: str, path: str, key: str | None = None, **kw):
        headers = kw.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with self.session.request(method, self.server.make_url(path), headers=headers,
                                        **kw) as resp:
            body = await resp.read()
            return resp.status, resp.headers, json.loads(body) if body else None


def code(body) -> str | None:
    err = body.get("error")
    return err.get("code") if isinstance(err, dict) else body.get("code")


@async_test
async def test_policies_with_auth_required(tmp_path):
    async with App(tmp_path) as a:
        infer, admin = await a.key(scopes=["infer"]), await a.key(scopes=["admin"])
        assert (await a.call("GET", "/healthz"))[0] == 200
        status, _, body = await a.call("POST", "/v2/models/m/infer", json={})
        assert (status, code(body)) == (401, "missing_credentials")
        assert (await a.call("POST", "/v2/models/m/infer", infer, json={}))[0] == 200
        status, _, body = await a.call("GET", "/admin/tokens", infer)
        assert (status, code(body)) == (403, "insufficient_scope")
        assert (await a.call("GET", "/admin/tokens", admin))[0] == 200
        status, _, body = await a.call("GET", "/nowhere")
        assert (status, code(body)) == (401, "missing_credentials")


@async_test
async def test_auth_off_ignores_credentials_but_not_for_the_admin_api(tmp_path):
    async with App(tmp_path, required=False) as a:
        admin = await a.key(scopes=["admin"])
        assert (await a.call("POST", "/v2/models/m/infer", json={}))[0] == 200
        assert (await a.call("POST", "/v2/models/m/infer", "garbage", json={}))[0] == 200
        status, _, body = await a.call("GET", "/admin/tokens")
        assert (status, code(body)) == (401, "missing_credentials")
        assert (await a.call("GET", "/admin/tokens", admin))[0] == 200


@async_test
async def test_concurrency_cap_and_release_on_errors(tmp_path):
    async with App(tmp_path) as a:
        key = await a.key(max_concurrent=1)
        first = asyncio.create_task(a.call("GET", "/v1/slow", key))
        # poll until the first request holds the slot (no sleeping on a guess)
        while a.access.limiter.in_flight(key.split("_")[1]) < 1:
            await asyncio.sleep(0.005)
        status, headers, body = await a.call("GET", "/v1/slow", key)
        assert (status, code(body)) == (429, "too_many_concurrent_requests")
        assert headers["Retry-After"] == "1"
        a.gate.set()
        assert (await first)[0] == 200
        assert (await a.call("GET", "/v1/slow", key))[0] == 200
        assert (await a.call("GET", "/v1/boom", key))[0] == 500      # a defect still releases
        assert (await a.call("GET", "/v1/slow", key))[0] == 200
        assert a.access.limiter.in_flight(key.split("_")[1]) == 0


@async_test
async def test_tokens_per_minute_from_usage_and_request_log(tmp_path):
    async with App(tmp_path) as a:
        key = await a.key(tpm=12)
        body = {"model": "m", "prompt": "x"}
        status, _, _ = await a.call("POST", "/v1/completions", key, json=body,
                                    headers={"X-Request-ID": "r-1"})
        assert status == 200
        status, headers, err = await a.call("POST", "/v1/completions", key, json=body)
        assert (status, code(err)) == (429, "token_rate_limited")
        assert int(headers["Retry-After"]) >= 1
        rows, _ = await a.access.state.requests.query(key_id=key.split("_")[1])
        ok = next(r for r in rows if r.request_id == "r-1")
        assert (ok.prompt_tokens, ok.completion_tokens, ok.model, ok.status) == (5, 7, "m", 200)
        assert ok.route == "POST /v1/completions"
        assert any(r.status == 429 and r.code == "token_rate_limited" for r in rows)


@async_test
async def test_model_in_body_and_path_against_allow_list(tmp_path):
    async with App(tmp_path) as a:
        key = await a.key(models=["mini*"])
        for model, status in (("minilm", 200), ("minilm:1", 200), ("digits", 403),
                              ("digits:2", 403)):
            got, _, body = await a.call("POST", "/v1/completions", key,
                                        json={"model": model, "prompt": "x"})
            assert got == status, (model, body)
        assert (await a.call("POST", "/v2/models/minilm/infer", key, json={}))[0] == 200
        status, _, body = await a.call("POST", "/v2/models/digits/infer", key, json={})
        assert (status, code(body)) == (403, "model_not_allowed")
        # A body that is not JSON reaches the handler intact, which answers it.
        status, _, body = await a.call("POST", "/v1/completions", key, data=b"{not json",
                                       headers={"Content-Type": "application/json"})
        assert (status, code(body)) == (400, "handler_saw_bad_json")


@async_test
async def test_global_ip_allow_list_covers_every_route(tmp_path):
    async with App(tmp_path, required=False, allow_ips=["10.0.0.0/8"]) as a:
        for method, path in (("GET", "/healthz"), ("POST", "/v2/models/m/infer")):
            status, _, body = await a.call(method, path, json={})
            assert (status, code(body)) == (403, "ip_not_allowed")


def test_policy_table():
    app = web.Application()
    for path in ("/healthz", "/metrics", "/admin/login", "/admin/tokens/{key_id}",
                 "/v2/repository/index", "/v2/models/{model}/infer", "/v1/ws",
                 "/v1/chat/completions", "/v1/batches", "/v2/systemsharedmemory/status"):
        app.router.add_route("*", path, lambda r: web.Response())
    from aiohttp.test_utils import make_mocked_request

    def policy(method, path):
        req = make_mocked_request(method, path, app=app)
        req._match_info = asyncio.run(app.router.resolve(req))
        return policy_for(req)
    assert policy("GET", "/healthz").scope is None and not policy("GET", "/metrics").logged
    assert policy("POST", "/admin/login").scope is None
    assert (policy("DELETE", "/admin/tokens/x").scope, policy("GET", "/admin/tokens/x").always) \
        == ("admin", True)
    assert policy("POST", "/v2/repository/index").scope == "admin"
    assert policy("GET", "/v2/systemsharedmemory/status").scope == "admin"
    assert policy("POST", "/v2/models/x/infer").model_in == "path"
    assert policy("GET", "/v1/ws").websocket
    assert policy("POST", "/v1/chat/completions").model_in == "body"
    assert policy("POST", "/v1/batches").model_in == ""
    # the matched pattern decides, not a path that merely looks open
    assert policy("GET", "/healthz/../admin/tokens/x").scope in ("admin", "infer")
