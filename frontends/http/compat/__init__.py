"""The seeds' own APIs (../shared/seeds/), served as thin layers over Ferry's routes.

Each seed module lists its routes (`ROUTES`) and may give its error shape (`error_body`).
`setup(app)` mounts every seed under /compat/<seed>/ and, at the root, each path only one seed
claims. Paths several claim are decided per request:

    POST /infer     by body shape: "text" is the AI Inference Backend's, "prompt" / "model_id"
                    the AI Inference API's; a body with neither (or over 1 MiB, or without
                    a Content-Length: it is read before auth) goes to [compat] root, else to
                    the backend (whose validation names the field it needs)
    GET  /models    [compat] root when it names backend or inferno, else Inferno's
    GET  /health    Ferry's own (vLLM's probe, 200/503) unless [compat] root names a seed with
                    one (backend, api, inferno): Ferry's route still runs first (its policy,
                    its readiness), then the seed's body answers
    GET  /v1/models, /v1/models/{model}
                    OpenAI's, unless [compat] root = "api" (then the AI Inference API's shape)

Auth, limits and the request log are the security layer's: a seed route has the policy of the
Ferry route it serves (security.POLICY_ALIASES), else the default `infer` one. Cinfer's
X-Access-Token / X-Auth-Token headers are read as the bearer credential on its routes. Errors
keep their Ferry status and stable code and take the seed's documented body where it has one.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from daemon.config import COMPAT_SEEDS
from daemon.errors import FerryError, RateLimited
from frontends.http.appkeys import request_key
from frontends.http.errors import error_body, request_id_of
from frontends.http.json_body import decode_json
from frontends.http.security import POLICY_ALIASES
from frontends.http.compat.text import compat_setting

__all__ = ["Route", "SEEDS", "FERRY_OWNED", "setup", "mounted", "prefix", "render_error",
           "compat_setting", "utc_now"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SEEDS = COMPAT_SEEDS          # one module each: frontends/http/compat/<seed>.py
_PRECEDENCE = ("inferno", "backend", "api", "cinfer", "gateway")
_SEED = request_key("ferry_compat_seed", str)
_TABLE: web.AppKey[dict[str, str]] = web.AppKey("compat_seed_of", dict)
_OVERRIDES: web.AppKey[dict[tuple[str, str], dict[str, Handler]]] = \
    web.AppKey("compat_overrides", dict)
# Ferry's own routes that seeds claim too: Ferry keeps them unless [compat] root names the seed.
FERRY_OWNED = frozenset({("GET", "/health"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/{model}")})
_CONTESTED: web.AppKey[dict[tuple[str, str], dict[str, Route]]] = \
    web.AppKey("compat_contested", dict)
_AIOHTTP_CODES = {400: "bad_request", 404: "route_not_found", 405: "method_not_allowed",
                  413: "payload_too_large", 415: "unsupported_media_type"}   # as errors.py
_SHAPE_BYTES = 1 << 20        # bodies read before auth to learn their shape (larger: no shape)
_CINFER_HEADERS = ("X-Access-Token", "X-Auth-Token")


@dataclass(slots=True, frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    ferry: str = ""          # the Ferry route whose policy it has; "": the default (infer)


def prefix(seed: str) -> str:
    return f"/compat/{seed}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _module(seed: str) -> Any:
    return importlib.import_module(f"frontends.http.compat.{seed}")


def _claims() -> dict[tuple[str, str], dict[str, Route]]:
    claims: dict[tuple[str, str], dict[str, Route]] = {}
    for seed in SEEDS:
        for route in _module(seed).ROUTES:
            claims.setdefault((route.method, route.path), {})[seed] = route
    return claims


def mounted() -> list[tuple[tuple[str, ...], str, str]]:
    """(claiming seeds, method, path) of the seed routes mounted at the root (the OpenAPI
    document lists these); Ferry-owned paths are not among them (see FERRY_OWNED)."""
    return [(tuple(by_seed), method, path) for (method, path), by_seed in _claims().items()
            if (method, path) not in FERRY_OWNED]


def setup(app: web.Application) -> None:
    aliases: dict[str, str] = {}
    table: dict[str, str] = {}
    overrides: dict[tuple[str, str], dict[str, Handler]] = {}
    contested: dict[tuple[str, str], dict[str, Route]] = {}
    app[POLICY_ALIASES], app[_TABLE], app[_OVERRIDES], app[_CONTESTED] = \
        aliases, table, overrides, contested
    claims = _claims()
    for (method, path), by_seed in claims.items():
        for seed, route in by_seed.items():
            full = prefix(seed) + path
            app.router.add_route(method, full, route.handler)
            table[full] = seed
            if route.ferry:
                aliases[f"{method} {full}"] = route.ferry
    for (method, path), by_seed in claims.items():
        if (method, path) in FERRY_OWNED:
            overrides[(method, path)] = {s: r.handler for s, r in by_seed.items()}
        elif len(by_seed) == 1:
            seed, route = next(iter(by_seed.items()))
            app.router.add_route(method, path, route.handler)
            table[path] = seed
            if route.ferry:
                aliases[f"{method} {path}"] = route.ferry
        else:
            app.router.add_route(method, path, _contested(by_seed))
            contested[(method, path)] = by_seed
    app.middlewares.append(compat_middleware)


def _contested(by_seed: dict[str, Route]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        seed = request.get(_SEED) or await _choose(request, by_seed)   # the middleware chose
        return await by_seed[seed].handler(request)
    return handler


async def _choose(request: web.Request, by_seed: dict[str, Route]) -> str:
    size = request.content_length
    if request.method == "POST" and "backend" in by_seed and "api" in by_seed \
            and size is not None and size <= _SHAPE_BYTES:
        try:
            body = decode_json(await request.read())
        except FerryError:
            body = None
        if isinstance(body, dict):
            if "text" in body:
                return "backend"
            if "prompt" in body or "model_id" in body:
                return "api"
    root = compat_setting(request, "root")
    if root in by_seed:
        return root
    return next(s for s in _PRECEDENCE if s in by_seed)


# -- the middleware -----------------------------------------------------------------------------

def _seed_of(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return request.app[_TABLE].get(resource.canonical)


def _override(request: web.Request) -> tuple[str, Handler] | None:
    """A Ferry-owned path that [compat] root hands to a seed: (seed, its handler)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    by_seed = request.app[_OVERRIDES].get((request.method, resource.canonical))
    if not by_seed:
        return None
    root = compat_setting(request, "root")
    return (root, by_seed[root]) if root in by_seed else None


def _with_credentials(request: web.Request) -> web.Request:
    """Cinfer's token headers as the bearer credential, when no Ferry credential is given."""
    if "Authorization" in request.headers or "X-API-Key" in request.headers:
        return request
    for name in _CINFER_HEADERS:
        token = request.headers.get(name)
        if token:
            headers = request.headers.copy()
            headers["Authorization"] = f"Bearer {token.strip()}"
            return request.clone(headers=headers)
    return request


@web.middleware
async def compat_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    seed = _seed_of(request)
    override = None if seed is not None else _override(request)
    contested = _contested_claims(request) if seed is None and override is None else None
    if seed is None and override is None and contested is None:
        return await handler(request)
    if seed == "cinfer":
        request = _with_credentials(request)
    if contested is not None:
        seed = request[_SEED] = await _choose(request, contested)
    try:
        resp = await handler(request)
        if override is not None and (resp.status < 400 or resp.status == 503):
            seed = override[0]
            resp = await override[1](request)
    except FerryError as exc:
        return render_error(seed or (override[0] if override else None), request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "http_error")
        return render_error(seed or (override[0] if override else None), request,
                            FerryError(exc.reason, code=code, status=exc.status))
    if resp.status == 429 and not resp.prepared:    # the security layer's rate-limit answer
        return _rate_limited(seed, request, resp)
    return resp


def _contested_claims(request: web.Request) -> dict[str, Route] | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return request.app[_CONTESTED].get((request.method, resource.canonical))


def render_error(seed: str | None, request: web.Request, exc: FerryError) -> web.Response:
    """The seed's error body for `exc` (status and stable code as Ferry's)."""
    rid = request_id_of(request)
    body = error_body(exc.status, exc.code, exc.message, rid, exc.param)
    shaper = getattr(_module(seed), "error_body", None) if seed in SEEDS else None
    if shaper is not None:
        body = shaper(request, exc, body)
    resp = web.json_response(body, status=exc.status)
    resp.headers["X-Request-ID"] = rid
    if isinstance(exc, RateLimited):
        resp.headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    headers = getattr(exc, "headers", None)
    if isinstance(headers, dict):
        resp.headers.update(headers)
    return resp


def _rate_limited(seed: str | None, request: web.Request, resp: web.StreamResponse
                  ) -> web.StreamResponse:
    raw = getattr(resp, "body", None)
    try:
        err = json.loads(raw)["error"] if isinstance(raw, bytes) else None
    except (ValueError, KeyError, TypeError):
        err = None
    if not isinstance(err, dict) or seed not in SEEDS:
        return resp
    retry = int(resp.headers.get("Retry-After", "1"))
    exc = RateLimited(str(err.get("message", "rate limited")), code=str(err.get("code")),
                      retry_after=retry)
    out = render_error(seed, request, exc)
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                 "X-RateLimit-Reset-After", "Retry-After"):
        if name in resp.headers:
            out.headers[name] = resp.headers[name]
    return out
