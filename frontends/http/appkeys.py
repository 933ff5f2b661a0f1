"""Typed application state shared by the HTTP route modules."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from frontends.dispatch import Dispatcher

__all__ = ["FrontendSettings", "DISPATCHER", "SETTINGS"]


@dataclass(slots=True)
class FrontendSettings:
    worker: int
    max_body: int
    request_timeout_s: float
    inline_threshold: int


DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SETTINGS = web.AppKey("settings", FrontendSettings)
