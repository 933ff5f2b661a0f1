"""Seed 000, Cinfer (../shared/seeds/000-cinfer.md): vision inference and its admin API.

    POST /api/v1/inference/{model_id}    multipart `image` (or `file`) -> Ferry's predict reply
                                         (frontends/http/vision.py: predictions or outputs)
    GET  /api/v1/models                  the ready models (/v1/models)

Admin (the `admin` scope, always, as /admin/*; frontends/http/admin.py, admin_models.py):

    POST   /api/v1/internal/auth                 login {"username", "password"} -> the JWT,
                                                 also as the X-Auth-Token response header
    GET    /api/v1/internal/auth                 the calling credential (id, kind, scopes)
    GET    /api/v1/internal/system               /admin/system
    GET    /api/v1/internal/models               /admin/models
    POST   /api/v1/internal/models/{name}/versions   /admin/models/{name}/versions (upload)
    GET|POST /api/v1/internal/tokens, GET|DELETE /api/v1/internal/tokens/{key_id},
    POST   /api/v1/internal/tokens/{key_id}/rotate   /admin/tokens...

Credentials: Cinfer's X-Auth-Token (admin) and X-Access-Token (inference) headers are read as
the bearer credential (frontends/http/compat/__init__.py). Errors add FastAPI's `detail`.
"""
from __future__ import annotations

import json
from typing import Any, cast

from aiohttp import web

from daemon.errors import FerryError
from frontends.http import admin, admin_models, openai, vision
from frontends.http.compat import Route
from frontends.http.security import principal_of

__all__ = ["ROUTES", "error_body"]


def error_body(request: web.Request, exc: FerryError, ferry: dict[str, Any]) -> dict[str, Any]:
    return {"detail": exc.message, **ferry}


async def login(request: web.Request) -> web.Response:
    resp = cast(web.Response, await admin.login(request))
    token = json.loads(resp.text or "{}").get("access_token")
    if isinstance(token, str):
        resp.headers["X-Auth-Token"] = token
    return resp


async def whoami(request: web.Request) -> web.Response:
    p = principal_of(request)
    if p is None:
        return web.json_response({"authenticated": False})
    return web.json_response({"authenticated": True, "id": p.id, "kind": p.kind,
                              "name": p.name, "scopes": sorted(p.scopes),
                              "models": list(p.models) if p.models is not None else None})


_I = "/api/v1/internal"
ROUTES = (
    Route("POST", "/api/v1/inference/{model}", vision.predict, "/v1/models/{model}/predict"),
    Route("GET", "/api/v1/models", openai.list_models, "/v1/models"),
    Route("POST", f"{_I}/auth", login, "/admin/login"),
    Route("GET", f"{_I}/auth", whoami, "/admin/tokens"),
    Route("GET", f"{_I}/system", admin.system, "/admin/system"),
    Route("GET", f"{_I}/models", admin_models.list_models, "/admin/models"),
    Route("POST", f"{_I}/models/{{name}}/versions", admin_models.upload_version,
          "/admin/models/{name}/versions"),
    Route("GET", f"{_I}/tokens", admin.list_tokens, "/admin/tokens"),
    Route("POST", f"{_I}/tokens", admin.create_token, "/admin/tokens"),
    Route("GET", f"{_I}/tokens/{{key_id}}", admin.get_token, "/admin/tokens/{key_id}"),
    Route("DELETE", f"{_I}/tokens/{{key_id}}", admin.revoke_token, "/admin/tokens/{key_id}"),
    Route("POST", f"{_I}/tokens/{{key_id}}/rotate", admin.rotate_token,
          "/admin/tokens/{key_id}/rotate"),
)
