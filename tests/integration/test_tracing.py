"""Tracing on a real `ferry serve` (two HTTP workers, auth required): W3C traceparent accepted
and returned, spans recorded by one worker served by GET /traces on the other, the dispatcher's
and the engine's spans under the request's (parent ids, nesting times, batch size), child spans
of prompt-template rendering, malformed headers starting a fresh trace (never an error), an
unsampled traceparent continued but not recorded, the bounded span ring, the /traces query's
bad forms, and OTLP export of the whole tree. The LLM's spans: test_tracing_engine.py."""
from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments
from tests.integration.otlp_collector import Collector
from tests.integration.secure_daemon import SecureDaemon, call, error_code
from tests.integration.worker_conn import on_worker

pytestmark = pytest.mark.timeout(180)

PIXELS = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                      "data": [0.0] * 64}]}
INFER = "/v2/models/digits/infer"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
HEADER = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Room for the spans one test waits for while the other worker flushes older ones after them
# (4 spans a request); the ring test still overfills it.
BUFFER = 200


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
                     extra_config=f"[auth]\nrequired = true\n[tracing]\nbuffer_spans = {BUFFER}\n")
    d.prepare()

    async def seed(state):
        return {"admin": (await state.keys.create("admin", scopes=["admin"])).plaintext,
                "infer": (await state.keys.create("infer", scopes=["infer"])).plaintext}
    d.keys = d.state(seed)
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _traces(d, query: str, pid=None, avoid=None) -> list[dict]:
    _, status, body, _ = on_worker(d, pid, "GET", "/traces" + query, key=d.keys["admin"],
                                   avoid=avoid)
    assert status == 200, body
    return body["traces"]


def _wait_for(d, trace_id: str, count: int, avoid: int | None = None) -> list[dict]:
    """The trace's spans once `count` are there (the other worker writes every 0.5 s)."""
    deadline = time.monotonic() + 30
    while True:
        spans = _traces(d, f"?trace_id={trace_id}", avoid=avoid)
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)   # polling interval; the deadline decides


def test_traceparent_is_continued_returned_and_seen_by_the_other_worker(ferry):
    worker, status, body, headers = on_worker(
        ferry, None, "POST", INFER, PIXELS, ferry.keys["infer"],
        headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert status == 200, body
    m = HEADER.fullmatch(headers["traceparent"])
    assert m and m.group(1) == TRACE and m.group(2) != PARENT and m.group(3) == "01"
    spans = _wait_for(ferry, TRACE, 4, avoid=worker)
    by_name = {s["operation_name"]: s for s in spans}
    assert len(spans) == 4 and set(by_name) == {
        "POST /v2/models/{model}/infer", "ferry.dispatch", "engine.queue", "engine.execute"}
    s = by_name["POST /v2/models/{model}/infer"]
    assert s["span_id"] == m.group(2) and s["parent_span_id"] == PARENT
    assert s["operation_name"] == "POST /v2/models/{model}/infer" and s["status"] == "ok"
    assert s["attributes"]["http.response.status_code"] == 200
    assert s["attributes"]["ferry.request_id"] == headers["X-Request-ID"]
    assert s["duration_ms"] > 0 and s["start_time"].endswith("Z")
    dispatch, queue, execute = (by_name[n] for n in ("ferry.dispatch", "engine.queue",
                                                     "engine.execute"))
    assert dispatch["parent_span_id"] == s["span_id"]
    assert queue["parent_span_id"] == execute["parent_span_id"] == dispatch["span_id"]
    assert dispatch["attributes"]["ferry.model"] == "digits"
    assert dispatch["attributes"]["ferry.engine"] == execute["attributes"]["ferry.engine"]
    assert execute["attributes"]["ferry.batch_size"] == 1
    assert 0 < execute["attributes"]["ferry.compute_ms"] <= execute["duration_ms"]
    assert all(x["status"] == "ok" for x in spans)
    # nesting, to the millisecond start_time carries: queue, then execute, inside dispatch,
    # inside the server span
    assert_nested(s, dispatch)
    assert_nested(dispatch, queue)
    assert_nested(dispatch, execute)
    assert _start(queue) <= _start(execute) + 0.001


def _start(span: dict) -> float:
    return datetime.fromisoformat(span["start_time"].replace("Z", "+00:00")).timestamp()


def assert_nested(parent: dict, child: dict) -> None:
    """`child` lies within `parent` (start_time has millisecond precision: 1 ms of slack)."""
    p0, c0 = _start(parent), _start(child)
    assert p0 <= c0 <= p0 + parent["duration_ms"] / 1e3 + 0.001, (parent, child)
    assert c0 + child["duration_ms"] / 1e3 <= p0 + parent["duration_ms"] / 1e3 + 0.001, \
        (parent, child)


def test_a_request_without_traceparent_starts_a_trace(ferry):
    status, headers, _ = call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS)
    m = HEADER.fullmatch(headers["traceparent"])
    assert status == 200 and m and m.group(3) == "01"
    spans = {s["operation_name"]: s for s in _wait_for(ferry, m.group(1), 4)}
    server = spans["POST /v2/models/{model}/infer"]
    assert server["parent_span_id"] is None and server["span_id"] == m.group(2)


@pytest.mark.parametrize("bad", [
    "garbage", f"ff-{TRACE}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE.upper()}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01-x",
    f"00-{TRACE[:-1]}-{PARENT}-01", f"00_{TRACE}_{PARENT}_01", "00-" + "é" * 32,
])
def test_a_malformed_traceparent_starts_a_new_trace(ferry, bad):
    status, headers, body = call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS,
                                 headers={"traceparent": bad})
    assert status == 200, body
    m = HEADER.fullmatch(headers["traceparent"])
    assert m and m.group(1) != TRACE.lower()
    if bad == "garbage":     # the new trace has the whole tree, rooted at the server span
        spans = {s["operation_name"]: s for s in _wait_for(ferry, m.group(1), 4)}
        server = spans["POST /v2/models/{model}/infer"]
        assert server["parent_span_id"] is None and server["span_id"] == m.group(2)
        assert spans["ferry.dispatch"]["parent_span_id"] == server["span_id"]
        assert spans["engine.execute"]["parent_span_id"] == spans["ferry.dispatch"]["span_id"]


def test_a_later_version_with_more_fields_is_continued(ferry):
    status, headers, _ = call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS,
                              headers={"traceparent": f"01-{TRACE[::-1]}-{PARENT}-01-future"})
    m = HEADER.fullmatch(headers["traceparent"])
    assert status == 200 and m.group(1) == TRACE[::-1] and m.group(3) == "01"
    assert len(_wait_for(ferry, TRACE[::-1], 4)) == 4


def test_an_unsampled_traceparent_is_continued_but_not_recorded(ferry):
    unsampled, sampled = "d" * 31 + "3", "d" * 31 + "4"
    pid = None
    for trace, flags in ((unsampled, "00"), (sampled, "01")):
        pid, status, _, headers = on_worker(ferry, pid, "POST", INFER, PIXELS,
                                            ferry.keys["infer"],
                                            headers={"traceparent": f"00-{trace}-{PARENT}-{flags}"})
        m = HEADER.fullmatch(headers["traceparent"])
        assert status == 200 and m.group(1) == trace and m.group(3) == flags
    # the same worker recorded the sampled request after the unsampled one, so once its spans
    # are in the ring the unsampled request's would be too
    assert len(_wait_for(ferry, sampled, 4)) == 4
    assert _traces(ferry, f"?trace_id={unsampled}") == []


def test_prompt_template_rendering_is_a_child_span(ferry):
    status, _, body = call(ferry, "POST", "/admin/prompt-templates", key=ferry.keys["admin"],
                           body={"name": "traced", "template": "Hi {{ who }}"})
    assert status == 201, body
    trace = "a" * 31 + "1"
    # digits is not a text model: the render happens, then the request is refused (4xx).
    status, headers, body = call(
        ferry, "POST", "/v1/chat/completions", key=ferry.keys["infer"],
        headers={"traceparent": f"00-{trace}-{PARENT}-01"},
        body={"model": "digits", "messages": [],
              "prompt_template": {"name": "traced", "variables": {"who": "you"}}})
    assert 400 <= status < 500, body
    server_span = HEADER.fullmatch(headers["traceparent"]).group(2)
    spans = {s["operation_name"]: s for s in _wait_for(ferry, trace, 2)}
    render = spans["prompt_template.render"]
    assert render["parent_span_id"] == server_span and render["status"] == "ok"
    assert render["attributes"]["ferry.template"] == "traced"
    server = spans["POST /v1/chat/completions"]
    assert server["attributes"]["http.response.status_code"] == status
    # A render that fails marks its span.
    status, _, body = call(
        ferry, "POST", "/v1/chat/completions", key=ferry.keys["infer"],
        headers={"traceparent": f"00-{'b' * 32}-{PARENT}-01"},
        body={"model": "digits", "messages": [], "prompt_template": {"name": "traced"}})
    assert (status, error_code(body)) == (400, "template_render_error")
    failed = {s["operation_name"]: s for s in _wait_for(ferry, "b" * 32, 2)}
    assert failed["prompt_template.render"]["status"] == "error"
    assert failed["prompt_template.render"]["attributes"]["error.type"] == \
        "template_render_error"


def test_each_batch_item_is_a_trace_with_its_engine_spans(ferry):
    items = [{"custom_id": f"c{i}", "url": INFER, "body": PIXELS} for i in range(2)]
    status, _, job = call(ferry, "POST", "/v1/batches", key=ferry.keys["infer"],
                          body={"requests": items})
    assert status in (200, 201), job

    def roots():
        found = [s for s in _traces(ferry, "?limit=1000")
                 if s["operation_name"] == f"batch {INFER}"
                 and s["attributes"].get("ferry.batch_id") == job["id"]]
        return found if len(found) == 2 else None
    found = None
    deadline = time.monotonic() + 60
    while found is None and time.monotonic() < deadline:
        found = roots()
        time.sleep(0.2)   # polling interval; the deadline decides
    assert found, "the batch items' spans were not recorded"
    assert sorted(r["attributes"]["ferry.batch_item"] for r in found) == [0, 1]
    for root in found:
        assert root["parent_span_id"] is None and root["status"] == "ok"
        spans = {s["operation_name"]: s for s in _wait_for(ferry, root["trace_id"], 4)}
        assert spans["ferry.dispatch"]["parent_span_id"] == root["span_id"]
        assert spans["engine.execute"]["parent_span_id"] == spans["ferry.dispatch"]["span_id"]
        assert_nested(root, spans["ferry.dispatch"])


def test_probes_and_scrapes_are_not_traced(ferry):
    for path in ("/metrics", "/healthz", "/v2/health/ready"):
        status, headers, _ = call(ferry, "GET", path)
        assert status == 200 and "traceparent" not in {k.lower() for k in headers}, path


def test_the_span_ring_is_bounded(ferry):
    for _ in range(BUFFER // 4 + 20):            # 280 spans
        assert call(ferry, "POST", INFER, key=ferry.keys["infer"], body=PIXELS)[0] == 200
    for _ in range(3):        # whichever worker answers, after its own flush
        spans = _traces(ferry, "?limit=1000")
        assert 0 < len(spans) <= BUFFER
    newest = _traces(ferry, "?limit=5")
    assert len(newest) == 5
    assert [s["start_time"] for s in newest] == sorted((s["start_time"] for s in newest),
                                                       reverse=True)


@pytest.mark.parametrize("query,code", [
    ("?limit=0", "invalid_parameter"), ("?limit=1001", "invalid_parameter"),
    ("?limit=abc", "invalid_parameter"), ("?limit=99999999999", "invalid_parameter"),
    ("?limit=-1", "invalid_parameter"), ("?trace_id=xyz", "invalid_parameter"),
    (f"?trace_id={TRACE.upper()}", "invalid_parameter"), ("?colour=red", "unknown_parameter"),
])
def test_bad_trace_queries(ferry, query, code):
    status, _, body = call(ferry, "GET", "/traces" + query, key=ferry.keys["admin"])
    assert (status, error_code(body)) == (400, code), body


def test_traces_need_the_admin_scope(ferry):
    assert call(ferry, "GET", "/traces")[0] == 401
    status, _, body = call(ferry, "GET", "/traces", key=ferry.keys["infer"])
    assert (status, error_code(body)) == (403, "insufficient_scope")


# -- OTLP export to an in-process collector ------------------------------------------------------

@pytest.fixture(scope="module")
def exported(demo_models, tmp_path_factory):
    collector = Collector(fail=2)
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
                     extra_config=f'[tracing]\notlp_endpoint = "{collector.url}"\n')
    d.start()
    yield d, collector
    code = d.stop()
    collector.close()
    assert code == 0, d.log()[-4000:]


def test_spans_are_exported_over_otlp_http(exported):
    d, collector = exported
    trace = "c" * 31 + "2"
    deadline = time.monotonic() + 30
    tree: dict = {}
    while not tree and time.monotonic() < deadline:
        # the first batches meet a collector that is down (503): dropped, requests unharmed
        status, headers, _ = call(d, "POST", INFER, body=PIXELS,
                                  headers={"traceparent": f"00-{trace}-{PARENT}-01"})
        assert status == 200
        time.sleep(0.2)   # polling interval; the deadline decides
        tree = exported_tree(collector, trace, "POST /v2/models/{model}/infer")
    assert tree, "no whole span tree reached the collector"
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
    resource, span = tree["POST /v2/models/{model}/infer"]
    assert span.parent_span_id.hex() == PARENT and len(span.span_id) == 8
    assert span.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert span.status.code == Status.StatusCode.STATUS_CODE_UNSET
    assert span.end_time_unix_nano > span.start_time_unix_nano > 1.7e18
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["http.route"].string_value == "/v2/models/{model}/infer"
    res = {kv.key: kv.value.string_value for kv in resource.resource.attributes}
    assert res["service.name"] == "ferry" and res["service.instance.id"].startswith("http")
    dispatch, queue, execute = (tree[n][1] for n in ("ferry.dispatch", "engine.queue",
                                                     "engine.execute"))
    assert dispatch.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert queue.kind == execute.kind == Span.SpanKind.SPAN_KIND_INTERNAL
    assert {kv.key: kv.value for kv in execute.attributes}["ferry.batch_size"].int_value == 1
    # times nest to the microsecond (Unix seconds in a double carry ~0.24 µs): server ⊇
    # dispatch ⊇ queue, execute; queue ends as execute starts
    for parent, child in ((span, dispatch), (dispatch, queue), (dispatch, execute)):
        assert parent.start_time_unix_nano <= child.start_time_unix_nano + 1000
        assert child.end_time_unix_nano <= parent.end_time_unix_nano + 1000
    assert queue.end_time_unix_nano <= execute.start_time_unix_nano + 1000
    assert set(collector.content_types) == {"application/x-protobuf"}
    assert collector.fail == 0      # the two refused batches were sent, and the export went on


def exported_tree(collector: Collector, trace: str, root: str) -> dict:
    """{span name: (resource spans, span)} of one request whose server span is named `root`:
    its server span, and every span below it that reached the collector; {} until the server
    span, the dispatch span and two engine spans under it are all there."""
    spans = [(rs, s) for rs, s in collector.spans() if s.trace_id.hex() == trace]
    for rs, server in spans:
        if server.name != root:
            continue
        tree = {root: (rs, server)}
        frontier = [server.span_id]
        while frontier:
            parent = frontier.pop()
            for rs2, s in spans:
                if s.parent_span_id == parent:
                    tree[s.name] = (rs2, s)
                    frontier.append(s.span_id)
        if {"ferry.dispatch", "engine.queue", "engine.execute"} <= set(tree):
            return tree
    return {}
