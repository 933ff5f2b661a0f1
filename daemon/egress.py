"""Where the daemon's own outgoing requests (batch webhooks) may go.

A webhook URL is chosen by whoever submits a batch, and the daemon POSTs to it from inside the
host's network: without a guard, any key holder could make Ferry reach the loopback admin API,
a cloud metadata service (169.254.169.254) or a private network (SSRF). So by default a webhook
may only reach public unicast addresses; `auth.webhook_allow_cidrs` lists private networks that
may be reached anyway (a receiver on 127.0.0.1, an internal service).

Checked twice: when a batch is submitted (a clear 400 at once for addresses that are refused)
and when the webhook is sent, where the resolver itself refuses a name that resolves to a
refused address, so a DNS answer that changes between the two (rebinding) cannot get through.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from daemon.errors import InvalidInput

__all__ = ["EgressPolicy", "DestinationRefused"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RESOLVE_TIMEOUT_S = 2.0


class DestinationRefused(OSError):
    """A webhook destination outside what the policy allows (an OSError, so that the HTTP client
    reports it as a connection error)."""


def _why_refused(addr: IpAddress) -> str | None:
    for test, what in ((addr.is_loopback, "loopback"), (addr.is_link_local, "link-local"),
                       (addr.is_multicast, "multicast"), (addr.is_unspecified, "unspecified"),
                       (addr.is_reserved, "reserved"), (addr.is_private, "private")):
        if test:
            return what
    return None


class EgressPolicy:
    def __init__(self, allow_cidrs: Iterable[str] = ()) -> None:
        self.set_allow(allow_cidrs)

    def set_allow(self, allow_cidrs: Iterable[str]) -> None:
        """Replace the allowed private networks (the resolver in use follows at once)."""
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in allow_cidrs)

    def refusal(self, ip: str) -> str | None:
        """Why `ip` may not be reached, or None when it may."""
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        # A dual-stack form (::ffff:a.b.c.d) is judged as the IPv4 address it carries, and an
        # allow-list may name either form.
        forms: list[IpAddress] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            forms.append(addr.ipv4_mapped)
        if any(a in net for a in forms for net in self.allow):
            return None
        why = _why_refused(forms[-1])
        return None if why is None else f"{ip} is a {why} address"

    async def check_url(self, url: str, *, resolve: bool = True) -> None:
        """InvalidInput `webhook_url_not_allowed` when the URL's host is, or resolves to, a
        refused address. A name that does not resolve now passes: it is checked again at send."""
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
        except ValueError:
            return                      # malformed: the batch store's validation says so
        if parts.scheme not in ("http", "https"):
            return                      # not a webhook URL at all: likewise
        try:
            addresses = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
        except ValueError:
            if not resolve:
                return
            try:
                infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                    host, None, type=socket.SOCK_STREAM), _RESOLVE_TIMEOUT_S)
            except (OSError, TimeoutError):
                return
            addresses = [str(info[4][0]) for info in infos]
        for ip in addresses:
            why = self.refusal(ip)
            if why is not None:
                raise InvalidInput(f"webhook_url {host!r} is not allowed: {why} (list it in "
                                   "auth.webhook_allow_cidrs to allow it)",
                                   code="webhook_url_not_allowed", param="webhook_url")

    def resolver(self) -> Any:
        """An aiohttp resolver that refuses names resolving to refused addresses."""
        from aiohttp.resolver import ThreadedResolver

        policy = self

        class GuardedResolver(ThreadedResolver):
            async def resolve(self, host: str, port: int = 0,
                              family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
                results = await super().resolve(host, port, family)
                for result in results:
                    why = policy.refusal(result["host"])
                    if why is not None:
                        raise DestinationRefused(f"webhook destination {host!r} refused: {why}")
                return results

        return GuardedResolver()
