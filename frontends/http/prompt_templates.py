"""Server-side prompt templates (seed 003, Inference Gateway): named, versioned Jinja templates
in the state database, managed through the admin API and rendered into any text request.

Admin API (the `admin` scope, as every /admin route; frontends/http/security.py):

    POST   /admin/prompt-templates                     {"name", "template", "description"?}
                                                       -> 201, version 1 (409 template_exists)
    GET    /admin/prompt-templates                     every name: latest_version, versions
    GET    /admin/prompt-templates/{name}[?version=N]  one version (the latest by default)
    POST   /admin/prompt-templates/{name}/versions     {"template", "description"?} -> 201,
                                                       the next version
    DELETE /admin/prompt-templates/{name}              every version
    DELETE /admin/prompt-templates/{name}/versions/{version}

Use, as an OpenAI extension field on /v1/chat/completions and /v1/completions:

    "prompt_template": {"name": "support", "version": 2, "variables": {"product": "Ferry"},
                        "role": "user"}

`version` is optional (the latest), `variables` an optional JSON object. On completions the
rendered text is the `prompt` (sending both is 400 invalid_parameter); on chat it is appended to
`messages` (which may then be omitted) as a message of `role` ("user" by default, or "system",
"assistant"), so the model's chat template still applies. The sandbox and its limits are in
frontends/http/template_sandbox.py; the limits are the `[templates]` keys of ferry.toml.

For other routes (the seed-003 gateway route):

    async def render_prompt_template(request_or_state: web.Request | State,
                                     spec: dict | str) -> str

renders `spec` (the object above, or just a name) and returns the text, or raises FerryError:
404 template_not_found; 400 invalid_template, template_render_error, template_output_too_large,
invalid_parameter (a malformed spec); 413 template_too_large (admin routes only).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from daemon.errors import FerryError, InvalidInput
from daemon.state import State
from daemon.state.templates import TemplateStore, check_name
from frontends.http.appkeys import ACCESS, DISPATCHER
from frontends.http.json_body import decode_json
from frontends.http.template_sandbox import Limits, Sandbox, TemplateFailure
from frontends.http.tracing import span

__all__ = ["routes", "setup", "configure", "render_prompt_template", "with_prompt_template",
           "FIELD"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
FIELD = "prompt_template"
SANDBOX: web.AppKey[Sandbox] = web.AppKey("prompt_template_sandbox", Sandbox)
_SPEC_KEYS = {"name", "version", "variables", "role"}
_ROLES = ("user", "system", "assistant")
_STATUS = {"template_too_large": 413, "template_not_found": 404}
_BASE = "/admin/prompt-templates"


def setup(app: web.Application) -> None:
    app[SANDBOX] = Sandbox()
    app.add_routes(routes)
    if DISPATCHER in app:   # the [templates] limits arrive with the placement (and on SIGHUP)
        dispatcher = app[DISPATCHER]
        dispatcher.config_listeners.append(lambda config: configure(app, config))
        if dispatcher.placement is not None:
            configure(app, dispatcher.placement.config)


def configure(app: web.Application, config: dict[str, Any]) -> None:
    """Apply the `templates` table of the placement config when it changed."""
    section = config.get("templates") or {}
    limits = Limits(**{k: section[k] for k in Limits.__dataclass_fields__ if k in section})
    app[SANDBOX].reconfigure(limits)


def _failure(exc: TemplateFailure) -> FerryError:
    return FerryError(exc.message, code=exc.code, status=_STATUS.get(exc.code, 400),
                      param=FIELD)


def _store(request_or_state: web.Request | State) -> TemplateStore:
    if isinstance(request_or_state, State):
        return TemplateStore(request_or_state.db)
    access = request_or_state.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    return TemplateStore(access.state.db)


def _sandbox(request_or_state: web.Request | State) -> Sandbox:
    if isinstance(request_or_state, web.Request):
        found = request_or_state.app.get(SANDBOX)
        if found is not None:
            return found
    return _DEFAULT


_DEFAULT = Sandbox()


# -- rendering ----------------------------------------------------------------------------------

def _version(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise InvalidInput(f"{param} must be a positive integer", code="invalid_parameter",
                           param=param)
    return value


def _spec(spec: object) -> tuple[str, int | None, dict[str, Any]]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise InvalidInput(f"'{FIELD}' must be an object {{\"name\", \"version\"?, "
                           "\"variables\"?}", code="invalid_parameter", param=FIELD)
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)} in '{FIELD}'; expected "
                           f"{sorted(_SPEC_KEYS)}", code="invalid_parameter",
                           param=f"{FIELD}.{sorted(unknown)[0]}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"'{FIELD}.name' (a string) is required", code="invalid_parameter",
                           param=f"{FIELD}.name")
    check_name(name, f"{FIELD}.name")
    variables = spec.get("variables")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise InvalidInput(f"'{FIELD}.variables' must be a JSON object",
                           code="invalid_parameter", param=f"{FIELD}.variables")
    return name, _version(spec.get("version"), f"{FIELD}.version"), variables


async def render_prompt_template(request_or_state: web.Request | State,
                                 spec: dict[str, Any] | str) -> str:
    """The text of `spec` rendered (see the module docstring); FerryError otherwise."""
    name, version, variables = _spec(spec)
    sandbox = _sandbox(request_or_state)
    limits = sandbox.limits
    size = len(json.dumps(variables, ensure_ascii=False))
    if size > limits.max_variables_chars:
        raise InvalidInput(f"'{FIELD}.variables' is {size} characters as JSON; at most "
                           f"{limits.max_variables_chars}", code="invalid_parameter",
                           param=f"{FIELD}.variables")
    template = await _store(request_or_state).get(name, version)
    try:
        # A margin over the sandbox's own clock, which stops Python-level loops itself; this
        # bounds the caller's wait on anything else.
        with span("prompt_template.render", **{"ferry.template": name,
                                               "ferry.template_version": template.version}):
            return await asyncio.wait_for(
                asyncio.to_thread(sandbox.render, template.source, variables),
                limits.render_timeout_s + 1.0)
    except asyncio.TimeoutError:
        raise FerryError(f"prompt template {name!r} ran past render_timeout_s",
                         code="template_render_error", status=400, param=FIELD) from None
    except TemplateFailure as exc:
        raise _failure(exc) from None


async def with_prompt_template(request: web.Request, body: Any, into: str) -> Any:
    """The OpenAI body with its `prompt_template` rendered into `messages` (chat) or `prompt`
    (completions); any other body unchanged."""
    if not isinstance(body, dict) or FIELD not in body:
        return body
    body = dict(body)
    spec = body.pop(FIELD)
    text = await render_prompt_template(request, spec)
    if into == "prompt":
        if body.get("prompt") is not None:
            raise InvalidInput(f"send 'prompt' or '{FIELD}', not both",
                               code="invalid_parameter", param=FIELD)
        body["prompt"] = text
        return body
    role = spec.get("role", "user") if isinstance(spec, dict) else "user"
    if role not in _ROLES:
        raise InvalidInput(f"'{FIELD}.role' must be one of {list(_ROLES)}",
                           code="invalid_parameter", param=f"{FIELD}.role")
    messages = body.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        return body            # the chat parser answers a malformed `messages`
    body["messages"] = [*messages, {"role": role, "content": text}]
    return body


# -- admin API ----------------------------------------------------------------------------------

async def _object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    raw = await request.read()
    body = decode_json(raw) if raw else None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_json")
    unknown = set(body) - allowed
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}; expected {sorted(allowed)}",
                           code="unknown_parameter", param=sorted(unknown)[0])
    return body


def _checked(request: web.Request, source: object) -> str:
    try:
        return _sandbox(request).check(source)
    except TemplateFailure as exc:
        err = _failure(exc)
        err.param = "template"
        raise err from None


def _path_version(request: web.Request) -> int | None:
    raw = request.match_info.get("version", request.query.get("version"))
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
        raise InvalidInput("version must be a positive integer", param="version")
    return int(raw)


async def _detail(store: TemplateStore, name: str, version: int | None) -> dict[str, Any]:
    template = await store.get(name, version)
    return {**template.to_dict(), "versions": list(await store.versions(name))}


@routes.post(_BASE)
async def create_template(request: web.Request) -> web.Response:
    body = await _object(request, {"name", "template", "description"})
    if body.get("name") is None:
        raise InvalidInput("'name' is required", code="missing_parameter", param="name")
    name = check_name(body["name"])
    source = _checked(request, body.get("template"))
    store = _store(request)
    await store.create(name, source, body.get("description"))
    log.info("prompt template %r created", name)
    return web.json_response(await _detail(store, name, 1), status=201)


@routes.get(_BASE)
async def list_templates(request: web.Request) -> web.Response:
    summaries = await _store(request).list()
    return web.json_response({"object": "list", "data": [s.to_dict() for s in summaries]})


@routes.get(_BASE + "/{name}")
async def get_template(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"version"}
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; expected ['version']",
                           code="unknown_parameter", param=sorted(unknown)[0])
    name = request.match_info["name"]
    return web.json_response(await _detail(_store(request), name, _path_version(request)))


@routes.post(_BASE + "/{name}/versions")
async def add_version(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await _object(request, {"template", "description"})
    source = _checked(request, body.get("template"))
    store = _store(request)
    created = await store.add_version(name, source, body.get("description"))
    log.info("prompt template %r: version %d", name, created.version)
    return web.json_response(await _detail(store, name, created.version), status=201)


@routes.delete(_BASE + "/{name}")
async def delete_template(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    removed = await _store(request).delete(name)
    return web.json_response({"name": name, "deleted": True, "versions_removed": removed})


@routes.delete(_BASE + "/{name}/versions/{version}")
async def delete_version(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], _path_version(request)
    removed = await _store(request).delete(name, version)
    return web.json_response({"name": name, "version": version, "deleted": True,
                              "versions_removed": removed})

