"""Seed 003, Inference Gateway (../shared/seeds/003-inference-gateway.md).

    POST /api/v1/inference   {"text", "max_tokens"? (50), "temperature"? (1.0), "top_p"? (1.0),
                             "min_p"? (0.0), "model"?, "prompt_template"?} -> {"model", "text",
                             "metadata": {"tokens_generated", "processing_time_ms"}}; `text` is
                             the prompt followed by the generation, as the gateway answers
    GET  /transactions       the request log's rows of these routes (prompt and response text
                             only where [logging] log_bodies keeps bodies)
    POST /transactions       {"transaction": {"prompt", "response", "model_name"}} -> 201; the
                             request log row of this request is the stored transaction

`prompt_template` (Ferry's extension field, as on /v1/completions): a stored template by name
("name" or {"name", "version"?, "variables"?}), rendered by frontends/http/prompt_templates.py
into the prompt, with the request's `text` as the variable `text`.
/healthz, /readyz and /metrics are Ferry's own routes already.
"""
from __future__ import annotations

import importlib
import json
from typing import Any

from aiohttp import web

from daemon.errors import FerryError, InvalidInput
from frontends.http.admin import json_object
from frontends.http.compat import Route, prefix
from frontends.http.compat.text import default_text_model, generate
from frontends.http.security import ACCESS, principal_of

__all__ = ["ROUTES"]

_FIELDS = {"text", "max_tokens", "temperature", "top_p", "min_p", "model", "prompt_template"}
_ROUTES = ("/api/v1/inference", "/transactions")
_MAX_ROWS = 1000


async def inference(request: web.Request) -> web.Response:
    body = await json_object(request)
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}", code="unknown_parameter",
                           param=sorted(unknown)[0])
    text = body.get("text")
    if body.get("prompt_template") is not None:
        text = await _render(request, body["prompt_template"], text)
    if not isinstance(text, str) or not text:
        raise InvalidInput("'text' (a non-empty string) is required", code="missing_parameter",
                           param="text")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidInput("'model' must be a non-empty string",
                           code="invalid_parameter", param="model")
    fields: dict[str, Any] = {"max_tokens": body.get("max_tokens", 50)}
    for key in ("temperature", "top_p", "min_p"):
        if body.get(key) is not None:
            fields[key] = body[key]
    out = await generate(request, model or default_text_model(request), text, fields)
    if out is None:
        return web.Response(status=499)
    return web.json_response({"model": out.model, "text": text + out.text,
                              "metadata": {"tokens_generated": out.completion_tokens,
                                           "processing_time_ms": int(out.elapsed_ms)}})


async def _render(request: web.Request, spec: Any, text: Any) -> str:
    try:
        templates = importlib.import_module("frontends.http.prompt_templates")
    except ModuleNotFoundError:
        raise InvalidInput("prompt templates are not available in this build",
                           code="unsupported_parameter", param="prompt_template") from None
    if isinstance(spec, dict) and isinstance(text, str):
        variables = spec.get("variables") or {}
        if not isinstance(variables, dict):
            raise InvalidInput("'prompt_template.variables' must be an object",
                               code="invalid_parameter", param="prompt_template.variables")
        spec = {**spec, "variables": {"text": text, **variables}}
    elif isinstance(spec, str) and isinstance(text, str):
        spec = {"name": spec, "variables": {"text": text}}
    rendered = await templates.render_prompt_template(request, spec)
    if not isinstance(rendered, str):
        raise FerryError("the template did not render to text", code="template_error",
                         status=400)
    return rendered


def _transaction(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": row.get("request_id"), "created_at": row.get("ts"),
                           "route": row.get("route"), "status": row.get("status"),
                           "model_name": row.get("model"),
                           "tokens_generated": row.get("completion_tokens"),
                           "processing_time_ms": row.get("total_ms")}
    raw = row.get("body")
    try:
        body = json.loads(raw) if isinstance(raw, str) and raw else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        given = body.get("transaction")
        if isinstance(given, dict):           # POST /transactions: the client's record
            out.update({k: given.get(k) for k in ("prompt", "response", "model_name")})
        elif isinstance(body.get("text"), str):
            out["prompt"] = body["text"]
    return out


async def list_transactions(request: web.Request) -> web.Response:
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    principal = principal_of(request)
    admin = principal is None or "admin" in principal.scopes or principal.kind == "anonymous"
    routes = {f"POST {base}{path}" for base in ("", prefix("gateway")) for path in _ROUTES}
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(rows) < _MAX_ROWS:
        filters: dict[str, Any] = {"limit": 500}
        if not admin and principal is not None:
            filters["key_id"] = principal.id   # a key sees its own transactions
        if cursor:
            filters["cursor"] = cursor
        records, cursor = await access.state.requests.query(**filters)
        rows.extend(r.to_dict() for r in records if r.route in routes)
        if not cursor:
            break
    return web.json_response({"transactions": [_transaction(r) for r in rows[:_MAX_ROWS]]})


async def store_transaction(request: web.Request) -> web.Response:
    body = await json_object(request)
    tx = body.get("transaction")
    if not isinstance(tx, dict):
        raise InvalidInput("'transaction' (an object) is required", code="missing_parameter",
                           param="transaction")
    for key in ("prompt", "response", "model_name"):
        if not isinstance(tx.get(key), str):
            raise InvalidInput(f"'transaction.{key}' (a string) is required",
                               code="missing_parameter", param=f"transaction.{key}")
    unknown = set(tx) - {"prompt", "response", "model_name"}
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}", code="unknown_parameter",
                           param=f"transaction.{sorted(unknown)[0]}")
    return web.json_response({"transaction": tx}, status=201)


ROUTES = (
    Route("POST", "/api/v1/inference", inference, "/v1/completions"),   # an optional "model"
    Route("GET", "/transactions", list_transactions),
    Route("POST", "/transactions", store_transaction),
)
