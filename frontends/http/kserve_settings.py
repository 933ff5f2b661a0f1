"""Triton's logging and trace extensions: `/v2/logging` and `/v2/[models/{model}/]trace/setting`.

Logging is real: Ferry logs by threshold (Python's levels), so Triton's switches map onto one
daemon-wide level that the supervisor sets in every process (daemon/control.py `log_level`):

    log_verbose_level > 0 → debug    log_info → info    log_warnings → warning
    log_errors → error               none of them → critical

Switch combinations a threshold cannot express (warnings off but info on), a log file (Ferry logs to stderr, i.e. journald) and another log format are refused with 400
`log_setting_unsupported`; malformed settings with 400 `invalid_log_setting`.

Tracing is not something Ferry does: the settings read as Triton's with tracing off, and a
request to turn it on (or tune it) is refused with 400 `trace_unsupported`.
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from daemon.errors import InvalidInput
from daemon.logs import JsonFormatter
from frontends.http.appkeys import DISPATCHER
from frontends.http.json_body import decode_json

__all__ = ["get_logging", "set_logging", "get_trace", "set_trace", "log_settings",
           "level_for"]

_FLAGS = ("log_info", "log_warnings", "log_errors")
_LOG_KEYS = ("log_file", *_FLAGS, "log_verbose_level", "log_format")
_TRACE_OFF = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
              "log_frequency": "0", "trace_file": "", "trace_mode": "triton"}


def _unsupported(message: str, param: str) -> InvalidInput:
    return InvalidInput(message, code="log_setting_unsupported", param=param)


def log_settings(level: str, log_format: str) -> dict[str, Any]:
    """Triton's `$log_setting_response` for a Ferry log level."""
    order = ("debug", "info", "warning", "error", "critical")
    rank = order.index(level) if level in order else 1
    return {"log_file": "", "log_info": rank <= 1, "log_warnings": rank <= 2,
            "log_errors": rank <= 3, "log_verbose_level": 1 if rank == 0 else 0,
            "log_format": log_format}


def level_for(settings: dict[str, Any]) -> str:
    """The one threshold that gives Triton's switches; refuses what a threshold cannot do."""
    info, warnings, errors = (settings[k] for k in _FLAGS)
    verbose = settings["log_verbose_level"]
    for lower, higher in (("log_info", "log_warnings"), ("log_warnings", "log_errors")):
        if settings[lower] and not settings[higher]:
            raise _unsupported(f"Ferry logs by threshold: {higher} cannot be off while "
                               f"{lower} is on", higher)
    if verbose > 0 and not info:
        raise _unsupported("Ferry logs by threshold: verbose messages need log_info on",
                           "log_verbose_level")
    if verbose > 0:
        return "debug"
    return "info" if info else "warning" if warnings else "error" if errors else "critical"


def _check(key: str, value: Any) -> None:
    if key in _FLAGS and not isinstance(value, bool):
        raise InvalidInput(f"{key} must be a boolean", code="invalid_log_setting", param=key)
    if key == "log_verbose_level" and (not isinstance(value, int) or isinstance(value, bool)
                                       or not 0 <= value < 2**32):
        raise InvalidInput("log_verbose_level must be an integer >= 0",
                           code="invalid_log_setting", param=key)
    if key in ("log_file", "log_format") and not isinstance(value, str):
        raise InvalidInput(f"{key} must be a string", code="invalid_log_setting", param=key)


async def _object(request: web.Request) -> dict[str, Any]:
    body = decode_json(await request.read())
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", code="invalid_json")
    return body


def _format() -> str:
    """The format this daemon logs in ("json" or "text"), as the supervisor set it."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


async def get_logging(request: web.Request) -> web.Response:
    level = (await request.app[DISPATCHER].control("log_level", timeout_s=10.0))["level"]
    return web.json_response(log_settings(level, _format()))


async def set_logging(request: web.Request) -> web.Response:
    body = await _object(request)
    d = request.app[DISPATCHER]
    current = log_settings((await d.control("log_level", timeout_s=10.0))["level"],
                           _format())
    for key, value in body.items():
        if key not in _LOG_KEYS:
            raise InvalidInput(f"unknown log setting {key!r}; the settings are "
                               f"{list(_LOG_KEYS)}", code="invalid_log_setting", param=key)
        _check(key, value)
    if body.get("log_file", ""):
        raise _unsupported("Ferry logs to stderr (journald under systemd); log_file must be "
                           "\"\"", "log_file")
    if body.get("log_format", current["log_format"]) != current["log_format"]:
        raise _unsupported(f"the log format is {current['log_format']!r} (logging.format in "
                           "ferry.toml) and cannot change at run time", "log_format")
    level = level_for({**current, **body})
    await d.control("log_level", {"level": level}, timeout_s=30.0)
    return web.json_response(log_settings(level, current["log_format"]))


async def get_trace(request: web.Request) -> web.Response:
    model = request.match_info.get("model")
    if model is not None:
        request.app[DISPATCHER].resolve(model)        # unknown model: its 404
    return web.json_response(_TRACE_OFF)


async def set_trace(request: web.Request) -> web.Response:
    model = request.match_info.get("model")
    if model is not None:
        request.app[DISPATCHER].resolve(model)
    body = await _object(request)
    for key, value in body.items():
        if key not in _TRACE_OFF:
            raise InvalidInput(f"unknown trace setting {key!r}; the settings are "
                               f"{list(_TRACE_OFF)}", code="invalid_trace_setting", param=key)
        if value is not None and value != _TRACE_OFF[key]:
            raise InvalidInput(f"Ferry does not trace requests: {key} cannot be set to "
                               f"{value!r} (only trace_level [\"OFF\"] is accepted)",
                               code="trace_unsupported", param=key)
    return web.json_response(_TRACE_OFF)
