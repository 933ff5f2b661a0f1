"""Typed application and request state shared by the HTTP route modules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from frontends.access import Access
from frontends.dispatch import Dispatcher

__all__ = ["FrontendSettings", "ACCESS", "DISPATCHER", "SETTINGS", "ON_DRAIN", "request_key"]


@dataclass(slots=True)
class FrontendSettings:
    worker: int
    max_body: int
    request_timeout_s: float
    inline_threshold: int
    body_timeout_s: float = 120.0


ACCESS = web.AppKey("access", Access)       # the worker's credentials, limits and request log
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SETTINGS = web.AppKey("settings", FrontendSettings)
# Called (no arguments) the moment the worker starts draining, before aiohttp's shutdown: for
# background work that must stop taking new work at once (the batch runner's claims).
ON_DRAIN = web.AppKey("on_drain", list)


def request_key(name: str, kind: type) -> Any:
    """A typed request-storage key where aiohttp has them (3.12+; plain strings there warn),
    else the name."""
    factory = getattr(web, "RequestKey", None)
    return factory(name, kind) if factory is not None else name
