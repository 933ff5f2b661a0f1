"""Security end to end against a real `ferry serve` (auth required, 2 HTTP workers, ZMQ on tcp)
with a real SQLite state directory: every refusal on HTTP, WebSocket and ZMQ, JWT sessions,
rate limits shared by the two HTTP processes, the admin API, CORS, file modes, secret-free logs,
and property-based fuzzing of the admin and inference routes."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import jwt as pyjwt
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import FerryError
from daemon.state.jwt_tokens import JwtIssuer
from daemon.state.keys import KeyStore
from frontends.client import FerryClient
from frontends.http import ws as ws_module
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import free_port, orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code, run

pytestmark = pytest.mark.timeout(180)

PASSWORD = "correct horse battery staple"
ORIGIN = "https://app.example"
PIXELS = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                      "data": [0.0] * 64}]}
INFER = "/v2/models/digits/infer"
WRONG = "fy_0123456789ab_" + "A" * 43


def _seed(d: SecureDaemon) -> dict[str, str]:
    """Keys of every kind, a user, made before the daemon starts (as an operator would)."""
    async def make(state) -> dict[str, str]:
        k = state.keys
        keys = {
            "admin": (await k.create("admin", scopes=["infer", "admin"])).plaintext,
            "infer": (await k.create("infer", scopes=["infer"])).plaintext,
            "adminonly": (await k.create("adminonly", scopes=["admin"])).plaintext,
            "ipkey": (await k.create("ip", allow_ips=["10.0.0.0/8"])).plaintext,
            "modelkey": (await k.create("model", models=["minilm"])).plaintext,
            "limited": (await k.create("limited", rpm=20)).plaintext,
            "countdown": (await k.create("countdown", rpm=5)).plaintext,
            "zmqlimited": (await k.create("zmqlimited", rpm=2)).plaintext,
            "wslimited": (await k.create("wslimited", rpm=2)).plaintext,
        }
        revoked = await k.create("revoked")
        await k.revoke(revoked.key.id)
        keys["revoked"] = revoked.plaintext
        # Made valid an hour ago, expired half an hour ago: the store's own clock, set back.
        past = KeyStore(state.db, clock=lambda: time.time() - 3600)
        keys["expired"] = (await past.create("expired", expires_at=time.time() - 1800)).plaintext
        await state.users.create("root", PASSWORD)
        return keys
    return d.state(make)


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    zport = free_port()
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
                     extra_config="[auth]\nrequired = true\n", log_bodies=True,
                     server_extra=f'zmq_bind = "tcp://127.0.0.1:{zport}"\n'
                                  f'cors_origins = ["{ORIGIN}"]\n')
    d.prepare()
    refused = d.cli("serve")        # auth required and no key yet: refuses, says what to do
    assert refused.returncode == 2 and "ferry tokens create" in refused.stderr, refused.stderr
    d.keys = _seed(d)
    made = d.cli("tokens", "create", "--name", "from-cli", "--scopes", "infer",
                 "--models", "digits", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    d.keys["cli"] = made.stdout.strip()
    d.zmq = f"tcp://127.0.0.1:{zport}"
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


# -- HTTP ---------------------------------------------------------------------------------------

REFUSALS = [
    # (key name or literal, method, path, body) -> (status, code)
    (None, "POST", INFER, PIXELS, 401, "missing_credentials"),
    ("literal:" + WRONG, "POST", INFER, PIXELS, 401, "invalid_api_key"),
    ("literal:not-a-key", "GET", "/v1/models", None, 401, "invalid_api_key"),
    ("revoked", "POST", INFER, PIXELS, 401, "key_revoked"),
    ("expired", "POST", INFER, PIXELS, 401, "key_expired"),
    ("adminonly", "POST", INFER, PIXELS, 403, "insufficient_scope"),
    ("infer", "GET", "/admin/tokens", None, 403, "insufficient_scope"),
    ("infer", "POST", "/v2/repository/index", {}, 403, "insufficient_scope"),
    (None, "POST", "/v2/systemsharedmemory/unregister", {}, 401, "missing_credentials"),
    ("ipkey", "POST", INFER, PIXELS, 403, "ip_not_allowed"),
    ("modelkey", "POST", INFER, PIXELS, 403, "model_not_allowed"),
    ("modelkey", "GET", "/v2/models/digits/config", None, 403, "model_not_allowed"),
    ("modelkey", "POST", "/v1/chat/completions",
     {"model": "digits", "messages": [{"role": "user", "content": "hi"}]}, 403,
     "model_not_allowed"),
    ("modelkey", "POST", "/v1/embeddings", {"model": "digits", "input": "x"}, 403,
     "model_not_allowed"),
    ("cli", "POST", "/v1/completions", {"model": "smollm2", "prompt": "x"}, 403,
     "model_not_allowed"),
    (None, "GET", "/no/such/route", None, 401, "missing_credentials"),
]


def _key(ferry, name):
    if name is None:
        return None
    return name[len("literal:"):] if name.startswith("literal:") else ferry.keys[name]


@pytest.mark.parametrize("who,method,path,body,status,code", REFUSALS)
def test_http_refusals_have_stable_codes(ferry, who, method, path, body, status, code):
    got, headers, err = call(ferry, method, path, key=_key(ferry, who), body=body)
    assert (got, error_code(err)) == (status, code), err
    assert headers["X-Request-ID"]


def test_allowed_calls_and_open_routes(ferry):
    for name in ("admin", "infer", "cli"):
        status, _, out = call(ferry, "POST", INFER, key=ferry.keys[name], body=PIXELS)
        assert status == 200 and out["outputs"][0]["name"] == "probabilities", out
    # X-API-Key works as well as Bearer
    status, _, _ = call(ferry, "POST", INFER, body=PIXELS,
                        headers={"X-API-Key": ferry.keys["infer"]})
    assert status == 200
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2",
                 "/get_load"):       # a router's load poll carries no key
        assert call(ferry, "GET", path)[0] == 200, path
    assert call(ferry, "GET", "/no/such/route", key=ferry.keys["infer"])[0] == 404


def test_jwt_sessions_forged_and_expired(ferry):
    status, _, err = call(ferry, "POST", "/admin/login",
                          body={"username": "root", "password": "wrong password"})
    assert (status, error_code(err)) == (401, "invalid_credentials")
    status, _, out = call(ferry, "POST", "/admin/login",
                          body={"username": "root", "password": PASSWORD})
    assert status == 200 and out["token_type"] == "bearer", out
    token = out["access_token"]
    assert call(ferry, "GET", "/admin/tokens", key=token)[0] == 200
    # an admin session is not an inference credential
    status, _, err = call(ferry, "POST", INFER, key=token, body=PIXELS)
    assert (status, error_code(err)) == (403, "insufficient_scope")

    secret = bytes.fromhex((ferry.state_dir / "jwt.secret").read_text().strip())
    forged = JwtIssuer(os.urandom(32)).issue("user:root", ["admin"], 600, token_version=1)
    expired = JwtIssuer(secret, clock=lambda: time.time() - 7200).issue(
        "user:root", ["admin"], 60, token_version=1)
    claims = pyjwt.decode(token, options={"verify_signature": False})
    unsigned = pyjwt.encode(claims, key=None, algorithm="none")
    for bad, code in ((forged, "invalid_token"), (expired, "token_expired"),
                      (unsigned, "invalid_token")):
        status, _, err = call(ferry, "GET", "/admin/tokens", key=bad)
        assert (status, error_code(err)) == (401, code), err


# -- WebSocket ----------------------------------------------------------------------------------

async def _ws_exchange(ferry, first: dict | None, then: dict | None,
                       headers: dict | None = None) -> list[dict]:
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ferry.url + "/v1/ws", headers=headers or {}) as ws:
            for msg in (first, then):
                if msg is None:
                    continue
                await ws.send_json(msg)
                reply = await ws.receive(timeout=30)
                out.append(json.loads(reply.data))
    return out


WS_INFER = {"type": "inference", "id": "r1", "model": "digits", "prompt": "hi",
            "max_tokens": 2}


@pytest.mark.parametrize("who,code", [("literal:" + WRONG, "invalid_api_key"),
                                      ("revoked", "key_revoked"), ("expired", "key_expired"),
                                      ("adminonly", "insufficient_scope"),
                                      ("ipkey", "ip_not_allowed")])
def test_websocket_refusals(ferry, who, code):
    auth_reply, infer_reply = run(_ws_exchange(
        ferry, {"type": "auth", "token": _key(ferry, who)}, WS_INFER))
    assert (auth_reply["type"], auth_reply["code"]) == ("error", code), auth_reply
    assert (infer_reply["type"], infer_reply["code"]) == ("error", "unauthorized"), infer_reply


def test_websocket_model_allow_list_and_accepted_keys(ferry):
    auth_reply, infer_reply = run(_ws_exchange(
        ferry, {"type": "auth", "token": ferry.keys["modelkey"]}, WS_INFER))
    assert auth_reply == {"type": "auth", "ok": True}
    assert infer_reply["code"] == "model_not_allowed", infer_reply
    # An accepted key reaches the model: digits is not generative, a 400 past auth.
    _, infer_reply = run(_ws_exchange(ferry, {"type": "auth", "token": ferry.keys["infer"]},
                                      WS_INFER))
    assert infer_reply["code"] == "model_not_generative", infer_reply
    # Credentials on the upgrade request count too (for clients that can set headers).
    [reply] = run(_ws_exchange(ferry, WS_INFER, None,
                               headers={"Authorization": f"Bearer {ferry.keys['infer']}"}))
    assert reply["code"] == "model_not_generative", reply


def test_websocket_inference_counts_against_rate_limits(ferry):
    async def scenario() -> list[dict]:
        out = []
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({"type": "auth", "token": ferry.keys["wslimited"]})
            assert json.loads((await ws.receive(timeout=30)).data)["ok"]
            for i in range(3):
                await ws.send_json({**WS_INFER, "id": f"r{i}"})
                out.append(json.loads((await ws.receive(timeout=30)).data))
        return out
    replies = run(scenario())
    assert [r["code"] for r in replies] == ["model_not_generative", "model_not_generative",
                                            "rate_limited"], replies
    assert replies[2]["status"] == 429 and replies[2]["id"] == "r2"


# -- ZMQ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("who,code", [(None, "missing_credentials"),
                                      ("literal:" + WRONG, "invalid_api_key"),
                                      ("revoked", "key_revoked"), ("expired", "key_expired"),
                                      ("adminonly", "insufficient_scope"),
                                      ("ipkey", "ip_not_allowed"),
                                      ("modelkey", "model_not_allowed")])
def test_zmq_refusals(ferry, who, code):
    x = np.zeros((1, 64), np.float32)
    with FerryClient(ferry.zmq, api_key=_key(ferry, who) or "", timeout_s=30) as c:
        with pytest.raises(FerryError) as err:
            c.infer("digits", {"pixels": x})
    assert err.value.code == code


def test_zmq_accepts_keys_limits_them_and_keeps_admin_messages_local(ferry):
    x = np.zeros((2, 64), np.float32)
    with FerryClient(ferry.zmq, api_key=ferry.keys["infer"], timeout_s=30) as c:
        assert c.infer("digits", {"pixels": x})["probabilities"].shape == (2, 10)
        with pytest.raises(FerryError) as err:
            c.stats()          # no credential field: local (ipc) clients only
        assert err.value.code == "local_only"
    with FerryClient(ferry.zmq, api_key=ferry.keys["zmqlimited"], timeout_s=30) as c:
        c.infer("digits", {"pixels": x})
        c.infer("digits", {"pixels": x})
        with pytest.raises(FerryError) as err:
            c.infer("digits", {"pixels": x})
        assert (err.value.status, err.value.code) == (429, "rate_limited")


# -- rate limits --------------------------------------------------------------------------------

def test_rate_limit_holds_across_two_http_processes(ferry):
    """rpm=20: of 40 quick requests on separate connections (spread over both workers by
    SO_REUSEPORT), exactly 20 succeed; the table in the runtime directory is shared."""
    key = ferry.keys["limited"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(ferry, "GET", "/v2/models/digits", key=key),
                                range(40)))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 20 and statuses.count(429) == 20, statuses
    refused = next(r for r in results if r[0] == 429)
    assert int(refused[1]["Retry-After"]) >= 1 and refused[1]["X-RateLimit-Remaining"] == "0"
    assert error_code(refused[2]) == "rate_limited"


def test_rate_limit_headers_count_down_then_429(ferry):
    key = ferry.keys["countdown"]
    seen = []
    for _ in range(5):
        status, headers, _ = call(ferry, "GET", "/v1/models", key=key)
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "5"
        seen.append(int(headers["X-RateLimit-Remaining"]))
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
    assert seen == [4, 3, 2, 1, 0]
    status, headers, err = call(ferry, "GET", "/v1/models", key=key)
    assert status == 429 and headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["Retry-After"]) <= 12
    assert err["error"]["code"] == "rate_limited" and err["error"]["type"] == "rate_limit_error"
    assert err["error"]["retry_after"] == int(headers["Retry-After"])
    assert err["error"]["request_id"] == headers["X-Request-ID"]


# -- admin API ----------------------------------------------------------------------------------

def _accepted_everywhere(ferry, key: str) -> bool:
    return all(call(ferry, "POST", INFER, key=key, body=PIXELS)[0] == 200 for _ in range(20))


def _refused_everywhere(ferry, key: str, path: str = INFER) -> bool:
    """True when 20 fresh connections all refuse the key: SO_REUSEPORT spreads them over both
    workers (all on one: p = 2^-19)."""
    return all(call(ferry, "POST", path, key=key, body=PIXELS)[0] == 401 for _ in range(20))


def test_admin_token_lifecycle(ferry):
    admin = ferry.keys["admin"]
    status, _, made = call(ferry, "POST", "/admin/tokens", key=admin,
                           body={"name": "api-made", "scopes": ["infer"], "models": ["digits"],
                                 "rpm": 100, "expires": "1d"})
    assert status == 201, made
    plaintext, key_id = made["api_key"], made["id"]
    assert plaintext.startswith(f"fy_{key_id}_") and made["expires_at"] > time.time() + 80000
    assert call(ferry, "POST", INFER, key=plaintext, body=PIXELS)[0] == 200
    listing = call(ferry, "GET", "/admin/tokens", key=admin)[2]
    assert key_id in {k["id"] for k in listing["data"]}
    assert plaintext not in json.dumps(listing) and "hash" not in json.dumps(listing)
    assert call(ferry, "GET", f"/admin/tokens/{key_id}", key=admin)[2]["name"] == "api-made"

    status, _, rotated = call(ferry, "POST", f"/admin/tokens/{key_id}/rotate", key=admin)
    assert status == 200 and rotated["api_key"] != plaintext
    # Workers cache key records, but the shared change counter makes both secrets change over
    # on the very next request in every worker: no waiting.
    assert _accepted_everywhere(ferry, rotated["api_key"])
    assert _refused_everywhere(ferry, plaintext)

    status, _, revoked = call(ferry, "DELETE", f"/admin/tokens/{key_id}", key=admin)
    assert status == 200 and revoked["revoked_at"] is not None
    assert _refused_everywhere(ferry, rotated["api_key"])
    assert error_code(call(ferry, "POST", INFER, key=rotated["api_key"], body=PIXELS)[2]) \
        == "key_revoked"
    for body, code in (({"name": "x", "scopes": ["root"]}, "invalid_input"),
                       ({"name": "x", "expires": "soon"}, "invalid_input"),
                       ({"name": "x", "allow_ips": ["300.1.1.1"]}, "invalid_input"),
                       ({"scopes": ["infer"]}, "missing_parameter"),
                       ({"name": "x", "colour": "red"}, "unknown_parameter")):
        status, _, err = call(ferry, "POST", "/admin/tokens", key=admin, body=body)
        assert (status, error_code(err)) == (400, code), (body, err)
    status, _, err = call(ferry, "DELETE", "/admin/tokens/ffffffffffff", key=admin)
    assert (status, error_code(err)) == (404, "key_not_found")


def test_request_log_filters_and_pages(ferry):
    admin, infer = ferry.keys["admin"], ferry.keys["infer"]
    key_id = infer.split("_")[1]
    t0 = time.time()
    ids = [f"log-{i}-{os.getpid()}" for i in range(3)]
    for rid in ids:
        assert call(ferry, "POST", INFER, key=infer, body=PIXELS,
                    headers={"X-Request-ID": rid})[0] == 200
    call(ferry, "POST", INFER, key=WRONG, body=PIXELS, headers={"X-Request-ID": "log-bad"})

    def page(query: str) -> dict:
        status, _, out = call(ferry, "GET", "/admin/requests?" + query, key=admin)
        assert status == 200, out
        return out

    def mine():
        rows = page(f"key_id={key_id}&since={t0}&model=digits&status=200")["data"]
        return rows if {r["request_id"] for r in rows} >= set(ids) else None
    rows = wait_until(mine, 10, "the request log rows")
    row = next(r for r in rows if r["request_id"] == ids[0])
    assert row["route"] == "POST /v2/models/{model}/infer" and row["total_ms"] > 0
    assert all(r["key_id"] == key_id and r["status"] == 200 for r in rows)
    bad = wait_until(lambda: [r for r in page("status=401&limit=50")["data"]
                              if r["request_id"] == "log-bad"], 10, "the refused request's row")
    assert bad[0]["code"] == "invalid_api_key" and bad[0]["key_id"] is None
    first = page(f"key_id={key_id}&limit=2")
    second = page(f"key_id={key_id}&limit=2&cursor={first['next_cursor']}")
    assert first["next_cursor"] and not {r["id"] for r in first["data"]} & {
        r["id"] for r in second["data"]}
    assert page(f"key_id={key_id}&until={t0 - 3600}")["data"] == []
    for query in ("limit=0", "limit=x", "cursor=abc", "colour=red", "since=yesterday"):
        status, _, err = call(ferry, "GET", "/admin/requests?" + query, key=admin)
        assert status == 400 and error_code(err) in ("invalid_input", "unknown_parameter"), query


def test_admin_system(ferry):
    status, _, out = call(ferry, "GET", "/admin/system", key=ferry.keys["admin"])
    assert status == 200, out
    roles = sorted(p["role"] for p in out["processes"])
    assert roles == ["engine", "http", "http", "supervisor", "zmq"], roles
    assert all(p["rss"] > 0 for p in out["processes"])
    assert out["processes"][0]["pid"] == ferry.proc.pid
    segs = out["shared_memory"]["segments"]
    assert segs and all(s["name"].startswith("ferry-") for s in segs)
    assert out["memory"]["total"] > 0 and out["cpu"]["count"] >= 1
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        has_gpu = True
    except Exception:
        has_gpu = False
    assert (len(out["gpus"]) > 0) == has_gpu


def test_cors_only_for_configured_origins(ferry):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = call(ferry, "OPTIONS", INFER, headers=pre)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = call(ferry, "OPTIONS", INFER, headers={**pre, "Origin": "https://evil"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS,
                              headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-RateLimit-Remaining" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS,
                              headers={"Origin": "https://evil"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_state_files_are_private_and_logs_hold_no_secret(ferry):
    # Some traffic carrying every secret first: keys, the password, a session token.
    token = call(ferry, "POST", "/admin/login",
                 body={"username": "root", "password": PASSWORD})[2]["access_token"]
    for key in ferry.keys.values():
        call(ferry, "POST", INFER, key=key, body=PIXELS)
    call(ferry, "GET", "/admin/tokens", key=token)
    for name in ("ferry.db", "ferry.db-wal", "ferry.db-shm", "jwt.secret"):
        mode = stat.S_IMODE((ferry.state_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(ferry.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ferry.runtime_dir / "ratelimit.tbl").stat().st_mode) == 0o600
    log_text = ferry.log()
    assert "api key" in log_text or "security" in log_text      # the log is the daemon's
    secrets_ = [*ferry.keys.values(), PASSWORD, token,
                (ferry.state_dir / "jwt.secret").read_text().strip()]
    for secret in secrets_:
        assert secret not in log_text
    # log_bodies is on: inference bodies are kept, admin bodies (passwords) never are.
    status, _, _ = call(ferry, "GET", "/admin/requests?limit=1", key=ferry.keys["admin"])
    with sqlite3.connect(ferry.state_dir / "ferry.db") as db:
        bodies = [r[0] for r in db.execute("SELECT body FROM request_log WHERE body NOT NULL")]
        routes = {r[0] for r in db.execute("SELECT route FROM request_log WHERE body NOT NULL")}
    assert any('"pixels"' in b for b in bodies)
    assert not any(PASSWORD in b for b in bodies) and not any(r.startswith(
        "POST /admin") for r in routes)


# -- fuzzing ------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
_fields = ["model", "messages", "prompt", "input", "inputs", "outputs", "name", "scopes",
           "models", "rpm", "expires", "allow_ips", "username", "password", "requests",
           "endpoint", "webhook_url", "metadata", "max_tokens", "stream", "n", "shape",
           "datatype", "data", "parameters", "custom_id", "url", "body"]
_bodies = st.one_of(_json, st.dictionaries(st.sampled_from(_fields), _json, max_size=6))
_segment = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                 exclude_characters="/?#%"), min_size=1, max_size=12)
_routes = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(
        ["/admin/login", "/admin/tokens", INFER, "/v2/models/digits/versions/1/infer",
         "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/batches",
         "/v2/repository/index"])),
    st.tuples(st.sampled_from(["GET", "DELETE", "POST"]),
              st.builds(lambda s: f"/admin/tokens/{s}", _segment)),
    st.tuples(st.sampled_from(["GET", "POST"]),
              st.builds(lambda s: f"/v1/batches/{s}", _segment)),
    st.tuples(st.just("GET"), st.builds(
        lambda q: "/admin/requests?" + "&".join(f"{k}={v}" for k, v in q.items()),
        st.dictionaries(st.sampled_from(["model", "status", "key_id", "since", "until",
                                         "limit", "cursor", "x"]),
                        st.text(st.characters(codec="ascii", min_codepoint=48,
                                              max_codepoint=122), max_size=8), max_size=4))),
    st.tuples(st.just("GET"), st.builds(lambda s: f"/v2/models/{s}/config", _segment)))
_auth = st.sampled_from(["admin", "infer", "modelkey", None, "literal:garbage",
                         "literal:" + WRONG, "literal:a.b.c"])
_ctype = st.sampled_from(["application/json", "application/jsonl", "text/plain",
                          "multipart/form-data", "application/x-www-form-urlencoded"])
_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_headers = st.dictionaries(
    st.sampled_from(["Origin", "X-Request-ID", "Accept", "Content-Encoding", "X-API-Key",
                     "Access-Control-Request-Method", "Inference-Header-Content-Length",
                     "X-Forwarded-For"]),
    st.one_of(_value, st.sampled_from([ORIGIN, "gzip", "application/jsonl", "Basic eA==",
                                       "12", "-1", "10.1.2.3"])), max_size=3)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=_routes, body=_bodies, who=_auth, ctype=_ctype, raw=st.booleans(),
       junk=st.binary(max_size=64), extra=_headers)
def test_fuzzed_requests_never_answer_5xx(ferry, route, body, who, ctype, raw, junk, extra):
    method, path = route
    data = junk if raw else json.dumps(body).encode()
    status, _, out = call(ferry, method, path, key=_key(ferry, who), raw=data,
                          headers={"Content-Type": ctype, **extra})
    assert status < 500, (method, path, body, status, out)
    if status >= 400:
        assert error_code(out), out


def test_websocket_without_credentials_is_closed_after_the_auth_deadline(ferry):
    async def scenario() -> tuple[dict, aiohttp.WSMessage, float]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            started = time.monotonic()
            await ws.send_json({"type": "ping"})          # connected, but never authenticates
            assert json.loads((await ws.receive(timeout=30)).data)["type"] == "pong"
            error = json.loads((await ws.receive(timeout=30)).data)
            closed = await ws.receive(timeout=30)
            return error, closed, time.monotonic() - started
    error, closed, waited = run(scenario())
    assert (error["type"], error["code"], error["status"]) == ("error", "auth_timeout", 401)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1008
    assert ws_module.AUTH_TIMEOUT_S - 1 < waited < ws_module.AUTH_TIMEOUT_S + 10


def test_websocket_is_closed_after_repeated_refused_auth(ferry):
    async def scenario() -> list[dict | int]:
        out: list[dict | int] = []
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            for _ in range(ws_module.MAX_AUTH_FAILURES):
                await ws.send_json({"type": "auth", "token": WRONG})
                out.append(json.loads((await ws.receive(timeout=30)).data))
            out.append(json.loads((await ws.receive(timeout=30)).data))
            closed = await ws.receive(timeout=30)
            out.append(closed.data if closed.type == aiohttp.WSMsgType.CLOSE else -1)
        return out
    replies = run(scenario())
    assert [r["code"] for r in replies[:-1]] == ["invalid_api_key"] * \
        ws_module.MAX_AUTH_FAILURES + ["too_many_auth_failures"], replies
    assert replies[-1] == 1008
    # A good key on a later socket still works: the cap is per socket, not per address.
    auth_reply, _ = run(_ws_exchange(ferry, {"type": "auth", "token": ferry.keys["infer"]},
                                     WS_INFER))
    assert auth_reply == {"type": "auth", "ok": True}
