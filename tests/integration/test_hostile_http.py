"""A corpus of hostile requests against every JSON route of a real daemon (HTTP and /v1/ws).

Whatever a client sends, the answer is a 2xx or a 4xx whose error body carries a stable code,
never a 5xx, a dropped socket or a stuck request id, and the daemon stays ready after each probe.
Every failure of the corpus is reported at once. (test_fuzz_http.py throws random bodies at the
same routes; this corpus names the inputs known to have reached a 500: nesting deeper than the
interpreter's stack, lone surrogates, sequences longer than the model's positions.)
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments
from tests.integration.secure_daemon import call, error_code, run

pytestmark = pytest.mark.timeout(180)

JSON = {"Content-Type": "application/json"}
CHAT, CMPL, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MINILM, DIGITS = "/v2/models/minilm/infer", "/v2/models/digits/infer"
SHM, BATCHES, LOGIN = "/v2/systemsharedmemory/region/hostile/register", "/v1/batches", \
    "/admin/login"
ROUTES = [CHAT, CMPL, EMB, MINILM, DIGITS, SHM, BATCHES, LOGIN]
DEEP_OBJECT, DEEP_ARRAY = b'{"a":' * 100000, b"[" * 100000
NESTED_200 = b"[" * 200 + b"]" * 200          # parses, but deeper than any route needs
SURROGATE = "\\ud800"                        # a lone surrogate, as JSON spells it


def _j(text: str) -> bytes:
    return text.encode()


# Bodies every JSON route must refuse cleanly, whatever it expects.
GENERIC = {
    "deep_object": DEEP_OBJECT, "deep_array": DEEP_ARRAY, "nested_200": NESTED_200,
    "lone_surrogate": _j(f'"{SURROGATE}"'), "surrogate_key": _j(f'{{"{SURROGATE}": 1}}'),
    "empty": b"", "whitespace": b"  \n", "not_json": b"{'model': 1,", "truncated": b'{"a": [1, 2',
    "not_utf8": b'{"model": "\xff\xfe"}', "raw_surrogate_bytes": b'{"model": "\xed\xa0\x80"}',
    "null": b"null", "array": b"[1, 2, 3]", "number": b"1e400", "string": b'"hello"',
    "nan_literal": b'{"x": NaN}', "huge_int": b'{"x": ' + b"9" * 5000 + b"}",
    "nul_bytes": b'\x00\x00{"model": 1}',
}


def _chat(**kw) -> bytes:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1, **kw}
    return json.dumps(body).encode()


def _infer(name: str, datatype: str, shape: list, data) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                   "data": data}]}).encode()


def _minilm(seq: int) -> bytes:
    ids = {"datatype": "INT64", "shape": [1, seq], "data": [101] * seq}
    return json.dumps({"inputs": [{"name": "input_ids", **ids},
                                  {"name": "attention_mask", **ids}]}).encode()


# Route-specific bodies: near-valid, with one hostile field each.
SPECIFIC = {
    CHAT: {
        "surrogate_content": _j('{"model": "smollm2", "max_tokens": 1, "messages": [{"role": '
                                f'"user", "content": "a{SURROGATE}b"}}]}}'),
        "surrogate_in_parts": _j('{"model": "smollm2", "max_tokens": 1, "messages": [{"role": '
                                 f'"user", "content": [{{"type": "text", "text": "{SURROGATE}"'
                                 '}]}]}'),
        "messages_not_list": _chat(messages="hi"), "content_int": _chat(
            messages=[{"role": "user", "content": 5}]),
        "role_unknown": _chat(messages=[{"role": "wizard", "content": "x"}]),
        "max_tokens_huge": _chat(max_tokens=10 ** 30), "max_tokens_negative": _chat(max_tokens=-1),
        "max_tokens_float": _chat(max_tokens=1.5), "max_tokens_string": _chat(max_tokens="9"),
        "temperature_nan": _j('{"model": "smollm2", "max_tokens": 1, "temperature": NaN, '
                              '"messages": [{"role": "user", "content": "x"}]}'),
        "temperature_inf": _chat(temperature=float("inf")),
        "temperature_negative": _chat(temperature=-3), "top_p_big": _chat(top_p=7),
        "n_huge": _chat(n=10 ** 9), "n_zero": _chat(n=0), "stop_dict": _chat(stop={"a": 1}),
        "seed_huge": _chat(seed=2 ** 80), "logit_bias_bad": _chat(logit_bias={"x": "y"}),
        "stream_string": _chat(stream="yes"), "model_int": _chat(model=3),
        "model_surrogate": _j(f'{{"model": "s{SURROGATE}", "messages": []}}'),
        "stop_token_ids_neg": _chat(stop_token_ids=[-5]),
    },
    CMPL: {
        "surrogate_prompt": _j(f'{{"model": "smollm2", "max_tokens": 1, "prompt": "{SURROGATE}"'
                               '}'),
        "surrogate_in_list": _j('{"model": "smollm2", "max_tokens": 1, "prompt": ["ok", '
                                f'"{SURROGATE}"]}}'),
        "token_ids_out_of_vocab": json.dumps({"model": "smollm2", "prompt": [10 ** 12],
                                              "max_tokens": 1}).encode(),
        "token_ids_negative": json.dumps({"model": "smollm2", "prompt": [-1],
                                          "max_tokens": 1}).encode(),
        "prompt_nested": json.dumps({"model": "smollm2", "prompt": [[[1]]]}).encode(),
        "echo_string": json.dumps({"model": "smollm2", "prompt": "x", "echo": "y"}).encode(),
    },
    EMB: {
        "surrogate_input": _j(f'{{"model": "minilm", "input": "x{SURROGATE}"}}'),
        "surrogate_in_list": _j(f'{{"model": "minilm", "input": ["ok", "{SURROGATE}"]}}'),
        "input_empty_list": json.dumps({"model": "minilm", "input": []}).encode(),
        "input_int": json.dumps({"model": "minilm", "input": 5}).encode(),
        "token_ids_huge": json.dumps({"model": "minilm", "input": [[10 ** 20]]}).encode(),
        "token_ids_long": json.dumps({"model": "minilm", "input": [[101] * 5000]}).encode(),
        "dimensions_negative": json.dumps({"model": "minilm", "input": "x",
                                           "dimensions": -1}).encode(),
        "encoding_bad": json.dumps({"model": "minilm", "input": "x",
                                    "encoding_format": "base65"}).encode(),
        "llm_model": json.dumps({"model": "smollm2", "input": "x"}).encode(),
    },
    MINILM: {
        "seq_past_positions": _minilm(600),      # BERT has 512 position embeddings
        "seq_zero": _minilm(0), "shape_negative": _infer("input_ids", "INT64", [1, -4], []),
        "shape_huge": _infer("input_ids", "INT64", [2 ** 40, 2 ** 40], [1]),
        "shape_not_list": _infer("input_ids", "INT64", "1,2", [1, 2]),
        "data_nan_for_int": _j('{"inputs": [{"name": "input_ids", "datatype": "INT64", '
                               '"shape": [1, 1], "data": [NaN]}]}'),
        "data_huge_int": _infer("input_ids", "INT64", [1, 1], [2 ** 70]),
        "rank_wrong": _infer("input_ids", "INT64", [1, 1, 1], [1]),
        "surrogate_name": _j(f'{{"inputs": [{{"name": "{SURROGATE}", "datatype": "INT64", '
                             '"shape": [1], "data": [1]}]}'),
    },
    DIGITS: {
        "wrong_width": _infer("pixels", "FP32", [1, 600], [0.0] * 600),
        "data_strings": _infer("pixels", "FP32", [1, 64], ["x"] * 64),
        "data_nested_wrong": _infer("pixels", "FP32", [1, 64], [[0.0] * 32] * 3),
        "bytes_datatype": _infer("pixels", "BYTES", [1], ["aGk="]),
        "bad_binary_size": _j('{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": '
                              '[1, 64], "parameters": {"binary_data_size": -5}}]}'),
    },
    SHM: {
        "offset_negative": json.dumps({"key": "/x", "offset": -1, "byte_size": 8}).encode(),
        "byte_size_huge": json.dumps({"key": "/x", "offset": 0, "byte_size": 2 ** 70}).encode(),
        "key_int": json.dumps({"key": 5, "offset": 0, "byte_size": 8}).encode(),
        "key_traversal": json.dumps({"key": "../../etc/passwd", "offset": 0,
                                     "byte_size": 8}).encode(),
        "key_surrogate": _j(f'{{"key": "/{SURROGATE}", "offset": 0, "byte_size": 8}}'),
        "byte_size_float": json.dumps({"key": "/x", "offset": 0, "byte_size": 1.5}).encode(),
    },
    BATCHES: {
        "requests_not_list": json.dumps({"requests": "x"}).encode(),
        "item_surrogate": _j('{"requests": [{"url": "/v1/completions", "body": {"model": '
                             f'"smollm2", "prompt": "{SURROGATE}"}}}}]}}'),
        "item_deep": b'{"requests": [' + DEEP_ARRAY + b"]}",
        "metadata_huge": json.dumps({"requests": [], "metadata": {"k": "v" * 100000}}).encode(),
        "endpoint_bad": json.dumps({"endpoint": "/etc/passwd", "requests": [{}]}).encode(),
        "webhook_bad": json.dumps({"requests": [], "webhook_url": "file:///etc/passwd"}).encode(),
        "input_file_id": json.dumps({"input_file_id": "file-1"}).encode(),
    },
    LOGIN: {
        "username_surrogate": _j(f'{{"username": "{SURROGATE}", "password": "x"}}'),
        "password_int": json.dumps({"username": "a", "password": 1}).encode(),
        "ttl_huge": json.dumps({"username": "a", "password": "b", "ttl_s": 10 ** 30}).encode(),
        "ttl_nan": b'{"username": "a", "password": "b", "ttl_s": NaN}',
        "scopes_dict": json.dumps({"username": "a", "password": "b", "scopes": {}}).encode(),
    },
}

# Bodies that are fine JSON sent with the wrong framing.
FRAMING = {
    "text_plain": ({"Content-Type": "text/plain"}, _chat()),
    "form": ({"Content-Type": "application/x-www-form-urlencoded"}, b"model=smollm2"),
    "multipart": ({"Content-Type": "multipart/form-data; boundary=z"}, b"--z\r\n\r\n--z--"),
    "bad_charset": ({"Content-Type": "application/json; charset=nope-42"}, _chat()),
    "gzip_lie": ({**JSON, "Content-Encoding": "gzip"}, _chat()),
    "header_length_lie": ({**JSON, "Inference-Header-Content-Length": "99999"}, _chat()),
    "header_length_negative": ({**JSON, "Inference-Header-Content-Length": "-3"}, _chat()),
}


def corpus() -> list[tuple[str, str, bytes, dict[str, str]]]:
    probes = [(f"{route} {name}", route, body, JSON)
              for route in ROUTES for name, body in GENERIC.items()]
    probes += [(f"{route} {name}", route, body, JSON)
               for route, cases in SPECIFIC.items() for name, body in cases.items()]
    probes += [(f"{route} {name}", route, body, headers)
               for route in ROUTES for name, (headers, body) in FRAMING.items()]
    return probes


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    # One worker: every probe meets the same process, so one that kills it cannot hide.
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("minilm", "digits", "smollm2")),
               workers=1, env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def test_named_probes_get_their_codes(ferry):
    """The inputs that used to be 500s answer specific, documented codes."""
    expect = [(CHAT, DEEP_OBJECT, 400, "invalid_json"), (EMB, DEEP_ARRAY, 400, "invalid_json"),
              (BATCHES, DEEP_OBJECT, 400, "invalid_json"), (LOGIN, DEEP_ARRAY, 400, "invalid_json"),
              (SHM, DEEP_OBJECT, 400, "invalid_json"), (MINILM, DEEP_ARRAY, 400, "invalid_json"),
              (CHAT, SPECIFIC[CHAT]["surrogate_content"], 400, "invalid_text"),
              (EMB, SPECIFIC[EMB]["surrogate_input"], 400, "invalid_text"),
              (MINILM, _minilm(600), 400, "invalid_shape")]
    got = []
    for path, body, _, _ in expect:
        status, _, answer = call(ferry, "POST", path, raw=body, headers=JSON)
        got.append((status, error_code(answer)))
    assert got == [(status, code) for *_, status, code in expect]


def test_no_hostile_request_gets_a_5xx(ferry):
    probes = corpus()
    failures = []
    for n, (label, path, body, headers) in enumerate(probes):
        # A fresh loopback address each: /admin/login throttles 10 tries a minute per address.
        source = f"127.0.{1 + n // 250}.{1 + n % 250}"
        try:
            status, _, answer = call(ferry, "POST", path, raw=body, headers=headers,
                                     source=source)
        except OSError as exc:                      # a dropped connection is a failure too
            failures.append(f"{label}: {exc!r}")
            continue
        if status >= 500:
            failures.append(f"{label}: {status} {str(answer)[:160]}")
        elif status >= 400 and not (isinstance(error_code(answer), str) and error_code(answer)):
            failures.append(f"{label}: {status} without a stable code: {str(answer)[:160]}")
        if http_get(ferry.url + "/v2/health/ready")[0] != 200:
            failures.append(f"{label}: the daemon is no longer ready")
    assert not failures, f"{len(failures)} of {len(probes)} probes:\n" + "\n".join(failures)
    assert "unhandled error" not in ferry.log()


HUGE = "9" * 5000          # int() refuses strings of over 4300 digits


@pytest.mark.parametrize("method,path", [
    ("POST", f"/v2/models/digits/versions/{HUGE}/infer"),
    ("GET", f"/v2/models/digits/versions/{HUGE}"),
    ("GET", f"/v2/models/digits/versions/{HUGE}/ready"),
    ("GET", f"/v1/batches?limit={HUGE}"),
    ("GET", f"/v1/batches?limit=-{HUGE}"),
])
def test_numbers_too_long_for_int_in_urls_are_400(ferry, method, path):
    status, _, answer = call(ferry, method, path, raw=b"{}" if method == "POST" else None,
                             headers=JSON)
    assert status == 400, (status, str(answer)[:300])
    assert error_code(answer) == "invalid_input"


# -- WebSocket ----------------------------------------------------------------------------------

WS_HOSTILE = {
    "deep_object": DEEP_OBJECT.decode(), "deep_array": DEEP_ARRAY.decode(),
    "nested_200": NESTED_200.decode(), "lone_surrogate": f'"{SURROGATE}"',
    "surrogate_prompt": '{"type": "inference", "id": "s", "model": "smollm2", "prompt": '
                        f'"{SURROGATE}"}}',
    "surrogate_ping": f'{{"type": "ping", "x": "{SURROGATE}"}}', "not_json": "{'type':",
    "not_object": "[1]", "type_int": '{"type": 5}', "id_list": '{"type": "inference", "id": []}',
    "max_tokens_nan": '{"type": "inference", "id": "n", "model": "smollm2", "prompt": "x", '
                      '"max_tokens": NaN}',
    "max_tokens_huge": '{"type": "inference", "id": "h", "model": "smollm2", "prompt": "x", '
                       '"max_tokens": ' + "9" * 400 + "}",
    "cancel_unknown": '{"type": "cancel", "id": "ghost"}', "empty": "",
}


async def _ws_hostile(url: str) -> list[str]:
    failures = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/v1/ws",
                                                         max_msg_size=1 << 22) as ws:
        for name, text in WS_HOSTILE.items():
            await ws.send_str(text)
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                failures.append(f"{name}: the socket answered {msg.type!r} {msg.data!r}")
                break
            reply = json.loads(msg.data)
            if reply.get("type") != "error" or not reply.get("code") or reply["status"] >= 500:
                failures.append(f"{name}: {str(reply)[:160]}")
        if not ws.closed:
            await ws.send_json({"type": "ping", "n": 1})
            pong = json.loads((await ws.receive(timeout=30)).data)
            if pong != {"type": "pong", "n": 1}:
                failures.append(f"the socket stopped answering pings: {pong}")
    return failures


def test_hostile_ws_messages_answer_errors_and_keep_the_socket(ferry):
    failures = run(_ws_hostile(ferry.url))
    assert not failures, "\n".join(failures)
    assert http_get(ferry.url + "/v2/health/ready")[0] == 200


PAIRS = 100


async def _cancel_race(url: str) -> tuple[dict, dict]:
    terminal: dict = {}                               # id -> its terminal messages
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/v1/ws") as ws:
        frames = []
        for i in range(PAIRS):
            frames.append(json.dumps({"type": "inference", "id": i, "model": "smollm2",
                                      "prompt": "Once upon a time", "max_tokens": 4}))
            frames.append(json.dumps({"type": "cancel", "id": i}))
        # No await between the frames: they reach the server in the same reads.
        await asyncio.gather(*(ws.send_str(f) for f in frames))
        try:
            async with asyncio.timeout(30):     # the fixed server needs a second or two
                while len(terminal) < PAIRS:
                    reply = json.loads((await ws.receive()).data)
                    if _terminal(reply):
                        terminal.setdefault(reply["id"], []).append(reply)
        except TimeoutError:
            pass                                # the assertions name the ids left unanswered
        # The socket still serves: its in-flight slots were all given back.
        await ws.send_json({"type": "inference", "id": "after", "model": "smollm2",
                            "prompt": "Once upon a time", "max_tokens": 2, "stream": False})
        while True:
            reply = json.loads((await ws.receive(timeout=60)).data)   # 429 while ids leak
            if reply.get("id") == "after":
                break
            if _terminal(reply):
                terminal.setdefault(reply["id"], []).append(reply)
    return terminal, reply


def _terminal(reply: dict) -> bool:
    """A request's last message; `unknown_request` answers a cancel that came too late."""
    return reply["type"] == "complete" or (reply["type"] == "error"
                                           and reply["code"] != "unknown_request")


def test_inference_and_cancel_back_to_back_each_get_one_terminal_message(ferry):
    terminal, after = run(_cancel_race(ferry.url), 120)
    missing = sorted(set(range(PAIRS)) - set(terminal))
    doubled = {i: [m["type"] for m in ms] for i, ms in terminal.items() if len(ms) != 1}
    assert not missing, f"{len(missing)} ids never got a terminal message: {missing[:10]}"
    assert not doubled, doubled
    # Cancelled requests free their slots at once: none of the 100 is refused for the 64 limit.
    for i, (m,) in terminal.items():
        assert m["type"] == "complete" and m["finish_reason"] in ("cancelled", "length"), m
    assert (after["type"], after["finish_reason"]) == ("complete", "length"), after
