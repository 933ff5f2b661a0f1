"""Hypothesis against a running daemon: random bodies, headers and paths on Ferry's own routes.

Whatever arrives, the answer is a 2xx or a 4xx with the JSON error shape, never a 5xx, and no
process dies. (frontends/http/kserve_codec.parse_infer is fuzzed directly in
tests/unit/test_kserve_codec.py; this drives every route's parser through real HTTP.)
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Routes whose bodies are parsed. Left out on purpose: repository load/unload and shm
# unregister, which would legitimately change what the other examples run against.
POST_ROUTES = ["/v2/models/digits/infer", "/v2/models/digits/versions/1/infer",
               "/v2/models/minilm/infer", "/v2/models/nope/infer",
               "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
               "/v1/models/digits/predict", "/v2/systemsharedmemory/region/fz/register",
               "/v2/repository/index", "/v1/batches", "/admin/login"]
GET_ROUTES = ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/digits",
              "/v2/models/digits/config", "/v2/models/digits/ready", "/v1/models",
              "/v1/models/minilm", "/healthz", "/readyz", "/metrics", "/v1/ws",
              "/v2/systemsharedmemory/status", "/admin/system", "/admin/requests",
              "/v1/batches"]
SEGMENTS = ["v1", "v2", "models", "digits", "minilm", "versions", "1", "0", "-1", "infer",
            "ready", "config", "chat", "completions", "embeddings", "predict", "..", "%2e%2e",
            "admin", "metrics", "", "x" * 300, "%00", "ü", "{model}"]

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 64), 2 ** 64),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(
        ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "n",
         "stream", "stop", "role", "content", "inputs", "name", "datatype", "shape", "data",
         "parameters", "outputs", "key", "offset", "byte_size", "encoding_format", "seed",
         "logprobs", "username", "password", "requests", "binary_data_size"]) | st.text(max_size=6),
        inner, max_size=5)), max_leaves=16)

# Bodies near enough to valid that the parsers get past their first check.
_openai = st.fixed_dictionaries({
    "model": st.sampled_from(["digits", "minilm", "nope", ""]) | st.text(max_size=8),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(
        ["user", "system", "assistant", "tool", "x"]), "content": _scalar}), max_size=3),
    "prompt": _json, "input": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20),
                                                                       max_size=3), _json),
    "max_tokens": _scalar, "temperature": _scalar, "stream": _scalar, "n": _scalar})
_kserve = st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["pixels", "input_ids", "attention_mask", "x"]),
    "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "nope"]),
    "shape": st.lists(st.integers(-2, 70), max_size=3),
    "data": _json}), max_size=2), "parameters": _json})

_body = st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                  _openai.map(lambda v: json.dumps(v).encode()),
                  _kserve.map(lambda v: json.dumps(v).encode()))
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
_headers = st.dictionaries(
    st.sampled_from(["Content-Type", "X-Request-ID", "Inference-Header-Content-Length",
                     "Authorization", "X-API-Key", "Accept", "Content-Encoding", "Origin",
                     "Transfer-Encoding-X", "Connection", "Expect-X"]),
    st.one_of(_header_value, st.sampled_from(
        ["application/json", "application/octet-stream", "multipart/form-data; boundary=zz",
         "gzip", "deflate", "br", "Bearer x", "-1", "0", "99999999999999999999", "text/plain"])),
    max_size=4)


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "minilm")),
               workers=1).start()
    pids = sorted([d.proc.pid, *d.child_pids("")])
    yield d, pids
    alive = sorted([d.proc.pid, *d.child_pids("")])
    code = d.stop()
    assert alive == pids, "a process died or was restarted during the fuzzing"
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _send(d: Daemon, method: str, path: str, body: bytes | None,
          headers: dict[str, str]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def _check(d: Daemon, method: str, path: str, body: bytes | None,
           headers: dict[str, str]) -> None:
    status, ctype, raw = _send(d, method, path, body, headers)
    assert status < 500, (status, method, path, body[:200] if body else body, headers, raw[:300])
    if status >= 400 and not ctype.startswith("application/json"):
        # aiohttp's HTTP parser refused the message itself (e.g. a deflate body that does not
        # inflate) before any route ran: a plain 400 is all HTTP allows there.
        assert status == 400, (status, raw[:200])
    elif status >= 400 and raw:
        err = json.loads(raw)
        code = err.get("code") or err["error"]["code"]   # KServe and OpenAI shapes
        assert isinstance(code, str) and code, raw


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), body=_body, headers=_headers)
def test_fuzz_post_bodies_and_headers(ferry, route, body, headers):
    _check(ferry[0], "POST", route, body, headers)


@FUZZ
@given(route=st.sampled_from(GET_ROUTES),
       query=st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3),
       headers=_headers)
def test_fuzz_get_queries_and_headers(ferry, route, query, headers):
    headers = {k: v for k, v in headers.items() if k != "Connection"}   # keep /v1/ws a GET
    _check(ferry[0], "GET", route + "?" + urllib.parse.urlencode(query), None, headers)


@FUZZ
@given(segments=st.lists(st.sampled_from(SEGMENTS) | st.text(max_size=10), min_size=1,
                         max_size=6),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       body=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_paths_and_methods(ferry, segments, method, body):
    path = "/" + "/".join(urllib.parse.quote(s, safe="%{}") for s in segments)
    if any(s in ("load", "unload", "unregister") for s in segments):
        return
    _check(ferry[0], method, path, body, {})


def test_still_serving_after_the_fuzzing(ferry):
    d, _ = ferry
    good = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}
    status, _, raw = _send(d, "POST", "/v2/models/digits/infer", json.dumps(good).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, raw
    assert http_get(d.url + "/readyz")[0] == 200
    assert "unhandled error" not in d.log()
    assert os.path.isdir(d.runtime_dir / "metrics")
