"""Spans across processes on a real `ferry serve` (SmolLM2 and digits, one HTTP worker, the ZMQ
frontend, an OTLP collector): a chat completion with a traceparent gives the server span, the
dispatcher's span and the engine's queue / execute / prefill / decode spans under it, with the
right parent ids, nested times and the engine's step counts; the same tree reaches the OTLP
collector nested to the microsecond; ZMQ Infer and Generate messages continue the trace in
their optional `trace` field, and a malformed one starts a new trace rather than failing."""
from __future__ import annotations

import time
import uuid

import msgpack
import numpy as np
import pytest

from daemon import protocol as P
from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments
from tests.integration.otlp_collector import Collector
from tests.integration.secure_daemon import SecureDaemon, call
from tests.integration.test_tracing import assert_nested, exported_tree

pytestmark = pytest.mark.timeout(240)

PARENT = "00f067aa0ba902b7"
CHAT = {"model": "smollm2", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Name a colour."}]}
LLM_SPANS = {"POST /v1/chat/completions", "ferry.dispatch", "engine.queue", "engine.execute",
             "engine.prefill", "engine.decode"}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    collector = Collector()
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2")),
                     workers=1, extra_config=f'[tracing]\notlp_endpoint = "{collector.url}"\n')
    d.prepare()

    async def seed(state):
        return (await state.keys.create("admin", scopes=["admin"])).plaintext
    d.admin = d.state(seed)        # GET /traces takes the admin scope; inference is open
    d.collector = collector
    d.start()
    yield d
    code = d.stop()
    collector.close()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _spans(d: SecureDaemon, trace: str, names: set[str]) -> dict[str, dict]:
    """The trace's spans by name once every one of `names` is in GET /traces."""
    deadline = time.monotonic() + 30
    while True:
        status, _, body = call(d, "GET", f"/traces?trace_id={trace}", key=d.admin)
        assert status == 200, body
        spans = {s["operation_name"]: s for s in body["traces"]}
        if names <= set(spans) or time.monotonic() > deadline:
            assert names <= set(spans), sorted(spans)
            return spans
        time.sleep(0.1)   # polling interval; the deadline decides


def _by_request(d: SecureDaemon, request_id: str, name: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        status, _, body = call(d, "GET", "/traces?limit=1000", key=d.admin)
        assert status == 200, body
        found = [s for s in body["traces"] if s["operation_name"] == name
                 and s["attributes"].get("ferry.request_id") == request_id]
        if found or time.monotonic() > deadline:
            assert found, f"no {name} span of request {request_id}"
            return found[0]
        time.sleep(0.1)   # polling interval; the deadline decides


def test_a_chat_completion_has_the_engine_spans_under_its_own(ferry):
    trace = uuid.uuid4().hex
    status, headers, body = call(ferry, "POST", "/v1/chat/completions", body=CHAT,
                                 headers={"traceparent": f"00-{trace}-{PARENT}-01"})
    assert status == 200, body
    tokens = body["usage"]["completion_tokens"]
    assert tokens == 8
    server_id = headers["traceparent"].split("-")[2]
    spans = _spans(ferry, trace, LLM_SPANS)
    server, dispatch, queue, execute, prefill, decode = (spans[n] for n in (
        "POST /v1/chat/completions", "ferry.dispatch", "engine.queue", "engine.execute",
        "engine.prefill", "engine.decode"))
    assert server["span_id"] == server_id and server["parent_span_id"] == PARENT
    assert dispatch["parent_span_id"] == server_id
    assert queue["parent_span_id"] == execute["parent_span_id"] == dispatch["span_id"]
    assert prefill["parent_span_id"] == decode["parent_span_id"] == execute["span_id"]
    assert {s["trace_id"] for s in spans.values()} == {trace}
    assert dispatch["attributes"]["ferry.model"] == "smollm2"
    a = execute["attributes"]
    # one forward pass per token: the prefill gives the first, each decode step one more
    assert (a["ferry.steps"], a["ferry.prefill_steps"], a["ferry.decode_steps"]) == \
        (tokens, 1, tokens - 1)
    assert a["ferry.prefill_ms"] == pytest.approx(prefill["duration_ms"], abs=0.01)
    assert a["ferry.decode_ms"] == pytest.approx(decode["duration_ms"], abs=0.01)
    for parent, child in ((server, dispatch), (dispatch, queue), (dispatch, execute),
                          (execute, prefill), (execute, decode)):
        assert_nested(parent, child)
    assert execute["duration_ms"] >= prefill["duration_ms"] + decode["duration_ms"] - 0.01


def test_the_otlp_collector_gets_the_same_tree_nested_to_the_microsecond(ferry):
    trace = uuid.uuid4().hex
    status, _, body = call(ferry, "POST", "/v1/chat/completions", body=CHAT,
                           headers={"traceparent": f"00-{trace}-{PARENT}-01"})
    assert status == 200, body
    deadline = time.monotonic() + 30
    tree: dict = {}
    while not LLM_SPANS <= set(tree) and time.monotonic() < deadline:
        time.sleep(0.1)   # polling interval; the deadline decides
        tree = exported_tree(ferry.collector, trace, "POST /v1/chat/completions")
    assert LLM_SPANS <= set(tree), sorted(tree)
    s = {name: span for name, (_, span) in tree.items()}
    for parent, child in (("POST /v1/chat/completions", "ferry.dispatch"),
                          ("ferry.dispatch", "engine.queue"),
                          ("ferry.dispatch", "engine.execute"),
                          ("engine.execute", "engine.prefill"),
                          ("engine.execute", "engine.decode")):
        assert s[child].parent_span_id == s[parent].span_id
        # Unix seconds as a double carry ~0.24 µs: nesting holds to 1 µs
        assert s[parent].start_time_unix_nano <= s[child].start_time_unix_nano + 1000
        assert s[child].end_time_unix_nano <= s[parent].end_time_unix_nano + 1000
    assert s["engine.queue"].end_time_unix_nano <= s["engine.execute"].start_time_unix_nano + 1000
    assert s["engine.prefill"].end_time_unix_nano <= s["engine.decode"].start_time_unix_nano + 1000
    attrs = {kv.key: kv.value for kv in s["engine.execute"].attributes}
    assert attrs["ferry.steps"].int_value == 8


def test_a_zmq_infer_continues_the_callers_trace(ferry):
    trace, rid = uuid.uuid4().hex, uuid.uuid4().hex
    x = np.zeros((1, 64), np.float32)
    with FerryClient(ferry.zmq_endpoint, timeout_s=30) as c:
        msg = P.Infer(rid, "digits", 0, [P.TensorRef("pixels", "float32", x.shape, frame=0)],
                      request_id=rid, trace=f"00-{trace}-{PARENT}-01")
        reply, _ = c.send_raw(P.encode(msg, [x]))
    assert isinstance(reply, P.InferResult), reply
    assert reply.timing is None              # engine timings stay inside the daemon
    spans = _spans(ferry, trace, {"ZMQ infer", "ferry.dispatch", "engine.queue",
                                  "engine.execute"})
    server = spans["ZMQ infer"]
    assert server["parent_span_id"] == PARENT and server["status"] == "ok"
    assert server["attributes"]["ferry.request_id"] == rid
    assert spans["ferry.dispatch"]["parent_span_id"] == server["span_id"]
    assert spans["engine.execute"]["parent_span_id"] == spans["ferry.dispatch"]["span_id"]
    assert spans["engine.execute"]["attributes"]["ferry.batch_size"] == 1
    assert_nested(server, spans["ferry.dispatch"])
    assert_nested(spans["ferry.dispatch"], spans["engine.execute"])


def test_a_zmq_generate_has_the_llm_engine_spans(ferry):
    trace, rid = uuid.uuid4().hex, uuid.uuid4().hex
    prompt = np.asarray([1, 2, 3, 4], np.int32)
    msg = P.Generate(rid, "smollm2", 0, [P.TensorRef("prompt", "int32", (4,), frame=0)],
                     {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True},
                     request_id=rid, trace=f"00-{trace}-{PARENT}-01")
    with FerryClient(ferry.zmq_endpoint, timeout_s=30) as c:
        reply, _ = c.send_raw(P.encode(msg, [prompt]))
        got = list(reply.token_ids) if isinstance(reply, P.Tokens) else None
        while isinstance(reply, P.Tokens) and not reply.finished:
            reply, _ = P.decode(c.sock.recv_multipart())
            got += reply.token_ids
    assert isinstance(reply, P.Tokens) and reply.finished and len(got) == 5, reply
    spans = _spans(ferry, trace, {"ZMQ generate", "ferry.dispatch", "engine.queue",
                                  "engine.execute", "engine.prefill", "engine.decode"})
    assert spans["ZMQ generate"]["parent_span_id"] == PARENT
    assert spans["ferry.dispatch"]["parent_span_id"] == spans["ZMQ generate"]["span_id"]
    assert spans["engine.execute"]["attributes"]["ferry.steps"] == 5


@pytest.mark.parametrize("bad", ["garbage", f"00-{'0' * 32}-{PARENT}-01", "x" * 256])
def test_a_malformed_zmq_trace_starts_a_new_trace(ferry, bad):
    rid = uuid.uuid4().hex
    x = np.zeros((1, 64), np.float32)
    with FerryClient(ferry.zmq_endpoint, timeout_s=30) as c:
        msg = P.Infer(rid, "digits", 0, [P.TensorRef("pixels", "float32", x.shape, frame=0)],
                      request_id=rid, trace=bad)
        reply, _ = c.send_raw(P.encode(msg, [x]))
    assert isinstance(reply, P.InferResult), reply
    server = _by_request(ferry, rid, "ZMQ infer")
    assert server["parent_span_id"] is None and server["status"] == "ok"
    spans = _spans(ferry, server["trace_id"], {"ZMQ infer", "ferry.dispatch", "engine.execute"})
    assert spans["ferry.dispatch"]["parent_span_id"] == server["span_id"]


def test_a_zmq_trace_field_too_long_or_not_a_string_is_a_bad_message(ferry):
    x = np.zeros((1, 64), np.float32)
    with FerryClient(ferry.zmq_endpoint, timeout_s=30) as c:
        for value in ("x" * 257, 7, ["00"]):
            rid = uuid.uuid4().hex
            frames = P.encode(P.Infer(rid, "digits", 0, [P.TensorRef(
                "pixels", "float32", x.shape, frame=0)]), [x])
            header = msgpack.unpackb(frames[0])
            header["trace"] = value
            reply, _ = c.send_raw([msgpack.packb(header), x])
            assert isinstance(reply, P.ErrorReply), reply
            assert (reply.status, reply.code, reply.id) == (400, "bad_message", rid)
            assert "trace" in reply.message
