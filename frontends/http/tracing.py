"""Request tracing in the HTTP frontend: W3C `traceparent` in and out, `GET /traces`.

Every request but probes and scrapes gets a server span named `METHOD /route/template`. A valid
`traceparent` from the client (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, W3C
Trace Context) makes it a child of the caller's span; an absent or malformed one starts a new
trace, as the W3C recommendation says (a bad header is never an error); one whose sampled flag is
0 is continued but not recorded. The response carries `traceparent` with the trace id and this
server span's id, streams and errors included, so a client can look its request up. Code inside
a request opens child spans with `with span("name", key=value):` (prompt-template rendering
does); the dispatcher adds `ferry.dispatch` and the engine's spans under it (frontends/spans.py,
which also buffers and writes them). `[tracing] enabled = false` turns all of it off.

Spans are written every half second, in one transaction, to the state database's bounded ring
(daemon/state/spans.py, the newest `[tracing] buffer_spans`), so `GET /traces` on any worker
shows every worker's spans and the ZMQ frontend's; a worker's own spans are written before it
answers. With `[tracing] otlp_endpoint` set, each process also sends the same batches to that
collector over OTLP/HTTP (frontends/http/otlp.py). `GET /traces` (admin scope) answers in
Inferno's shape:

    {"traces": [{"trace_id", "span_id", "parent_span_id", "operation_name", "start_time",
                 "duration_ms", "status": "ok"|"error", "attributes": {...}}, ...]}

newest first; `?limit=` (1-1000, default 100) and `?trace_id=` (32 hex) narrow it. A span's
status is "error" for a 5xx answer or a client that went away, as OpenTelemetry marks server
spans.
"""
from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from daemon.errors import FerryError, InvalidInput
from daemon.state.db import Database
from daemon.state.spans import SpanStore
from frontends.http.appkeys import ACCESS, DISPATCHER, SETTINGS, request_key
from frontends.http.errors import request_id_of
from frontends.spans import ServerSpan, Tracer, parse_traceparent, run_flusher, span

__all__ = ["setup", "configure", "span", "parse_traceparent", "Tracer", "TRACER"]

_UNTRACED = frozenset({"/metrics", "/healthz", "/readyz", "/health", "/v2/health/live",
                       "/v2/health/ready", "/traces", "/openapi.json"})
_MAX_LIMIT = 1000
_SPAN = request_key("ferry_trace_span", ServerSpan)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TRACER: web.AppKey[Tracer] = web.AppKey("tracer", Tracer)


def setup(app: web.Application) -> None:
    worker = app[SETTINGS].worker if SETTINGS in app else 0
    app[TRACER] = Tracer(f"http{worker}")
    app.middlewares.insert(0, tracing_middleware)    # outermost: errors are already answers
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/traces", traces_view)
    app.cleanup_ctx.append(_flusher)
    if DISPATCHER in app:   # [tracing] arrives with the placement config (and on SIGHUP)
        dispatcher = app[DISPATCHER]
        dispatcher.config_listeners.append(lambda config: configure(app, config))
        if dispatcher.placement is not None:
            configure(app, dispatcher.placement.config)


def configure(app: web.Application, config: dict[str, Any]) -> None:
    app[TRACER].configure(config)


def _db(app: web.Application) -> Database | None:
    access = app.get(ACCESS)
    return access.state.db if access is not None else None


async def _flusher(app: web.Application):
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        run_flusher(app[TRACER], lambda: _db(app), stop), name="trace-flush")
    yield
    stop.set()
    await asyncio.gather(task, return_exceptions=True)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    tracer = request.app[TRACER]
    route = _route(request)
    if not tracer.enabled or route in _UNTRACED:
        return await handler(request)
    server = request[_SPAN] = ServerSpan(tracer, request.headers.get("traceparent"),
                                         f"{request.method} {route}")
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        server.end(status >= 500 or status == 499, **{
            "http.request.method": request.method, "http.route": route,
            "http.response.status_code": status, "ferry.request_id": request_id_of(request),
            "ferry.worker": request.app[SETTINGS].worker if SETTINGS in request.app else 0})


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    server = request.get(_SPAN)
    if server is not None:
        response.headers["traceparent"] = server.traceparent


# -- GET /traces --------------------------------------------------------------------------------

def _query(query: Any) -> tuple[int, str | None]:
    unknown = set(query) - {"limit", "trace_id"}
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; expected "
                           "['limit', 'trace_id']", code="unknown_parameter",
                           param=sorted(unknown)[0])
    raw = query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw[:5]) <= _MAX_LIMIT \
            or len(raw) > 5:
        raise InvalidInput(f"limit must be an integer from 1 to {_MAX_LIMIT}",
                           code="invalid_parameter", param="limit")
    trace_id = query.get("trace_id")
    if trace_id is not None and not re.fullmatch(r"[0-9a-f]{32}", trace_id):
        raise InvalidInput("trace_id must be 32 lowercase hex digits", code="invalid_parameter",
                           param="trace_id")
    return int(raw), trace_id


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


async def traces_view(request: web.Request) -> web.Response:
    limit, trace_id = _query(request.query)
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    await request.app[TRACER].flush(access.state.db)
    spans = await SpanStore(access.state.db).recent(limit, trace_id)
    return web.json_response({"traces": [
        {"trace_id": s.trace_id, "span_id": s.span_id, "parent_span_id": s.parent_span_id,
         "operation_name": s.name, "start_time": _iso(s.start),
         "duration_ms": round(s.duration_ms, 3), "status": s.status,
         "attributes": s.attributes} for s in spans]})
