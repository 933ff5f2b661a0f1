"""JSON errors for every HTTP route, mapped in one place. Every error carries a stable `code`,
a `message` and the `request_id`:

    {"error": {"code": "...", "message": "...", "type": "...", "param": ..., "request_id": "..."}}

is the OpenAI error object plus `request_id`, used on every route but the KServe ones. KServe v2
(and `tritonclient`) require `error` to be the message string, so `/v2/...` routes answer

    {"error": "...", "code": "...", "message": "...", "request_id": "..."}
 Handlers raise `FerryError`; this middleware maps it, and maps
aiohttp's own HTTP errors (404 route, 405, 413 body) to the same shape. The order is fixed:
FerryError, then aiohttp HTTPException, then a body aiohttp could not decode (400), then a
timeout no handler turned into an error (a 504 `deadline_exceeded`: the server ran out of time,
which is neither the client's fault nor a crash), then anything else as a logged 500.
"""
from __future__ import annotations

import logging
import uuid
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from daemon.errors import DeadlineExceeded, FerryError, RateLimited
from frontends.http.appkeys import request_key

__all__ = ["REQUEST_ID", "error_body", "error_response", "error_middleware", "request_id_of"]

log = logging.getLogger(__name__)
REQUEST_ID = request_key("ferry_request_id", str)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable",
          504: "timeout_error"}
_AIOHTTP_CODES = {404: "route_not_found", 405: "method_not_allowed", 413: "payload_too_large",
                  400: "bad_request", 415: "unsupported_media_type"}


def request_id_of(request: web.Request) -> str:
    rid = request.get(REQUEST_ID)
    if rid is None:
        given = request.headers.get("X-Request-ID", "")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        request[REQUEST_ID] = rid
    return rid


def error_body(status: int, code: str, message: str, request_id: str,
               param: str | None = None) -> dict:
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": etype, "param": param,
                      "request_id": request_id}}


def error_response(request: web.Request, exc: FerryError) -> web.Response:
    rid = request_id_of(request)
    if request.path.startswith("/v2"):
        body = {"error": exc.message, "code": exc.code, "message": exc.message,
                "request_id": rid}
    else:
        body = error_body(exc.status, exc.code, exc.message, rid, exc.param)
    resp = web.json_response(body, status=exc.status)
    resp.headers["X-Request-ID"] = rid
    if isinstance(exc, RateLimited):
        resp.headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return resp


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    rid = request_id_of(request)
    try:
        resp = await handler(request)
    except FerryError as exc:
        if exc.status >= 500:
            log.warning("%s %s failed: %s", request.method, request.path, exc.message,
                        extra={"request_id": rid, "code": exc.code})
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) \
            else exc.reason
        return error_response(request, FerryError(message, code=code, status=exc.status))
    except RequestPayloadError:   # a body aiohttp could not decode (bad gzip, bad chunking)
        return error_response(request, FerryError(
            "the request body could not be decoded (check Content-Encoding)",
            code="invalid_body", status=400))
    except TimeoutError:          # asyncio.TimeoutError is TimeoutError since Python 3.11
        log.warning("%s %s timed out", request.method, request.path, extra={"request_id": rid})
        return error_response(request, DeadlineExceeded("the request did not finish in time"))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path,
                      extra={"request_id": rid})
        return error_response(request, FerryError("internal server error",
                                                  code="internal_error", status=500))
    if not resp.prepared:
        resp.headers.setdefault("X-Request-ID", rid)
    return resp
