"""The seeds' routes in Ferry's OpenAPI document (frontends/http/openapi.py merges
`compat_paths()`): every route at /compat/<seed>/ and the ones mounted at the root, with the
request bodies the seed documents and the security of the Ferry route each one serves."""
from __future__ import annotations

from typing import Any

from frontends.http.compat import mounted, prefix

__all__ = ["compat_paths"]

Schema = dict[str, Any]
_OPEN: list[Schema] = []
_INFER: list[Schema] = [{"bearer": []}, {"apiKey": []}, {}]
_ADMIN: list[Schema] = [{"bearer": []}, {"apiKey": []}]
_JSON = "application/json"
_STR: Schema = {"type": "string"}
_NESTR: Schema = {"type": "string", "minLength": 1}
_INT: Schema = {"type": "integer"}
_NUM: Schema = {"type": "number"}
_SAMPLING: Schema = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1}}


def _obj(props: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": props, "required": list(required)}


_INFERNO_TEXT = _obj({"model": _NESTR, "prompt": _NESTR, **_SAMPLING,
                      "top_k": {"type": "integer", "minimum": -1},
                      "repeat_penalty": {"type": "number", "exclusiveMinimum": 0,
                                         "maximum": 10},
                      "stop": {"type": "array", "items": _NESTR, "maxItems": 4},
                      "stream": {"type": "boolean"}}, ("model", "prompt"))
_BACKEND_ITEM = _obj({"text": _NESTR, "model": {"type": "string",
                                                 "enum": ["summarizer", "sentiment",
                                                          "generator"]},
                      "version": {"type": "string", "enum": ["v1"]},
                      "parameters": _obj({"max_length": {"type": "integer", "minimum": 1},
                                          "min_length": {"type": "integer", "minimum": 0},
                                          "num_return_sequences": {"type": "integer",
                                                                   "enum": [1]}})},
                     ("text",))
_API_INFER = _obj({"id": _NESTR, "model_id": _NESTR,
                   "prompt": {"type": "string", "minLength": 1, "maxLength": 1000},
                   "negative_prompt": _STR,
                   "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 150},
                   "guidance_scale": {"type": "number", "minimum": 1, "maximum": 20},
                   "width": {"type": "integer", "minimum": 256, "maximum": 1024},
                   "height": {"type": "integer", "minimum": 256, "maximum": 1024},
                   "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                   "num_images": {"type": "integer", "minimum": 1, "maximum": 4}},
                  ("id", "model_id", "prompt"))
_IMAGE = {"type": "string", "format": "binary"}
_UPLOAD = {"multipart/form-data": {"schema": _obj({"image": _IMAGE, "file": _IMAGE})}}
_MODEL_UPLOAD = {"multipart/form-data": {"schema": _obj({
    "model.toml": _IMAGE, "config": _IMAGE, "weights": _IMAGE, "archive": _IMAGE})}}

# (seed, method, path) -> (summary, security, body content or None)
_DOCS: dict[tuple[str, str, str], tuple[str, list[Schema], Schema | None]] = {
    ("cinfer", "POST", "/api/v1/inference/{model}"): (
        "Cinfer: image inference (multipart `image`)", _INFER, _UPLOAD),
    ("cinfer", "GET", "/api/v1/models"): ("Cinfer: ready models", _INFER, None),
    ("cinfer", "POST", "/api/v1/internal/auth"): (
        "Cinfer: admin login (X-Auth-Token)", _OPEN,
        {_JSON: {"schema": _obj({"username": _STR, "password": _STR},
                                ("username", "password"))}}),
    ("cinfer", "GET", "/api/v1/internal/auth"): ("Cinfer: the calling credential", _ADMIN,
                                                 None),
    ("cinfer", "GET", "/api/v1/internal/system"): ("Cinfer: host resources", _ADMIN, None),
    ("cinfer", "GET", "/api/v1/internal/models"): ("Cinfer: model placement", _ADMIN, None),
    ("cinfer", "POST", "/api/v1/internal/models/{name}/versions"): (
        "Cinfer: upload a model version", _ADMIN, _MODEL_UPLOAD),
    ("cinfer", "GET", "/api/v1/internal/tokens"): ("Cinfer: API keys", _ADMIN, None),
    ("cinfer", "POST", "/api/v1/internal/tokens"): (
        "Cinfer: create an API key", _ADMIN,
        {_JSON: {"schema": _obj({"name": _NESTR, "scopes": {"type": "array",
                                                            "items": _STR}}, ("name",))}}),
    ("cinfer", "GET", "/api/v1/internal/tokens/{key_id}"): ("Cinfer: one API key", _ADMIN,
                                                            None),
    ("cinfer", "DELETE", "/api/v1/internal/tokens/{key_id}"): ("Cinfer: revoke a key", _ADMIN,
                                                               None),
    ("cinfer", "POST", "/api/v1/internal/tokens/{key_id}/rotate"): (
        "Cinfer: rotate a key", _ADMIN, None),
    ("backend", "GET", "/health"): ("AI Inference Backend: health", _OPEN, None),
    ("backend", "GET", "/models"): ("AI Inference Backend: task models", _INFER, None),
    ("backend", "POST", "/infer"): ("AI Inference Backend: summarize, sentiment, generate",
                                    _INFER, {_JSON: {"schema": _BACKEND_ITEM}}),
    ("backend", "POST", "/infer/batch"): (
        "AI Inference Backend: several requests", _INFER,
        {_JSON: {"schema": _obj({"requests": {"type": "array", "items": _BACKEND_ITEM,
                                              "minItems": 1, "maxItems": 32}},
                                ("requests",))}}),
    ("api", "GET", "/"): ("AI Inference API: about", _OPEN, None),
    ("api", "GET", "/v1"): ("AI Inference API: v1", _OPEN, None),
    ("api", "GET", "/health"): ("AI Inference API: health", _OPEN, None),
    ("api", "GET", "/v1/health"): ("AI Inference API: health", _OPEN, None),
    ("api", "GET", "/v1/models"): ("AI Inference API: model files by SHA-256", _INFER, None),
    ("api", "GET", "/v1/models/{model}"): ("AI Inference API: one model file", _INFER, None),
    ("api", "POST", "/infer"): ("AI Inference API: image generation (400 "
                                "image_generation_unavailable)", _INFER,
                                {_JSON: {"schema": _API_INFER}}),
    ("api", "POST", "/v1/infer"): ("AI Inference API: image generation (400 "
                                   "image_generation_unavailable)", _INFER,
                                   {_JSON: {"schema": _API_INFER}}),
    ("gateway", "POST", "/api/v1/inference"): (
        "Inference Gateway: text generation", _INFER,
        {_JSON: {"schema": _obj({"text": _NESTR, **_SAMPLING, "model": _NESTR,
                                 "prompt_template": {"anyOf": [_NESTR, {"type": "object"}]}},
                                ("text",))}}),
    ("gateway", "GET", "/transactions"): ("Inference Gateway: stored transactions", _INFER,
                                          None),
    ("gateway", "POST", "/transactions"): (
        "Inference Gateway: store a transaction", _INFER,
        {_JSON: {"schema": _obj({"transaction": _obj(
            {"prompt": _STR, "response": _STR, "model_name": _STR},
            ("prompt", "response", "model_name"))}, ("transaction",))}}),
    ("inferno", "POST", "/inference"): ("Inferno: completion", _INFER,
                                        {_JSON: {"schema": _INFERNO_TEXT}}),
    ("inferno", "POST", "/inference/stream"): ("Inferno: streamed completion (SSE)", _INFER,
                                               {_JSON: {"schema": _INFERNO_TEXT}}),
    ("inferno", "POST", "/embeddings"): (
        "Inferno: embeddings", _INFER,
        {_JSON: {"schema": _obj({"model": _NESTR, "input": {"anyOf": [
            _NESTR, {"type": "array", "items": _NESTR, "minItems": 1}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]}},
            ("model", "input"))}}),
    ("inferno", "POST", "/batch"): (
        "Inferno: batch job", _INFER,
        {_JSON: {"schema": _obj({"model": _NESTR, "requests": {"type": "array", "minItems": 1,
                                                               "items": _obj({"id": _STR,
                                                                              "prompt": _NESTR},
                                                                             ("prompt",))},
                                 "max_tokens": {"type": "integer", "minimum": 1},
                                 "webhook_url": _STR}, ("model", "requests"))}}),
    ("inferno", "GET", "/batch/{batch_id}"): ("Inferno: batch status", _INFER, None),
    ("inferno", "GET", "/batch/{batch_id}/results"): ("Inferno: batch results", _INFER, None),
    ("inferno", "GET", "/models"): ("Inferno: models", _INFER, None),
    ("inferno", "POST", "/models/{model}/load"): (
        "Inferno: load a model (explicit control mode)", _ADMIN,
        {_JSON: {"schema": _obj({"gpu_layers": {"type": "integer", "minimum": 0},
                                 "context_size": {"type": "integer", "minimum": 0},
                                 "batch_size": {"type": "integer", "minimum": 0}})}}),
    ("inferno", "POST", "/models/{model}/unload"): ("Inferno: unload a model", _ADMIN, None),
    ("inferno", "GET", "/health"): ("Inferno: health", _OPEN, None),
    ("inferno", "GET", "/ws"): ("Inferno: the /v1/ws protocol", _INFER, None),
}


def _op(op_id: str, summary: str, security: list[Schema], path: str,
        body: Schema | None) -> Schema:
    error = {"$ref": "#/components/responses/Error"}
    params: list[Schema] = [{"$ref": "#/components/parameters/RequestId"}]
    for name in ("model", "name", "key_id", "batch_id"):
        if "{" + name + "}" in path:
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string", "minLength": 1}})
    op: Schema = {"operationId": op_id, "summary": summary, "tags": ["compat"],
                  "security": security, "parameters": params,
                  "responses": {"200": {"description": "the seed's response",
                                        "content": {_JSON: {"schema": {"type": "object"}}}},
                                "4XX": error, "5XX": error}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return op


def _op_id(seed: str, method: str, path: str, root: bool) -> str:
    words = "".join(c if c.isalnum() else "_" for c in path).strip("_") or "root"
    return f"compat_{seed}_{method.lower()}_{words}" + ("_at_root" if root else "")


def compat_paths() -> dict[str, Schema]:
    paths: dict[str, Schema] = {}
    for (seed, method, path), (summary, security, body) in _DOCS.items():
        full = prefix(seed) + path
        paths.setdefault(full, {})[method.lower()] = _op(
            _op_id(seed, method, path, False), summary, security, full, body)
    for seeds, method, path in mounted():
        docs = [_DOCS[(seed, method, path)] for seed in seeds]
        summary = docs[0][0] if len(docs) == 1 else \
            f"{' or '.join(d[0] for d in docs)} (decided as frontends/http/compat says)"
        bodies = [d[2][_JSON]["schema"] for d in docs if d[2] is not None and _JSON in d[2]]
        body = docs[0][2] if len(docs) == 1 else \
            ({_JSON: {"schema": {"anyOf": bodies}}} if bodies else None)
        paths.setdefault(path, {})[method.lower()] = _op(
            _op_id("_".join(seeds), method, path, True), summary, docs[0][1], path, body)
    return paths
