"""Where batch webhooks may go: the address rules, the submission check and the resolver that
guards the actual connection (a real aiohttp server on 127.0.0.1, reached by name)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from daemon.egress import DestinationRefused, EgressPolicy
from daemon.errors import InvalidInput

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("ip,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("10.0.0.7", "private"), ("172.16.3.4", "private"),
    ("192.168.1.1", "private"), ("fd12::3", "private"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("::ffff:10.0.0.1", "private"), ("240.0.0.1", "reserved"),
])
def test_non_public_addresses_are_refused(ip, why):
    refusal = EgressPolicy().refusal(ip)
    assert refusal is not None and why in refusal


def test_public_and_allowed_addresses_pass():
    policy = EgressPolicy(["127.0.0.0/8", "10.1.0.0/16"])
    for ip in ("93.184.216.34", "2606:2800:220:1::1", "127.0.0.1", "10.1.2.3",
               "::ffff:10.1.9.9"):
        assert policy.refusal(ip) is None, ip
    assert policy.refusal("10.2.0.1") is not None
    assert policy.refusal("::1") is not None, "allowing 127/8 does not allow IPv6 loopback"


def test_submission_check_names_the_field_and_the_reason():
    async def check(url: str, policy: EgressPolicy = EgressPolicy()) -> str | None:
        try:
            await policy.check_url(url)
        except InvalidInput as exc:
            assert (exc.status, exc.code, exc.param) == (400, "webhook_url_not_allowed",
                                                         "webhook_url")
            return exc.message
        return None

    async def main() -> None:
        assert "link-local" in (await check("http://169.254.169.254/latest/") or "")
        assert "loopback" in (await check("http://localhost:8080/hook") or "")   # resolved
        assert await check("http://93.184.216.34/hook") is None
        assert await check("ftp://10.0.0.1/x") is None          # not http(s): the store refuses
        assert await check("http://[::1") is None              # malformed: likewise
        assert await check("http://localhost/", EgressPolicy(["127.0.0.0/8", "::1/128"])) is None
    asyncio.run(main())


def test_the_resolver_refuses_the_connection_itself():
    """A name checked at submission could resolve elsewhere at send time: the session's own
    resolver refuses it, and nothing reaches the receiver."""
    hits: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(await request.text())
        return web.Response()

    async def post(policy: EgressPolicy, url: str) -> None:
        connector = aiohttp.TCPConnector(resolver=policy.resolver())
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(url, data="x") as resp:
                assert resp.status == 200

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]     # type: ignore[union-attr]
        url = f"http://localhost:{port}/hook"
        try:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await post(EgressPolicy(), url)
            assert isinstance(info.value.os_error, DestinationRefused)
            assert hits == []
            await post(EgressPolicy(["127.0.0.0/8", "::1/128"]), url)
            assert hits == ["x"]
        finally:
            await runner.cleanup()
    asyncio.run(main())
