"""`GET /openapi.json`: an OpenAPI 3.1 description of every HTTP route, built here as data.

The document is exact enough for property-based testing (schemathesis against a running daemon,
tests/integration/test_openapi.py): request bodies carry the bounds the parsers enforce
(frontends/http/openai_schema.py, kserve_codec.py; see openapi_schemas.py), so a conforming
body gets past the parser and what only the model can judge (tensor names, context length)
is a 4xx, like every non-conforming one. tests/integration/test_openapi.py compares the paths
with the aiohttp router. Errors follow frontends/http/errors.py: the flat KServe shape on /v2
routes, the OpenAI error object elsewhere. The route is open (no key): it describes the API
and serves no data.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from aiohttp import web

from daemon import __version__
from frontends.http.kserve_codec import KSERVE_TO_NUMPY
from frontends.http.openai_schema import (MAX_EMBED_INPUTS, MAX_N, MAX_PROMPTS, MAX_STOP_CHARS,
                                          MAX_STOPS)
from frontends.http.openapi_schemas import COMPONENT_SCHEMAS

__all__ = ["OPENAPI_PATH", "document", "setup"]

OPENAPI_PATH = "/openapi.json"
Schema = dict[str, Any]
_BODY: web.AppKey[bytes] = web.AppKey("openapi_body", bytes)

# Security requirements. An empty object in the list: anonymous callers are allowed
# (inference routes with auth.required = false).
_OPEN: list[Schema] = []
_INFER: list[Schema] = [{"bearer": []}, {"apiKey": []}, {}]
_ADMIN: list[Schema] = [{"bearer": []}, {"apiKey": []}]
_JSON = "application/json"


def setup(app: web.Application) -> None:
    app[_BODY] = json.dumps(document(), separators=(",", ":")).encode()
    app.router.add_get(OPENAPI_PATH, openapi_view)


async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_BODY], content_type=_JSON)


# -- building blocks ----------------------------------------------------------------------------

def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, where: str, schema: Schema, description: str,
           required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


_MODEL = _param("model", "path", {"type": "string", "minLength": 1},
                "model name, `name:version`, or the SHA-256 id of a version's weights")
_VERSION = _param("version", "path", {"type": "string", "pattern": "^[1-9][0-9]*$"},
                  "model version (a positive integer)")
_REGION = _param("region", "path", {"type": "string", "minLength": 1},
                 "system shared-memory region name")
_KEY_ID = _param("key_id", "path", {"type": "string", "minLength": 1}, "API key id")
_BATCH_ID = _param("batch_id", "path", {"type": "string", "minLength": 1}, "batch job id")
_NOT_READY: dict[str, Schema] = {"503": {"description": "not ready (no body)"}}


def _body(schema: Schema, required: bool = True, media: str = _JSON) -> Schema:
    return {"required": required, "content": {media: {"schema": schema}}}


def _ok(schema: Schema | None, description: str = "success", media: str = _JSON,
        status: str = "200") -> dict[str, Schema]:
    if schema is None:
        return {status: {"description": description}}
    return {status: {"description": description, "content": {media: {"schema": schema}}}}


def _op(op_id: str, summary: str, tag: str, security: list[Schema],
        responses: dict[str, Schema], *, params: tuple[Schema, ...] = (),
        body: Schema | None = None, kserve: bool = False) -> Schema:
    error = {"$ref": "#/components/responses/" + ("KServeError" if kserve else "Error")}
    op: Schema = {"operationId": op_id, "summary": summary, "tags": [tag],
                  "security": security,
                  "parameters": [{"$ref": "#/components/parameters/RequestId"}, *params],
                  "responses": {**responses, "4XX": error, "5XX": error}}
    if body is not None:
        op["requestBody"] = body
    return op


def _versioned(paths: dict[str, Schema], suffix: str, method: str, op: Schema) -> None:
    """The route at /v2/models/{model}<suffix> and at .../versions/{version}<suffix>."""
    base = f"/v2/models/{{model}}{suffix}"
    paths.setdefault(base, {})[method] = {**op, "parameters": [*op["parameters"], _MODEL]}
    versioned = {**op, "operationId": op["operationId"] + "_version",
                 "parameters": [*op["parameters"], _MODEL, _VERSION]}
    paths.setdefault(f"/v2/models/{{model}}/versions/{{version}}{suffix}", {})[method] = versioned


# -- KServe v2 ----------------------------------------------------------------------------------

def _kserve_paths() -> dict[str, Schema]:
    empty = _ok({"type": "object"})
    p: dict[str, Schema] = {
        "/v2": {"get": _op("server_metadata", "Server metadata", "kserve", _OPEN,
                           _ok(_ref("ServerMetadata")), kserve=True)},
        "/v2/health/live": {"get": _op("health_live", "Liveness", "health", _OPEN,
                                       _ok(None, "live"), kserve=True)},
        "/v2/health/ready": {"get": _op("health_ready", "Readiness", "health", _OPEN,
                                        {**_ok(None, "ready"), **_NOT_READY}, kserve=True)},
    }
    _versioned(p, "", "get", _op("model_metadata", "Model metadata", "kserve", _INFER,
                                 _ok(_ref("ModelMetadata")), kserve=True))
    _versioned(p, "/ready", "get", _op("model_ready", "Model readiness", "kserve", _INFER,
                                       {**_ok(None, "ready"), **_NOT_READY}, kserve=True))
    _versioned(p, "/config", "get", _op("model_config", "Model configuration", "kserve",
                                        _INFER, _ok({"type": "object"}), kserve=True))
    stats = _ok({"type": "object", "required": ["model_stats"],
                 "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}}})
    p["/v2/models/stats"] = {"get": _op("model_stats_all", "Statistics of every tensor model "
                                        "(Triton's statistics extension)", "kserve", _INFER,
                                        stats, kserve=True)}
    _versioned(p, "/stats", "get", _op("model_stats", "Model statistics", "kserve", _INFER,
                                       stats, kserve=True))
    log_settings = {"type": "object", "properties": {
        "log_file": {"type": "string"}, "log_info": {"type": "boolean"},
        "log_warnings": {"type": "boolean"}, "log_errors": {"type": "boolean"},
        "log_verbose_level": {"type": "integer", "minimum": 0}, "log_format": {"type": "string"}}}
    p["/v2/logging"] = {
        "get": _op("log_settings", "Log settings (Triton's logging extension)", "kserve",
                   _ADMIN, _ok(log_settings), kserve=True),
        "post": _op("log_settings_update", "Change the daemon-wide log level (400: settings a "
                    "log threshold cannot express, a log file, another format)", "kserve",
                    _ADMIN, _ok(log_settings), body=_body(log_settings), kserve=True)}
    trace = {"type": "object"}
    p["/v2/trace/setting"] = {
        "get": _op("trace_settings", "Trace settings (tracing is off; Ferry does not trace)",
                   "kserve", _ADMIN, _ok(trace), kserve=True),
        "post": _op("trace_settings_update", "400 trace_unsupported for anything but "
                    "trace_level [\"OFF\"]", "kserve", _ADMIN, _ok(trace), body=_body(trace),
                    kserve=True)}
    p["/v2/models/{model}/trace/setting"] = {
        method: {**_op(f"model_trace_settings{suffix}", "A model's trace settings (off)",
                       "kserve", _INFER, _ok(trace), params=(_MODEL,), kserve=True),
                 **({"requestBody": _body(trace)} if method == "post" else {})}
        for method, suffix in (("get", ""), ("post", "_update"))}
    header_len = _param("Inference-Header-Content-Length", "header",
                        {"type": "integer", "minimum": 0},
                        "length of the JSON header when raw tensor bytes follow it")
    infer_body = {"required": True, "content": {
        _JSON: {"schema": _ref("InferRequest")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    infer_ok = {"200": {"description": "outputs; with binary outputs, the JSON header is "
                        "followed by raw bytes (Inference-Header-Content-Length)",
                        "content": {_JSON: {"schema": _ref("InferResponse")},
                                    "application/octet-stream": {
                                        "schema": {"type": "string", "format": "binary"}}}}}
    _versioned(p, "/infer", "post", _op(
        "model_infer", "Inference (JSON tensors, binary-data extension, shared memory)",
        "kserve", _INFER, infer_ok, params=(header_len,), body=infer_body, kserve=True))
    shm_list = _ok({"type": "array", "items": _ref("ShmRegion")})
    p["/v2/systemsharedmemory/status"] = {"get": _op(
        "shm_status", "Registered system shared-memory regions", "kserve", _ADMIN, shm_list,
        kserve=True)}
    p["/v2/systemsharedmemory/region/{region}/status"] = {"get": _op(
        "shm_region_status", "One region's status", "kserve", _ADMIN, shm_list,
        params=(_REGION,), kserve=True)}
    p["/v2/systemsharedmemory/region/{region}/register"] = {"post": _op(
        "shm_register", "Register a region (daemon-wide)", "kserve", _ADMIN, empty,
        params=(_REGION,), body=_body(_ref("ShmRegisterRequest")), kserve=True)}
    p["/v2/systemsharedmemory/region/{region}/unregister"] = {"post": _op(
        "shm_unregister_region", "Unregister one region", "kserve", _ADMIN, empty,
        params=(_REGION,), kserve=True)}
    p["/v2/systemsharedmemory/unregister"] = {"post": _op(
        "shm_unregister_all", "Unregister every region", "kserve", _ADMIN, empty, kserve=True)}
    none = _ok({"type": "array", "maxItems": 0})
    p["/v2/cudasharedmemory/status"] = {"get": _op(
        "cuda_shm_status", "CUDA shared memory (none registered by this build)", "kserve",
        _ADMIN, none, kserve=True)}
    p["/v2/cudasharedmemory/region/{region}/status"] = {"get": _op(
        "cuda_shm_region_status", "One CUDA region's status (400: not registered)", "kserve",
        _ADMIN, none, params=(_REGION,), kserve=True)}
    cuda_register = {"type": "object", "required": ["raw_handle", "device_id", "byte_size"],
                     "properties": {
                         "raw_handle": {"type": "object", "required": ["b64"],
                                        "properties": {"b64": {"type": "string"}}},
                         "device_id": {"type": "integer", "minimum": 0},
                         "byte_size": {"type": "integer", "minimum": 1}}}
    p["/v2/cudasharedmemory/region/{region}/register"] = {"post": _op(
        "cuda_shm_register", "Register a CUDA IPC region (400 without a CUDA engine; 501 "
        "until this build opens IPC handles)", "kserve", _ADMIN, empty, params=(_REGION,),
        body=_body(cuda_register), kserve=True)}
    p["/v2/cudasharedmemory/region/{region}/unregister"] = {"post": _op(
        "cuda_shm_unregister_region", "Unregister one CUDA region (none registered)", "kserve",
        _ADMIN, empty, params=(_REGION,), kserve=True)}
    p["/v2/cudasharedmemory/unregister"] = {"post": _op(
        "cuda_shm_unregister_all", "Unregister every CUDA region (none registered)", "kserve",
        _ADMIN, empty, kserve=True)}
    index = _ok({"type": "array", "items": _ref("RepositoryEntry")})
    p["/v2/repository/index"] = {"post": _op(
        "repository_index", "Model repository index", "kserve", _ADMIN, index,
        body=_body({"type": "object", "properties": {"ready": {"type": "boolean"}}}, False),
        kserve=True)}
    for verb in ("load", "unload"):
        p[f"/v2/repository/models/{{model}}/{verb}"] = {"post": _op(
            f"repository_{verb}", f"{verb.capitalize()} a model (explicit control mode)",
            "kserve", _ADMIN, empty, params=(_MODEL,),
            body=_body({"type": "object", "properties": {"parameters": {"type": "object"}}},
                       False), kserve=True)}
    # Not under /v2: errors in the OpenAI shape.
    p["/healthz"] = {"get": _op("healthz", "Liveness", "health", _OPEN, _ok(_ref("Health")))}
    ready = _ref("Ready")
    p["/readyz"] = {"get": _op("readyz", "Readiness with per-model state", "health", _OPEN,
                               {**_ok(ready), **_ok(ready, "starting, degraded or draining",
                                                    status="503")})}
    return p


# -- OpenAI-compatible, vision, batches ---------------------------------------------------------

def _openai_paths() -> dict[str, Schema]:
    sse = {"text/event-stream": {"schema": {"type": "string"}}}

    def generation(name: str) -> dict[str, Schema]:
        return {"200": {"description": "the completion, or with `stream: true` server-sent "
                        "events ending with `data: [DONE]`",
                        "content": {_JSON: {"schema": _ref(name)}, **sse}}}

    return {
        "/v1/models": {"get": _op("list_models", "Ready models", "openai", _INFER,
                                  _ok(_ref("ModelList")))},
        "/v1/models/{model}": {"get": _op("get_model", "One model", "openai", _INFER,
                                          _ok(_ref("Model")), params=(_MODEL,))},
        "/v1/chat/completions": {"post": _op(
            "chat_completions", "Chat completion", "openai", _INFER,
            generation("ChatCompletion"), body=_body(_ref("ChatCompletionRequest")))},
        "/v1/completions": {"post": _op(
            "completions", "Text completion", "openai", _INFER, generation("Completion"),
            body=_body(_ref("CompletionRequest")))},
        "/v1/streams/{stream_id}": {"get": _op(
            "resume_stream", "Resume a resumable stream (stream_options.resumable) from "
            "Last-Event-ID or ?last_event_id=", "openai", _INFER,
            {"200": {"description": "the stream's events after the given one", "content": sse}},
            params=({"name": "stream_id", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "string"}}))},
        "/v1/embeddings": {"post": _op(
            "embeddings", "Embeddings (tensor models with a tokenizer)", "openai", _INFER,
            _ok(_ref("EmbeddingList")), body=_body(_ref("EmbeddingRequest")))},
        "/tokenize": {"post": _op(
            "tokenize", "vLLM's tokenize: a prompt, or chat messages through the chat template",
            "openai", _INFER, _ok({"type": "object", "required": ["count", "tokens"],
                                   "properties": {"count": {"type": "integer"},
                                                  "max_model_len": {"type": "integer"},
                                                  "tokens": {"type": "array"},
                                                  "token_strs": {"type": ["array", "null"]}}}),
            body=_body({"type": "object", "properties": {
                "model": {"type": "string"}, "prompt": {"type": "string"},
                "messages": {"type": "array"}, "add_special_tokens": {"type": "boolean"},
                "add_generation_prompt": {"type": "boolean"},
                "return_token_strs": {"type": "boolean"}}}))},
        "/detokenize": {"post": _op(
            "detokenize", "vLLM's detokenize", "openai", _INFER,
            _ok({"type": "object", "properties": {"prompt": {"type": "string"}}}),
            body=_body({"type": "object", "required": ["tokens"], "properties": {
                "model": {"type": "string"},
                "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}))},
        "/health": {"get": _op("health", "vLLM's probe: 200 when ready (no body)", "health",
                               _OPEN, {**_ok(None, "ready"), **_NOT_READY})},
        "/get_load": {"get": _op(
            "get_load", "Load report polled by routers' power_of_two policy (vllm-router, "
            "sglang-router): generations running + waiting", "health", _INFER,
            _ok({"type": "object", "required": ["load", "num_requests_running",
                                                "num_requests_waiting", "kv_cache_usage_perc",
                                                "models"],
                 "properties": {"load": {"type": "integer"},
                                "num_requests_running": {"type": "integer"},
                                "num_requests_waiting": {"type": "integer"},
                                "kv_cache_usage_perc": {"type": "number"},
                                "models": {"type": "object"}}}))},
        "/v1/ws": {"get": _op(
            "websocket", "WebSocket: `auth`, `inference` (text, or an image model with "
            "`progress` events), `cancel`, `ping` messages (see frontends/http/ws.py)",
            "openai", _INFER,
            {"101": {"description": "switching protocols"}})},
    }


def _vision_paths() -> dict[str, Schema]:
    image = {"type": "string", "format": "binary"}
    body = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": image}},
                                "encoding": {"file": {"contentType": "image/png, image/jpeg"}}},
        "image/png": {"schema": image}, "image/jpeg": {"schema": image}}}
    top_k = _param("top_k", "query", {"type": "integer", "minimum": 1},
                   "labels to return (models with [postprocess] kind = \"classify\")")
    query_version = _param("version", "query", {"type": "integer", "minimum": 1},
                           "pin a version")
    ok = _ok(_ref("Prediction"))
    return {
        "/v1/models/{model}/predict": {"post": _op(
            "predict", "Image classification", "vision", _INFER, ok,
            params=(_MODEL, top_k, query_version), body=body)},
        "/v1/models/{model}/versions/{version}/predict": {"post": _op(
            "predict_version", "Image classification, one version", "vision", _INFER, ok,
            params=(_MODEL, _VERSION, top_k), body=body)},
    }


def _batch_paths() -> dict[str, Schema]:
    from daemon.state.batches import JobStatus

    batch = _ok(_ref("Batch"))
    jsonl = {"type": "string", "description": "OpenAI batch input lines"}
    create_body = {"required": True, "content": {
        _JSON: {"schema": _ref("BatchCreateRequest")},
        "application/jsonl": {"schema": jsonl}, "application/x-ndjson": {"schema": jsonl}}}
    create_params = (
        _param("endpoint", "query", {"type": "string"}, "JSONL bodies: the items' URL"),
        _param("webhook_url", "query", {"type": "string"}, "JSONL bodies: the webhook"),
        _param("X-Ferry-Webhook-Secret", "header", {"type": "string"},
               "JSONL bodies: the webhook's signing secret"))
    list_params = (
        _param("status", "query", {"type": "string", "enum": [s.value for s in JobStatus]},
               "only jobs in this state"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "page"),
        _param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page"))
    result_params = (
        _BATCH_ID,
        _param("after", "query", {"type": "integer", "minimum": -1, "maximum": 10**9},
               "items after this index"),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10000}, "page"),
        _param("format", "query", {"type": "string", "enum": ["json", "jsonl"]},
               "jsonl: one result per line"))
    results = {"200": {"description": "results", "content": {
        _JSON: {"schema": _ref("BatchResults")},
        "application/jsonl": {"schema": {"type": "string"}}}}}
    return {
        "/v1/batches": {
            "post": _op("create_batch", "Create a batch job", "batches", _INFER,
                        _ok(_ref("Batch"), status="201"), params=create_params,
                        body=create_body),
            "get": _op("list_batches", "Batch jobs visible to the caller", "batches", _INFER,
                       _ok(_ref("BatchList")), params=list_params)},
        "/v1/batches/{batch_id}": {"get": _op("get_batch", "One batch job", "batches",
                                              _INFER, batch, params=(_BATCH_ID,))},
        "/v1/batches/{batch_id}/cancel": {"post": _op(
            "cancel_batch", "Cancel a batch job", "batches", _INFER, batch,
            params=(_BATCH_ID,))},
        "/v1/batches/{batch_id}/results": {"get": _op(
            "batch_results", "A batch job's results", "batches", _INFER, results,
            params=result_params)},
    }


# -- admin, metrics -----------------------------------------------------------------------------

def _admin_paths() -> dict[str, Schema]:
    key = _ok(_ref("ApiKey"))
    log_params = (
        _param("model", "query", {"type": "string"}, "model name"),
        _param("status", "query", {"type": "integer", "minimum": 0, "maximum": 999999},
               "HTTP status"),
        _param("key_id", "query", {"type": "string"}, "API key id"),
        _param("since", "query", {"type": "string"}, "Unix seconds or ISO 8601"),
        _param("until", "query", {"type": "string"}, "Unix seconds or ISO 8601"),
        _param("limit", "query", {"type": "integer", "minimum": 0, "maximum": 999999},
               "rows"),
        _param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page"))
    binary = {"type": "string", "format": "binary"}
    upload = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"model.toml": binary, "config": binary,
                                         "weights": binary, "archive": binary}}}}}
    return {
        "/admin/login": {"post": _op(
            "admin_login", "Username and password to a short-lived JWT", "admin", _OPEN,
            _ok(_ref("LoginResponse")), body=_body(_ref("LoginRequest")))},
        "/admin/tokens": {
            "post": _op("create_token", "Create an API key (the secret is shown once)",
                        "admin", _ADMIN, _ok(_ref("CreatedApiKey"), status="201"),
                        body=_body(_ref("ApiKeyCreateRequest"))),
            "get": _op("list_tokens", "API keys", "admin", _ADMIN, _ok(_ref("ApiKeyList")),
                       params=(_param("include_revoked", "query",
                                      {"type": "string", "enum": ["true", "false", "1", "0",
                                                                  "yes", "no"]},
                                      "list revoked keys too"),))},
        "/admin/tokens/{key_id}": {
            "get": _op("get_token", "One API key", "admin", _ADMIN, key, params=(_KEY_ID,)),
            "delete": _op("revoke_token", "Revoke an API key (idempotent)", "admin", _ADMIN,
                          key, params=(_KEY_ID,))},
        "/admin/tokens/{key_id}/rotate": {"post": _op(
            "rotate_token", "New secret, same id and settings", "admin", _ADMIN,
            _ok(_ref("CreatedApiKey")), params=(_KEY_ID,))},
        "/admin/requests": {"get": _op("request_log", "The request log", "admin", _ADMIN,
                                       _ok(_ref("RequestLog")), params=log_params)},
        "/admin/system": {"get": _op("system", "CPU, memory, processes, shared memory, GPUs",
                                     "admin", _ADMIN, _ok({"type": "object"}))},
        "/admin/models": {"get": _op("admin_models", "Placement of every model version",
                                     "admin", _ADMIN, _ok({"type": "object"}))},
        "/admin/models/{name}/versions": {"post": _op(
            "upload_version", "Upload a new model version (validated by loading it)", "admin",
            _ADMIN, _ok({"type": "object"}, status="201"),
            params=(_param("name", "path", {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
                           "model name"),), body=upload)},
        **_template_paths(),
        "/metrics/custom": {
            "post": _op("post_custom_metric", "Set a gauge or add to a counter (exported on "
                        "/metrics)", "metrics", _ADMIN, _ok(_ref("CustomMetricSeries")),
                        body=_body(_ref("CustomMetricRequest"))),
            "get": _op("list_custom_metrics", "Every client-defined series", "metrics", _ADMIN,
                       _ok(_ref("CustomMetricList")))},
        "/traces": {"get": _op(
            "traces", "Recent request spans of every HTTP worker, newest first", "metrics",
            _ADMIN, _ok(_ref("Traces")), params=(
                _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "spans (default 100)"),
                _param("trace_id", "query", {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                       "only this trace's spans")))},
        "/metrics/custom/{name}": {"delete": _op(
            "delete_custom_metric", "Remove every series of a client-defined metric", "metrics",
            _ADMIN, _ok({"type": "object"}),
            params=(_param("name", "path", {"type": "string", "minLength": 1}, "metric name"),))},
        "/metrics": {"get": _op("metrics", "Prometheus metrics of every process", "metrics",
                                _OPEN, _ok({"type": "string"}, media="text/plain"))},
        OPENAPI_PATH: {"get": _op("openapi", "This document", "meta", _OPEN,
                                  _ok({"type": "object"}))},
    }


def _template_paths() -> dict[str, Schema]:
    """frontends/http/prompt_templates.py."""
    name = _param("name", "path", {"type": "string", "minLength": 1}, "template name")
    version = _param("version", "path", {"type": "string", "pattern": "^[1-9][0-9]*$"},
                     "template version")
    one = _ok(_ref("PromptTemplate"))
    gone = _ok({"type": "object"})
    base = "/admin/prompt-templates"
    return {
        base: {"post": _op("create_prompt_template", "Store a prompt template (version 1)",
                           "admin", _ADMIN, _ok(_ref("PromptTemplate"), status="201"),
                           body=_body(_ref("PromptTemplateCreateRequest"))),
               "get": _op("list_prompt_templates", "Prompt templates", "admin", _ADMIN,
                          _ok(_ref("PromptTemplateList")))},
        base + "/{name}": {
            "get": _op("get_prompt_template", "One version (the latest by default)", "admin",
                       _ADMIN, one, params=(name, _param(
                           "version", "query", {"type": "string", "pattern": "^[1-9][0-9]*$"},
                           "version"))),
            "delete": _op("delete_prompt_template", "Delete every version", "admin", _ADMIN,
                          gone, params=(name,))},
        base + "/{name}/versions": {"post": _op(
            "add_prompt_template_version", "Store the next version", "admin", _ADMIN,
            _ok(_ref("PromptTemplate"), status="201"), params=(name,),
            body=_body(_ref("PromptTemplateVersionRequest")))},
        base + "/{name}/versions/{version}": {"delete": _op(
            "delete_prompt_template_version", "Delete one version", "admin", _ADMIN, gone,
            params=(name, version))},
    }


# -- the document -------------------------------------------------------------------------------

def _components() -> Schema:
    rid = {"X-Request-ID": {"description": "the request id (given or generated)",
                            "schema": {"type": "string"}}}
    return {
        "schemas": COMPONENT_SCHEMAS,
        "responses": {
            "Error": {"description": "error: a stable `code`, the message and the request id",
                      "headers": rid, "content": {_JSON: {"schema": _ref("Error")}}},
            "KServeError": {"description": "KServe error: `error` is the message string",
                            "headers": rid, "content": {_JSON: {"schema": _ref("KServeError")}}}},
        "parameters": {"RequestId": _param(
            "X-Request-ID", "header", {"type": "string", "maxLength": 128},
            "echoed in the response and the request log; generated when absent")},
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key or an admin session JWT"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
    }


def document() -> Schema:
    """The OpenAPI description of every route create_app registers."""
    paths: dict[str, Schema] = {}
    for part in (_kserve_paths(), _openai_paths(), _vision_paths(), _batch_paths(),
                 _admin_paths()):
        paths.update(part)
    from frontends.http.images import openapi_paths as image_paths
    paths.update(image_paths())
    from frontends.http.compat.docs import compat_paths   # imports the route modules
    paths.update(compat_paths())
    # A deep copy: the parts share module-level schemas, and tools edit documents in place.
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": "Ferry", "version": __version__,
                 "description": "KServe v2, OpenAI-compatible, batch and admin APIs. Limits: "
                 f"n <= {MAX_N}, stop <= {MAX_STOPS} x {MAX_STOP_CHARS} chars, "
                 f"{MAX_PROMPTS} prompts, {MAX_EMBED_INPUTS} embedding inputs; datatypes "
                 f"{', '.join(KSERVE_TO_NUMPY)}."},
        "servers": [{"url": "/"}],
        "security": _INFER,
        "paths": paths,
        "components": _components(),
    })
