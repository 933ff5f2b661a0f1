"""The HTTP frontend's security layer: one aiohttp middleware, installed by `install(app, args)`.

For every request, in this order:

1. CORS preflight (`OPTIONS` with `Origin`), answered here when `server.cors_origins` is set;
   otherwise CORS is off and no CORS header is ever sent.
2. The route's policy (below), from the route aiohttp matched, not from the raw path.
3. Authentication (`Authorization: Bearer <key or JWT>` or `X-API-Key`), scope and, where the
   route names a model, the key's model allow-list. 401/403 with stable codes (daemon.auth).
4. Rate limits: a concurrency slot and a request from the key's buckets, or 429 with
   `Retry-After`; every response to a limited key carries `X-RateLimit-Limit/Remaining/Reset`.
5. The handler. A generation reserves its prompt plus max_tokens from the key's tokens per
   minute before it starts (429 `token_rate_limited` when they are not there; see
   textgen.TOKEN_RESERVER); the reservation is settled to the tokens it really used (streamed
   or not, and per WebSocket request), and one request-log row is appended (request id, key,
   model, route, status, code, total time, token counts; the body only with
   `logging.log_bodies`, and never for /admin or /v1/batches, whose bodies carry passwords and
   webhook secrets). Batch items are charged to the submitting key as they run
   (Access.batch_item), WebSocket messages by `admit_ws`, ZMQ requests by frontends/zmq.

Route policies (scope needed; "open" needs none):

    open   GET /healthz, /readyz, /health, /v2/health/live|ready, /metrics, /v2 (server metadata),
           /openapi.json: probes, scrapers and API tooling carry no keys; they expose states,
           counters and the API's description, no data.
           POST /admin/login (its own per-address throttle).
    admin  /admin/*, /metrics/custom* (client-defined metrics every scraper sees) and /traces
           (recent requests' spans), always, even with auth.required = false; /v2/repository/*,
           /v2/systemsharedmemory/*, /v2/cudasharedmemory/* (mapping a segment by name is a
           host-level power, not an inference right), /v2/logging, /v2/trace/setting.
    infer  /v2/models/{model}/... (infer, metadata, config, ready, stats, and the per-model
           trace/setting, which can only ever read "off"), /v1/* (a `{model}` in
           the route, else the `model` of a JSON body, is checked against the key's list
           before the handler runs; `authorize_model` is for routes that learn it later,
           like the items of a batch), /v1/ws (the
           socket authenticates with its first `auth` message or the upgrade's headers, via
           `authenticate_ws`), /v1/batches (every item's model is checked on submission),
           and any route not listed (an unknown path answers 401 before 404).

A seed-compatibility route (frontends/http/compat) has the policy of the Ferry route it serves,
named in `app[POLICY_ALIASES]` (e.g. Inferno's /ws is /v1/ws, Cinfer's /api/v1/internal/tokens
is /admin/tokens).

The client address is the TCP peer: `X-Forwarded-For` is not trusted.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from daemon.auth import Principal, credential_from_headers
from daemon.errors import FerryError, Forbidden, InvalidInput, RateLimited, Unauthorized
from frontends.access import Access, AccessSettings, Admission
from frontends.http.appkeys import ACCESS, DISPATCHER, SETTINGS, request_key
from frontends.http.errors import error_body, error_response, request_id_of
from frontends.http.json_body import decode_json
from frontends.http.textgen import TOKEN_RESERVER, USAGE

__all__ = ["ACCESS", "POLICY_ALIASES", "Policy", "policy_for", "install", "security_middleware",
           "authorize_model", "authenticate_ws", "admit_ws", "principal_of", "client_ip"]

log = logging.getLogger(__name__)

# "METHOD pattern" -> the Ferry route pattern whose policy it has (frontends/http/compat: a
# seed's route gets the scope, model check and body logging of the Ferry route it serves).
POLICY_ALIASES: web.AppKey[dict[str, str]] = web.AppKey("policy_aliases", dict)
_CORS: web.AppKey[frozenset[str]] = web.AppKey("cors_origins", frozenset)


_ADMISSION = request_key("ferry_admission", Admission)
_PRINCIPAL = request_key("ferry_principal", Principal)
_CORS_ORIGIN = request_key("ferry_cors_origin", str)
_MODEL = request_key("ferry_model", str)
_OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/health", "/v2/health/live",
                          "/v2/health/ready", "/metrics", "/v2", "/openapi.json",
                          "/get_load"})     # a router's load poll: what /metrics shows anyway
_ADMIN_PREFIXES = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory",
                   "/v2/logging", "/v2/trace")
_ADMIN_ALWAYS = ("/metrics/custom", "/traces")     # what every scraper sees; recent requests
_NO_BODY_LOG = ("/admin", "/v1/batches")
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = ("Authorization, Content-Type, X-API-Key, X-Request-ID, "
                 "Inference-Header-Content-Length")
_CORS_EXPOSE = ("X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
                "Retry-After")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True, frozen=True)
class Policy:
    scope: str | None                  # None: open route
    always: bool = False               # authenticate even when auth.required is false
    model_in: str = ""                 # "path" | "body" | ""
    websocket: bool = False
    logged: bool = True                # probes and scrapes stay out of the request log


_OPEN = Policy(None, logged=False)


def _pattern(request: web.Request) -> str:
    """The matched route's pattern, or that of the Ferry route it aliases (POLICY_ALIASES)."""
    resource = request.match_info.route.resource
    pattern = resource.canonical if resource is not None else request.path
    apps = request.match_info.apps      # the app that matched (none on a bare test request)
    aliases = apps[-1].get(POLICY_ALIASES) if apps else None
    return aliases.get(f"{request.method} {pattern}", pattern) if aliases else pattern


def policy_for(request: web.Request) -> Policy:
    """The policy of the route aiohttp matched (its pattern, e.g. /v2/models/{model}/infer)."""
    pattern = _pattern(request)
    method = request.method
    if pattern in _OPEN_ROUTES and method in ("GET", "HEAD"):
        return _OPEN
    if pattern == "/admin/login":
        return Policy(None)
    if pattern == "/admin" or pattern.startswith("/admin/"):
        return Policy("admin", always=True)
    if pattern.startswith(_ADMIN_PREFIXES):
        return Policy("admin")
    if pattern.startswith(_ADMIN_ALWAYS):
        return Policy("admin", always=True)
    if pattern.startswith("/v2/models/"):
        return Policy("infer", model_in="path")
    if pattern == "/v1/ws":
        return Policy("infer", websocket=True)
    if method == "POST" and pattern.startswith("/v1/") and not pattern.startswith("/v1/batches"):
        return Policy("infer", model_in="body")
    return Policy("infer")


def client_ip(request: web.Request) -> str | None:
    """The TCP peer's address; None for a Unix socket (guarded by file permissions)."""
    return request.remote or None


def principal_of(request: web.Request) -> Principal | None:
    return request.get(_PRINCIPAL)


def _access(request: web.Request) -> Access:
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the security layer is not running", code="security_unavailable",
                         status=503)
    return access


def _canonical_model(request: web.Request, model: str) -> str:
    """The model's name for allow-list checks: a SHA-256 id or `name:version` maps to name."""
    dispatcher = request.app.get(DISPATCHER)
    if dispatcher is not None:
        try:
            return dispatcher.resolve(model)[0]
        except FerryError:
            pass
    base, sep, version = model.rpartition(":")
    return base if sep and version.isdigit() else model


def authorize_model(request: web.Request, model: str) -> None:
    """Forbidden `model_not_allowed` unless the request's caller may use `model`.

    For routes that learn the model after the middleware ran (multipart uploads, batches).
    """
    principal = principal_of(request)
    if principal is None or not isinstance(model, str):
        return
    name = _canonical_model(request, model)
    if not (principal.may_use(name) and principal.may_use(model)):
        raise Forbidden(f"credential {principal.id} may not use model {model!r}",
                        code="model_not_allowed", param="model")


async def authenticate_ws(request: web.Request, token: str | None) -> Principal:
    """frontends/http/ws.py's hook: `token` from an `auth` message, or None at connect (then
    the upgrade request's headers). Raises Unauthorized (or Forbidden) to refuse."""
    access = _access(request)
    if token is None:
        credential = credential_from_headers(request.headers)
        try:
            return await access.authenticate(credential, client_ip(request), "infer")
        except Forbidden as exc:
            # ws.py lets an `auth` message follow a refused connect; it waits for Unauthorized.
            raise Unauthorized(exc.message, code=exc.code) from None
    return await access.authenticate(token, client_ip(request), "infer")


def admit_ws(request: web.Request, principal: Principal | None) -> Callable[[], None] | None:
    """ws.py's WS_ADMIT hook: each inference message counts as a request against the key's
    limits (RateLimited otherwise) and its generation reserves its tokens (the message's task,
    created next, inherits the reserver); returns `done(tokens)`, which releases its
    concurrency slot and settles the reservation to the tokens it used."""
    if principal is None:
        return None
    access = _access(request)
    admission = access.admit(principal)
    TOKEN_RESERVER.set(_reserver(access, admission))

    def done(tokens: int = 0) -> None:
        access.release(admission)
        access.settle(admission, tokens)
    return done


def _reserver(access: Access, admission: Admission) -> Callable[[int], Awaitable[None]]:
    async def reserve(tokens: int) -> None:
        access.reserve(admission, tokens)
    return reserve


# -- CORS ---------------------------------------------------------------------------------------

def _cors_origin(request: web.Request) -> str | None:
    """The value for Access-Control-Allow-Origin, or None (CORS off or origin not allowed)."""
    origins = request.app.get(_CORS)
    origin = request.headers.get("Origin")
    if not origins or origin is None:
        return None
    if origin in origins:
        return origin
    return "*" if "*" in origins else None


def _preflight(request: web.Request) -> web.Response | None:
    if request.method != "OPTIONS" or not request.app.get(_CORS) \
            or "Access-Control-Request-Method" not in request.headers:
        return None
    origin = _cors_origin(request)
    if origin is None:
        return error_response(request, Forbidden("origin is not allowed",
                                                 code="cors_origin_not_allowed"))
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": _CORS_METHODS,
        "Access-Control-Allow-Headers": _CORS_HEADERS, "Access-Control-Max-Age": "600",
        "Vary": "Origin"})


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response gets, streaming and error responses included."""
    admission: Admission | None = request.get(_ADMISSION)
    if admission is not None:
        response.headers.update(admission.headers())
    origin = request.get(_CORS_ORIGIN)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE
        response.headers.add("Vary", "Origin")


# -- the middleware -----------------------------------------------------------------------------

async def _body_model(request: web.Request) -> str | None:
    """The `model` of a JSON body (read once; aiohttp keeps it for the handler). Whatever
    Content-Type claims: a handler lenient about it must not be a way around the check."""
    if not request.can_read_body or request.content_type.startswith("multipart/"):
        return None
    try:
        body = decode_json(await request.read())
    except InvalidInput:
        return None               # the handler answers the malformed body
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


async def _admit(request: web.Request, access: Access, policy: Policy) -> None:
    """Authenticate, authorize and rate-limit; on success the request holds an Admission."""
    ip = client_ip(request)
    if policy.scope is None or policy.websocket:
        # Open routes and the socket upgrade (it authenticates inside, see authenticate_ws).
        await access.check_ip(ip)
        return
    principal = await access.authenticate(credential_from_headers(request.headers), ip,
                                          policy.scope, always=policy.always)
    request[_PRINCIPAL] = principal
    # A {model} in the route pattern (KServe, /v1/models/{model}/predict, …) decides; else a
    # JSON body's "model".
    model = request.match_info.get("model")
    if model is None and policy.model_in == "body":
        model = await _body_model(request)
    if model is not None:
        request[_MODEL] = model
        authorize_model(request, model)
    request[_ADMISSION] = access.admit(principal)


def _rate_limited(request: web.Request, exc: RateLimited) -> web.Response:
    """429 in the route's error shape, `retry_after` in the body too, and the key's
    X-RateLimit-* headers (Remaining 0)."""
    resp = error_response(request, exc)
    resp.headers.update(getattr(exc, "headers", {}))
    if not request.path.startswith("/v2"):
        body = error_body(exc.status, exc.code, exc.message, request_id_of(request))
        body["error"]["retry_after"] = int(resp.headers["Retry-After"])
        resp.text = json.dumps(body)
    return resp


def _usage(resp: web.StreamResponse) -> dict[str, Any] | None:
    """`usage` of a finished OpenAI-style JSON response, read from the tail of the body."""
    body = getattr(resp, "body", None)
    if not isinstance(body, bytes) or resp.content_type != "application/json":
        return None
    at = body.rfind(b'"usage":')
    if at < 0:
        return None
    start = body.find(b"{", at)
    try:
        usage, _ = json.JSONDecoder().raw_decode(body[start:].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return usage if isinstance(usage, dict) else None


@dataclass(slots=True)
class _Outcome:
    status: int = 500
    code: str | None = None
    resp: web.StreamResponse | None = None
    body: bytes | None = None


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    preflight = _preflight(request)
    if preflight is not None:
        return preflight
    origin = _cors_origin(request)
    if origin is not None:
        request[_CORS_ORIGIN] = origin
    access = request.app.get(ACCESS)
    if access is None:         # the app runs without the security layer (unit tests)
        return await handler(request)
    policy = policy_for(request)
    started = time.monotonic()
    out = _Outcome()
    try:
        return await _guarded(request, handler, access, policy, out)
    finally:
        admission = request.get(_ADMISSION)
        if admission is not None:
            access.release(admission)
        if policy.logged:
            _record(request, access, out, started)


async def _guarded(request: web.Request, handler: Handler, access: Access, policy: Policy,
                   out: _Outcome) -> web.StreamResponse:
    """Checks, then the handler. Errors other than 429 are mapped by errors.py, outside."""
    try:
        await _admit(request, access, policy)
        out.body = await _loggable_body(request, access, policy)
        admission = request.get(_ADMISSION)
        reserver = TOKEN_RESERVER.set(None if admission is None
                                      else _reserver(access, admission))
        try:
            resp = await handler(request)
        finally:
            TOKEN_RESERVER.reset(reserver)
    except RateLimited as exc:
        resp = _rate_limited(request, exc)
        out.code = exc.code
    except FerryError as exc:
        out.status, out.code = exc.status, exc.code
        raise
    except web.HTTPException as exc:
        out.status = exc.status
        raise
    out.status, out.resp = resp.status, resp
    return resp


async def _loggable_body(request: web.Request, access: Access, policy: Policy) -> bytes | None:
    if not access.settings.log_bodies or request.method != "POST" \
            or _pattern(request).startswith(_NO_BODY_LOG) or policy.websocket:
        return None
    return await request.read()


def _record(request: web.Request, access: Access, out: _Outcome, started: float) -> None:
    principal = principal_of(request)
    prompt, completion = _usage_of(request, out)
    admission = request.get(_ADMISSION)
    if admission is not None:
        access.settle(admission, (prompt or 0) + (completion or 0))
    code = out.code
    if code is None and out.resp is not None and out.status >= 400:
        code = _error_code(out.resp)
    resource = request.match_info.route.resource
    route = f"{request.method} {resource.canonical if resource is not None else request.path}"
    access.record(request_id_of(request), principal=principal, model=request.get(_MODEL),
                  route=route, status=out.status, code=code,
                  total_ms=(time.monotonic() - started) * 1000.0, prompt_tokens=prompt,
                  completion_tokens=completion, body=out.body)


def _usage_of(request: web.Request, out: _Outcome) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens: generation routes leave their live Usage on the request
    (streams, and responses cut short by an error, spent tokens too); other /v1 routes report
    `usage` in their JSON body (embeddings)."""
    live = request.get(USAGE)
    if live is not None:
        return live.prompt_tokens, live.completion_tokens
    usage = (_usage(out.resp) if out.resp is not None and out.status < 400
             and _pattern(request).startswith("/v1/") else None)   # aliases too (/embeddings)
    if usage is None:
        return None, None
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_code(resp: web.StreamResponse) -> str | None:
    """The stable code of an error response built by frontends/http/errors.py."""
    body = getattr(resp, "body", None)
    if not isinstance(body, bytes) or len(body) > 65536:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error")
    found = err.get("code") if isinstance(err, dict) else parsed.get("code")
    return found if isinstance(found, str) else None


# -- installation -------------------------------------------------------------------------------

def install(app: web.Application, args: dict[str, Any]) -> None:
    """Add the security layer to `app` (before the app starts), from the frontend arguments:
    `state_dir`, `auth`, `cors_origins`, `log_bodies`, and the runtime directory."""
    worker = app[SETTINGS].worker if SETTINGS in app else 0
    settings = AccessSettings.from_args(args, prune_log=worker == 0)
    app[_CORS] = frozenset(args.get("cors_origins") or ())
    app.middlewares.append(security_middleware)
    app.on_response_prepare.append(_on_prepare)
    try:
        from frontends.http import ws
    except ModuleNotFoundError:
        pass
    else:
        app[ws.WS_AUTH] = authenticate_ws
        if hasattr(ws, "WS_ADMIT"):
            app[ws.WS_ADMIT] = admit_ws

    async def lifetime(app: web.Application):
        access = await Access.open(settings)
        app[ACCESS] = access
        if DISPATCHER in app:   # SIGHUP-reloaded [auth] settings arrive with the placement
            app[DISPATCHER].config_listeners.append(
                lambda config: access.reconfigure(config.get("auth") or {}))
        cors = app[_CORS]   # a separate statement: inside sorted() mypy infers the wrong key type
        log.info("security: auth %s, %d global allow-list entries, CORS %s",
                 "required" if settings.required else "off (admin API still needs a key)",
                 len(settings.allow_ips), sorted(cors) or "off")
        yield
        await access.close()

    app.cleanup_ctx.append(lifetime)
