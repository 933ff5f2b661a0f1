"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of Ferry's request and response bodies.

frontends/http/openapi.py puts them under `components.schemas`. Request schemas carry the
bounds the parsers enforce (imported from them), so a body that validates is one the parser
accepts, apart from what only the model can tell (its tensor names, context length, vocabulary);
fields the server does not serve are documented with their only accepted value.
"""
from __future__ import annotations

from typing import Any

from frontends.http.batch_runner import IMAGES_URL, INFER_URL, TEXT_URLS
from daemon.state.keys import SCOPES
from frontends.http.kserve_codec import KSERVE_TO_NUMPY, MAX_TENSORS
from frontends.http.openai_schema import (MAX_EMBED_INPUTS, MAX_N, MAX_PROMPTS, MAX_STOP_CHARS,
                                          MAX_STOPS)

__all__ = ["COMPONENT_SCHEMAS"]

Schema = dict[str, Any]
_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_NUM: Schema = {"type": "number"}
_BOOL: Schema = {"type": "boolean"}
_OBJ: Schema = {"type": "object"}
_I31 = 2**31 - 1
_TOKEN: Schema = {"type": "integer", "minimum": 0, "maximum": _I31}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: Schema, required: tuple[str, ...] = (), closed: bool = False,
         dependent: Schema | None = None) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    if dependent:
        out["dependentSchemas"] = dependent
    return out


def _list(items: Schema, lo: int = 0, hi: int | None = None) -> Schema:
    out: Schema = {"type": "array", "items": items}
    if lo:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return out


def _range(kind: str, lo: float, hi: float, *, open_lo: bool = False) -> Schema:
    low = {"exclusiveMinimum": lo} if open_lo else {"minimum": lo}
    return {"type": kind, **low, "maximum": hi}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


# -- errors -------------------------------------------------------------------------------------

_ERRORS: dict[str, Schema] = {
    "Error": _obj({"error": _obj({
        "code": _STR, "message": _STR, "type": _STR, "param": _nullable(_STR),
        "request_id": _STR, "retry_after": _INT}, ("code", "message", "type", "request_id"))},
        ("error",)),
    "KServeError": _obj({"error": _STR, "code": _STR, "message": _STR, "request_id": _STR},
                        ("error", "code", "message", "request_id")),
}

# -- KServe v2 ----------------------------------------------------------------------------------

_SHM_PARAMS: Schema = {"shared_memory_region": {"type": "string", "minLength": 1,
                                                "maxLength": 199},
                       "shared_memory_byte_size": _range("integer", 0, 2**63 - 1),
                       "shared_memory_offset": _range("integer", 0, 2**63 - 1)}
_TENSOR_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 255}
_TENSOR_META = _obj({"name": _STR, "datatype": _STR, "shape": _list(_INT)},
                    ("name", "datatype", "shape"))

_KSERVE: dict[str, Schema] = {
    "ServerMetadata": _obj({"name": _STR, "version": _STR, "extensions": _list(_STR)},
                           ("name", "version", "extensions")),
    "ModelMetadata": _obj({"name": _STR, "versions": _list(_STR), "platform": _STR,
                           "inputs": _list(_TENSOR_META), "outputs": _list(_TENSOR_META)},
                          ("name", "versions", "platform", "inputs", "outputs")),
    "InferInput": _obj({
        "name": _TENSOR_NAME,
        # BYTES is KServe's but not served here (400 invalid_dtype).
        "datatype": {"type": "string", "enum": list(KSERVE_TO_NUMPY)},
        "shape": _list({"type": "integer", "minimum": 0}, hi=16),
        "data": {"type": "array", "description": "row-major values, flat or nested"},
        "parameters": _obj({"binary_data_size": {"type": "integer", "minimum": 0},
                            **_SHM_PARAMS})},
        ("name", "datatype", "shape")) | {"anyOf": [   # the values come from one of three places
            {"required": ["data"]},
            {"required": ["parameters"], "properties": {"parameters": {"anyOf": [
                {"required": ["binary_data_size"]},
                {"required": ["shared_memory_region", "shared_memory_byte_size"]}]}}}]},
    "InferOutputRequest": _obj({"name": _TENSOR_NAME,
                                "parameters": _obj({
                                    "binary_data": _BOOL, **_SHM_PARAMS,
                                    "classification": {
                                        "type": "integer", "minimum": 0,
                                        "description": "top-k classes as BYTES "
                                                       "\"score:index[:label]\""}})},
                               ("name",)),
    "InferRequest": _obj({
        "id": _STR,
        "parameters": _obj({"binary_data_output": _BOOL,
                            "timeout": {"type": "integer", "minimum": 0,
                                        "description": "microseconds; 0: the server's"}}),
        "inputs": _list(_ref("InferInput"), lo=1, hi=MAX_TENSORS),
        "outputs": _list(_ref("InferOutputRequest"), hi=MAX_TENSORS)}, ("inputs",)),
    "InferResponse": _obj({
        "model_name": _STR, "model_version": _STR, "id": _STR,
        "outputs": _list(_obj({"name": _STR, "datatype": _STR, "shape": _list(_INT),
                               "data": {"type": "array"}, "parameters": _OBJ},
                              ("name", "datatype", "shape")))},
        ("model_name", "model_version", "outputs")),
    "ShmRegion": _obj({"name": _STR, "key": _STR, "offset": _INT, "byte_size": _INT},
                      ("name", "key", "offset", "byte_size")),
    "ShmRegisterRequest": _obj({"key": {**_STR, "description": "POSIX shared-memory name"},
                                "offset": _range("integer", 0, 2**63 - 1),
                                "byte_size": _range("integer", 1, 2**63 - 1)},
                               ("key", "byte_size")),
    "RepositoryEntry": _obj({"name": _STR, "version": _STR, "state": _STR, "reason": _STR},
                            ("name",)),
    "Health": _obj({"status": _STR}, ("status",)),
    "Ready": _obj({"status": _STR, "models": {"type": "object", "additionalProperties": _OBJ},
                   "errors": {"type": "object", "additionalProperties": _OBJ,
                              "description": "per model, per failed version: why it failed"}},
                  ("status", "models")),
}

# -- OpenAI-compatible --------------------------------------------------------------------------

_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_GENERATION: Schema = {
    "model": {"type": "string", "minLength": 1, "maxLength": 256,
              "description": "a model name or `name:version`"},
    "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": _I31}),
    "temperature": _range("number", 0, 2),
    "top_p": _range("number", 0, 1, open_lo=True),
    "top_k": _range("integer", -1, _I31),
    "min_p": _range("number", 0, 1),
    "repetition_penalty": _range("number", 0, 10, open_lo=True),
    "presence_penalty": _range("number", -2, 2),
    "frequency_penalty": _range("number", -2, 2),
    "seed": _nullable(_range("integer", -(2**63), 2**64 - 1)),
    "n": _range("integer", 1, MAX_N),
    "stop": {"anyOf": [_STOP, _list(_STOP, hi=MAX_STOPS), {"type": "null"}]},
    "stop_token_ids": _list(_TOKEN),
    "ignore_eos": _BOOL,
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1,
                   "description": "EOS and stop_token_ids cannot end the output before this "
                                  "many tokens; at most max_tokens (vLLM's extension)"},
    "deterministic": _BOOL,
    "stream": _BOOL,
    "stream_options": {**_obj({"include_usage": _BOOL, "resumable": _BOOL}),
                       "description": "only with `stream: true`; `resumable`: the stream "
                                      "survives a dropped connection (resume with "
                                      "Last-Event-ID or GET /v1/streams/{id})"},
    "user": {"type": "string", "maxLength": 256},
    "logit_bias": {"type": "object", "maxProperties": 0, "description": "not supported"},
}
# `stream_options` needs `stream: true` (a dependency the properties alone cannot say).
_STREAM_OPTIONS_NEED_STREAM: Schema = {"stream_options": {
    "required": ["stream"], "properties": {"stream": {"const": True}}}}
_TEXT_PART = _obj({"type": {"type": "string", "enum": ["text"]}, "text": _STR},
                  ("type", "text"))
_MESSAGE = _obj({"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                 "content": {"anyOf": [_STR, _list(_TEXT_PART)]}, "name": _STR},
                ("role", "content"))
_USAGE = _obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
              ("prompt_tokens", "total_tokens"))
_COMPLETION_HEAD: Schema = {"id": _STR, "object": _STR, "created": _INT, "model": _STR,
                            "system_fingerprint": _STR, "usage": _USAGE}


# Structured outputs (frontends/http/structured.py). Any JSON schema is accepted; the document
# shows a flat object schema. vLLM's structured_outputs and guided_* fields are described in
# README (their regexes and grammars have no JSON-schema form to generate from).
_FLAT_SCHEMA = _obj({"type": {"type": "string", "enum": ["object"]},
                     "properties": {"type": "object", "additionalProperties": _obj(
                         {"type": {"type": "string",
                                   "enum": ["string", "integer", "number", "boolean"]}},
                         ("type",), closed=True)}}, ("type",), closed=True)
_RESPONSE_FORMAT: Schema = {"anyOf": [
    _obj({"type": {"type": "string", "enum": ["text", "json_object"]}}, ("type",)),
    _obj({"type": {"type": "string", "enum": ["json_schema"]},
          "json_schema": _obj({"name": _STR, "strict": _BOOL, "schema": _FLAT_SCHEMA},
                              ("schema",))}, ("type", "json_schema"))],
    "description": "constrain the output to JSON (a JSON schema when json_schema)"}


def _texts(item: Schema, hi: int) -> Schema:
    """A string, strings, token ids, or lists of token ids (the `prompt`/`input` forms)."""
    return {"anyOf": [item, _list(item, lo=1, hi=hi), _list(_TOKEN, lo=1),
                      _list(_list(_TOKEN, lo=1), lo=1, hi=hi)]}


# A stored prompt template (frontends/http/prompt_templates.py), rendered into the request.
_TEMPLATE_NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}
_PROMPT_TEMPLATE = {**_obj({
    "name": _TEMPLATE_NAME, "version": _range("integer", 1, 2**63 - 1),
    "variables": {"type": "object", "description": "the template's variables (JSON values)"},
    "role": {"type": "string", "enum": ["user", "system", "assistant"]}}, ("name",),
    closed=True), "description": "render the stored template `name` (the latest version unless "
                                 "`version`) with `variables` and append it to `messages` as a "
                                 "message of `role` (default user)"}

_OPENAI: dict[str, Schema] = {
    "ChatCompletionRequest": _obj({
        **_GENERATION,
        "messages": _list(_MESSAGE, lo=1),
        "prompt_template": _PROMPT_TEMPLATE,
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": _I31}),
        "logprobs": _BOOL,
        "top_logprobs": {**_range("integer", 0, 20),
                         "description": "alternatives per token; needs logprobs: true"},
        "response_format": _RESPONSE_FORMAT},
        ("model", "messages"), dependent={**_STREAM_OPTIONS_NEED_STREAM, "top_logprobs": {
            "required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}),
    "CompletionRequest": _obj({
        **_GENERATION,
        "prompt": _texts(_STR, MAX_PROMPTS),
        "echo": _BOOL,
        "logprobs": {**_nullable(_range("integer", 0, 5)),
                     "description": "the sampled tokens' logprobs and this many alternatives"},
        "suffix": {"type": "string", "maxLength": 0, "description": "not supported"},
        "response_format": _RESPONSE_FORMAT},
        ("model", "prompt"), dependent=_STREAM_OPTIONS_NEED_STREAM) | {
            "description": "`prompt_template` (as on chat, without `role`) may replace "
                           "`prompt`: the rendered template is the prompt"},
    "EmbeddingRequest": _obj({
        "model": _GENERATION["model"], "input": _texts(_STR, MAX_EMBED_INPUTS),
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {**_INT, "description": "only the model's own width"},
        "user": _GENERATION["user"]}, ("model", "input")),
    "ChatCompletion": _obj({**_COMPLETION_HEAD, "choices": _list(_obj({
        "index": _INT, "message": _obj({"role": _STR, "content": _STR}),
        "logprobs": _nullable(_OBJ), "finish_reason": _nullable(_STR)}))},
        ("id", "object", "choices")),
    "Completion": _obj({**_COMPLETION_HEAD, "choices": _list(_obj({
        "index": _INT, "text": _STR, "logprobs": _nullable(_OBJ),
        "finish_reason": _nullable(_STR)}))}, ("id", "object", "choices")),
    "EmbeddingList": _obj({
        "object": _STR, "model": _STR, "usage": _USAGE,
        "data": _list(_obj({"object": _STR, "index": _INT,
                            "embedding": {"anyOf": [_list(_NUM), _STR]}}))},
        ("object", "data", "model")),
    "Model": _obj({"id": _STR, "object": _STR, "created": _INT, "owned_by": _STR,
                   "version": _INT, "kind": _STR, "max_model_len": _nullable(_INT)},
                  ("id", "object")),
    "ModelList": _obj({"object": _STR, "data": _list(_ref("Model"))}, ("object", "data")),
    "Prediction": _obj({
        "model": _STR, "model_version": _STR, "model_id": _nullable(_STR), "request_id": _STR,
        "predictions": _list(_obj({"label": _STR, "index": _INT, "score": _NUM})),
        "outputs": _OBJ}, ("model", "model_version")),
}

# -- batches ------------------------------------------------------------------------------------

_BATCH_URL = {"anyOf": [{"type": "string", "enum": [*TEXT_URLS, IMAGES_URL]},
                        {"type": "string", "pattern": f"^{INFER_URL.pattern}$"}]}
_BATCHES: dict[str, Schema] = {
    "BatchItem": {**_obj({"custom_id": _STR, "method": {"type": "string", "enum": ["POST"]},
                          "url": _BATCH_URL, "body": _OBJ}),
                  "description": "an OpenAI batch line, or (with `endpoint`) a request body "
                                 "plus `custom_id`"},
    "BatchCreateRequest": _obj({
        "requests": _list(_ref("BatchItem"), lo=1),
        "endpoint": _BATCH_URL,
        "webhook_url": {"type": "string", "pattern": "^https?://[^/?#]+"},
        "webhook_secret": {"type": "string", "minLength": 1, "maxLength": 256,
                           "description": "generated (and shown once) when omitted"},
        "metadata": {**_OBJ, "description": "keys must not start with _ferry"},
        "completion_window": _STR},
        ("requests",), closed=True) | {"dependentRequired": {"webhook_secret": ["webhook_url"]}},
    "Batch": _obj({
        "id": _STR, "object": _STR, "endpoint": _STR, "model": _nullable(_STR), "status": _STR,
        "ferry_status": _STR, "request_counts": _OBJ, "counts": _OBJ,
        "metadata": _nullable(_OBJ), "owner": _nullable(_STR), "webhook_url": _nullable(_STR),
        "webhook_secret": _STR, "created_at": _INT, "completed_at": _nullable(_INT),
        "results_url": _STR}, ("id", "object", "status")),
    "BatchList": _obj({"object": _STR, "data": _list(_ref("Batch")),
                       "next_cursor": _nullable(_STR), "has_more": _BOOL}, ("object", "data")),
    "BatchResults": _obj({
        "object": _STR, "has_more": _BOOL, "next_after": _nullable(_INT),
        "data": _list(_obj({"id": _STR, "index": _INT, "custom_id": {}, "status": _STR,
                            "response": {}, "error": {}}))}, ("object", "data")),
}

# -- admin --------------------------------------------------------------------------------------

_SCOPE = {"type": "string", "enum": sorted(SCOPES)}
_NAMES = _list({"type": "string", "minLength": 1}, lo=1)
_LIMIT = {**_range("integer", 1, 2**63 - 1), "description": "omitted: no limit"}
_API_KEY: Schema = {
    "id": _STR, "name": _STR, "prefix": _STR, "scopes": _list(_STR),
    "models": _nullable({"type": "array", "items": _STR}), "rpm": _nullable(_INT),
    "tpm": _nullable(_INT), "max_concurrent": _nullable(_INT), "expires_at": _nullable(_NUM),
    "allow_ips": _list(_STR), "created_at": _NUM, "rotated_at": _nullable(_NUM),
    "revoked_at": _nullable(_NUM)}
_ADMIN: dict[str, Schema] = {
    "LoginRequest": _obj({"username": _STR, "password": _STR,
                          "scopes": _list(_SCOPE, lo=1),
                          "ttl_s": _range("integer", 1, 7 * 24 * 3600)},
                         ("username", "password")),
    "LoginResponse": _obj({"access_token": _STR, "token_type": _STR, "expires_in": _INT,
                           "scopes": _list(_STR)}, ("access_token", "token_type")),
    "ApiKeyCreateRequest": _obj({
        "name": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"\S"},
        "scopes": {"anyOf": [_SCOPE, _list(_SCOPE, lo=1)]},
        "models": {"anyOf": [{"type": "string", "minLength": 1},
                             {**_NAMES, "maxItems": 256}]},
        "rpm": _LIMIT, "tpm": _LIMIT, "max_concurrent": _LIMIT,
        "expires": {"anyOf": [{"type": "string", "description": "30d, 12h, ISO 8601"}, _NUM]},
        "expires_at": {"anyOf": [_STR, _NUM]},
        "allow_ips": _list({"type": "string", "description": "IP address or CIDR network"})},
        ("name",), closed=True),
    "ApiKey": _obj(_API_KEY, ("id", "name", "scopes")),
    "CreatedApiKey": _obj({**_API_KEY, "api_key": _STR}, ("id", "api_key")),
    "ApiKeyList": _obj({"object": _STR, "data": _list(_ref("ApiKey"))}, ("object", "data")),
    "RequestLog": _obj({"object": _STR, "data": _list(_OBJ), "next_cursor": _nullable(_STR)},
                       ("object", "data")),
    "PromptTemplateCreateRequest": _obj({
        "name": _TEMPLATE_NAME, "template": {"type": "string", "minLength": 1,
                                             "description": "Jinja source (sandboxed)"},
        "description": {"type": "string", "maxLength": 1024}}, ("name", "template"),
        closed=True),
    "PromptTemplateVersionRequest": _obj({
        "template": {"type": "string", "minLength": 1},
        "description": {"type": "string", "maxLength": 1024}}, ("template",), closed=True),
    "PromptTemplate": _obj({"name": _STR, "version": _INT, "template": _STR,
                            "description": _nullable(_STR), "created_at": _NUM,
                            "versions": _list(_INT)}, ("name", "version", "template")),
    "CustomMetricRequest": _obj({
        "name": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]{0,199}$",
                 "description": "Prometheus name; not ferry_/vllm:/vllm_/process_/python_, "
                                "not ending in _total/_created/_bucket/_count/_sum/_info"},
        "value": {"type": "number", "description": "a gauge's value; a counter's increment "
                                                   "(>= 0)"},
        "type": {"type": "string", "enum": ["gauge", "counter"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string",
                                                              "maxLength": 256}},
        "help": {"type": "string", "maxLength": 256}}, ("name", "value", "type"), closed=True),
    "CustomMetricSeries": _obj({"name": _STR, "type": _STR, "labels": _OBJ, "value": _NUM,
                                "help": _STR}, ("name", "type", "value")),
    "Traces": _obj({"traces": _list(_obj({
        "trace_id": _STR, "span_id": _STR, "parent_span_id": _nullable(_STR),
        "operation_name": _STR, "start_time": {"type": "string", "format": "date-time"},
        "duration_ms": _NUM, "status": {"type": "string", "enum": ["ok", "error"]},
        "attributes": _OBJ}, ("trace_id", "span_id", "operation_name", "start_time",
                              "duration_ms", "status")))}, ("traces",)),
    "CustomMetricList": _obj({"object": _STR, "data": _list(_ref("CustomMetricSeries"))},
                             ("object", "data")),
    "PromptTemplateList": _obj({"object": _STR, "data": _list(_obj({
        "name": _STR, "latest_version": _INT, "versions": _list(_INT), "created_at": _NUM,
        "updated_at": _NUM}, ("name", "latest_version")))}, ("object", "data")),
}

COMPONENT_SCHEMAS: dict[str, Schema] = {**_ERRORS, **_KSERVE, **_OPENAI, **_BATCHES, **_ADMIN}
