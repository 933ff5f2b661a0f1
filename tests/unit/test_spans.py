"""frontends/spans.py: W3C traceparent parsing, server spans and sampling, and the engine's
timings turned into spans under the dispatch span (parents, clock conversion, clamping)."""
from __future__ import annotations

import time

import pytest

from daemon import protocol as P
from frontends import spans as S

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize("value,expected", [
    (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, "01")),
    (f" 00-{TRACE}-{PARENT}-00 ", (TRACE, PARENT, "00")),
    (f"01-{TRACE}-{PARENT}-01-later", (TRACE, PARENT, "01")),
    (f"00-{TRACE}-{PARENT}-01-x", None), (f"ff-{TRACE}-{PARENT}-01", None),
    (f"00-{'0' * 32}-{PARENT}-01", None), (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None), ("", None), (None, None), ("garbage", None),
])
def test_parse_traceparent(value, expected):
    assert S.parse_traceparent(value) == expected


def test_ids_are_hex_of_the_right_length_and_never_zero():
    ids = {S.new_id(8) for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and int(i, 16) for i in ids)
    assert len(S.new_id(16)) == 32


def _tree(tracer: S.Tracer) -> dict[str, object]:
    return {s.name: s for s in tracer.pending}


def test_a_traced_tensor_request_makes_dispatch_and_engine_spans():
    tracer = S.Tracer("test")
    server = S.ServerSpan(tracer, f"00-{TRACE}-{PARENT}-01", "ZMQ infer")
    dispatch = S.DispatchSpan.begin("cpu", "digits", 1)
    assert dispatch is not None
    assert S.parse_traceparent(dispatch.traceparent) == (TRACE, dispatch.record.span_id, "01")
    now = time.monotonic()
    us = lambda t: int(t * 1e6)  # noqa: E731
    dispatch.reply = P.InferResult("r", [], 100, 1500, 4,
                                   timing=[us(now), us(now + 0.001), us(now + 0.003)])
    time.sleep(0.005)     # the reply arrives after the engine finished
    dispatch.finish()
    server.end(False, **{"ferry.model": "digits"})
    spans = _tree(tracer)
    assert set(spans) == {"ZMQ infer", "ferry.dispatch", "engine.queue", "engine.execute"}
    root, d, q, e = (spans[n] for n in ("ZMQ infer", "ferry.dispatch", "engine.queue",
                                        "engine.execute"))
    assert (root.parent_span_id, root.kind, d.kind, e.kind) == (PARENT, "server", "client",
                                                                "internal")
    assert d.parent_span_id == root.span_id and q.parent_span_id == e.parent_span_id == d.span_id
    assert q.duration_ms == pytest.approx(1.0, abs=0.01)
    assert e.duration_ms == pytest.approx(2.0, abs=0.01)
    assert e.start == pytest.approx(q.start + 0.001, abs=1e-5)
    assert e.attributes == {"ferry.engine": "cpu", "ferry.batch_size": 4,
                            "ferry.compute_ms": 1.5}
    for child in (q, e):
        assert d.start <= child.start and child.start + child.duration_ms / 1e3 <= \
            d.start + d.duration_ms / 1e3 + 1e-6


def test_llm_timings_make_prefill_and_decode_spans_and_are_clamped_to_the_dispatch_span():
    tracer = S.Tracer("test")
    server = S.ServerSpan(tracer, None, "POST /v1/completions")
    dispatch = S.DispatchSpan.begin("cpu", "smollm2", 1)
    assert dispatch is not None
    t0 = dispatch.started
    us = lambda t: int(t * 1e6)  # noqa: E731
    # a received time before the dispatch began (it cannot be) is clamped to its start
    dispatch.reply = P.Tokens("g", [5], finished=True, finish_reason="length", timing=[
        us(t0 - 1.0), us(t0 + 0.002), us(t0 + 0.010), us(t0 + 0.030), 9, 2])
    while time.monotonic() < t0 + 0.031:
        pass
    dispatch.finish()
    server.end(False)
    spans = _tree(tracer)
    q, e, p, dec = (spans[n] for n in ("engine.queue", "engine.execute", "engine.prefill",
                                       "engine.decode"))
    d = spans["ferry.dispatch"]
    assert q.start == d.start and q.duration_ms == pytest.approx(2.0, abs=0.01)
    assert p.parent_span_id == dec.parent_span_id == e.span_id
    assert p.duration_ms == pytest.approx(8.0, abs=0.01)
    assert dec.duration_ms == pytest.approx(20.0, abs=0.01)
    assert (e.attributes["ferry.steps"], e.attributes["ferry.prefill_steps"],
            e.attributes["ferry.decode_steps"]) == (9, 2, 7)
    assert e.attributes["ferry.prefill_ms"] == pytest.approx(8.0, abs=0.01)


def test_an_unsampled_or_untraced_task_records_nothing_and_sends_no_context():
    tracer = S.Tracer("test")
    assert S.DispatchSpan.begin("cpu", "m", 1) is None          # outside any request
    server = S.ServerSpan(tracer, f"00-{TRACE}-{PARENT}-00", "GET /x")
    assert server.traceparent.endswith("-00") and TRACE in server.traceparent
    assert S.DispatchSpan.begin("cpu", "m", 1) is None
    with S.span("child") as child:
        assert child is None
    server.end(False)
    assert not tracer.pending
    assert S.DispatchSpan.begin("cpu", "m", 1) is None          # the context was reset


def test_an_engine_error_marks_the_dispatch_span():
    tracer = S.Tracer("test")
    server = S.ServerSpan(tracer, None, "POST /v2/models/{model}/infer")
    dispatch = S.DispatchSpan.begin("cpu", "digits", 1)
    assert dispatch is not None
    dispatch.error = "invalid_shape"
    dispatch.finish()
    server.end(False)
    d = _tree(tracer)["ferry.dispatch"]
    assert d.status == "error" and d.attributes["error.type"] == "invalid_shape"
    assert {s.name for s in tracer.pending} == {"ferry.dispatch", server.record.name}


@pytest.mark.parametrize("ratio,recorded", [(0.0, 0), (1.0, 200)])
def test_sample_ratio_decides_new_traces_only(ratio, recorded):
    tracer = S.Tracer("test")
    tracer.configure({"tracing": {"sample_ratio": ratio}})
    for _ in range(200):
        server = S.ServerSpan(tracer, None, "GET /x")
        assert server.traceparent.endswith("-01" if ratio else "-00")
        assert (S.DispatchSpan.begin("cpu", "m", 1) is None) == (not ratio)
        server.end(False)
    assert len(tracer.pending) == recorded
    tracer.pending.clear()
    # a caller's decision wins over the ratio, both ways
    for flags, n in (("01", 1), ("00", 1)):        # n: recorded so far
        S.ServerSpan(tracer, f"00-{TRACE}-{PARENT}-{flags}", "GET /x").end(False)
        assert len(tracer.pending) == n


def test_a_fractional_ratio_samples_about_that_share():
    tracer = S.Tracer("test")
    tracer.configure({"tracing": {"sample_ratio": 0.25}})
    for _ in range(4000):
        S.ServerSpan(tracer, None, "GET /x").end(False)
    assert 800 < len(tracer.pending) < 1200        # 1000 expected; 6 standard deviations


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "1"])
def test_a_bad_published_ratio_keeps_the_current_one(bad):
    tracer = S.Tracer("test")
    tracer.configure({"tracing": {"sample_ratio": 0.5}})
    tracer.configure({"tracing": {"sample_ratio": bad}})
    assert tracer.sample_ratio == 0.5
