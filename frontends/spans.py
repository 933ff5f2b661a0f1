"""Trace spans of one frontend process (an HTTP worker or the ZMQ frontend), across processes.

A request's server span (`ServerSpan`: HTTP in frontends/http/tracing.py, ZMQ in
frontends/zmq/server.py) becomes the current span of the task serving it. When that task sends
work to an engine, the dispatcher opens a `DispatchSpan` (`ferry.dispatch`, kind client) under
it and puts the dispatch span's context on the wire (`trace` of Infer / Generate, W3C
traceparent form). The engine then times the request and returns the times with its final reply
(`timing`, daemon/protocol.py TRACING), and the dispatch span turns them into engine spans under
itself, on the frontend's clock (both sides read CLOCK_MONOTONIC, which is host-wide):

    POST /v1/chat/completions | ZMQ generate                  (server)
      ferry.dispatch         frontend → engine → reply        (client; ferry.engine, model)
        engine.queue         received → first scheduled / batch taken
        engine.execute       → finished (tensor: ferry.batch_size, ferry.compute_ms;
                               LLM: ferry.steps, ferry.prefill_steps, ferry.prefill_ms,
                               ferry.decode_ms)
          engine.prefill     LLM: first scheduled → first token
          engine.decode      LLM: first token → finished

A W3C traceparent whose sampled flag is 0 is continued (the response carries it) but nothing is
recorded and nothing goes to the engine, as OpenTelemetry's parent-based sampler does; a
request without one starts a sampled trace with probability `[tracing] sample_ratio` (1: all;
the unsampled ones answer flags 00, so what they call downstream is not recorded either). With
`[tracing] enabled = false` no span exists at all: the request path then pays a contextvar read
and a None check in the dispatcher, and untraced messages are byte for byte untraced ones.

Finished spans wait in the process's bounded buffer (`Tracer`) and are written every half
second to the state database's ring (daemon/state/spans.py) and, with `[tracing]
otlp_endpoint`, to the OTLP collector (frontends/http/otlp.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from daemon import protocol as P
from daemon.errors import FerryError
from daemon.state.db import Database
from daemon.state.spans import SpanRecord, SpanStore

if TYPE_CHECKING:      # the exporter (protobufs, an HTTP client) loads only when configured
    from frontends.http.otlp import OtlpExporter

__all__ = ["Tracer", "ServerSpan", "DispatchSpan", "span", "parse_traceparent", "new_id",
           "run_flusher"]

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
FLUSH_S = 0.5
_CURRENT: ContextVar[SpanRecord | None] = ContextVar("ferry_trace_span", default=None)
_TRACER: ContextVar[Tracer | None] = ContextVar("ferry_tracer", default=None)


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid W3C traceparent, else None.

    Version ff and all-zero ids are invalid; a later version may append fields after a '-'.
    """
    if not value:
        return None
    value = value.strip()
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent, flags = m.groups()
    if version == "ff" or trace_id == "0" * 32 or parent == "0" * 16:
        return None
    if len(value) != 55 and (version == "00" or value[55:56] != "-"):
        return None
    return trace_id, parent, flags


def new_id(nbytes: int) -> str:
    """A random non-zero id of `nbytes` bytes as lowercase hex (W3C: ids are random, not
    secret; `random` rather than `secrets` keeps a syscall off the request path)."""
    while True:
        value = random.getrandbits(nbytes * 8)
        if value:
            return f"{value:0{nbytes * 2}x}"


class Tracer:
    """One process's finished spans, waiting to be written (bounded: the oldest drop)."""

    def __init__(self, instance: str = "http0", buffer_spans: int = 2048) -> None:
        self.instance = instance              # service.instance.id in OTLP: http0, zmq
        self.enabled = True
        self.sample_ratio = 1.0               # of traces this process starts
        self.buffer_spans = buffer_spans
        self.pending: deque[SpanRecord] = deque(maxlen=buffer_spans)
        self.exporter: OtlpExporter | None = None
        self._failing = False
        self._tasks: set[asyncio.Task] = set()

    def record(self, record: SpanRecord) -> None:
        self.pending.append(record)

    async def flush(self, db: Database | None) -> None:
        """Write the waiting spans to the shared ring, and to the OTLP collector if one is
        configured."""
        if db is None or not self.pending:
            return
        batch = list(self.pending)
        self.pending.clear()
        try:
            await SpanStore(db).write(batch, self.buffer_spans)
            self._failing = False
        except FerryError as exc:
            if not self._failing:
                log.warning("trace spans not stored: %s", exc.message)
            self._failing = True
        if self.exporter is not None:
            await self.exporter.export(batch)

    def configure(self, config: dict[str, Any]) -> None:
        """Apply a published `[tracing]` section (at start and on SIGHUP); call on the loop."""
        section = config.get("tracing") or {}
        enabled, size = section.get("enabled", True), section.get("buffer_spans")
        endpoint, ratio = section.get("otlp_endpoint") or "", section.get("sample_ratio", 1.0)
        if isinstance(enabled, bool):
            self.enabled = enabled
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1:
            self.sample_ratio = float(ratio)
        if isinstance(size, int) and size >= 1 and size != self.buffer_spans:
            self.buffer_spans = size
            self.pending = deque(self.pending, maxlen=size)
        if isinstance(endpoint, str) and (endpoint or self.exporter is not None):
            task = asyncio.get_running_loop().create_task(self._set_endpoint(endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _set_endpoint(self, endpoint: str) -> None:
        current = self.exporter.url if self.exporter is not None else None
        if endpoint and current == endpoint.rstrip("/") + "/v1/traces":
            return
        if self.exporter is not None:
            await self.exporter.close()
        from frontends.http.otlp import OtlpExporter
        self.exporter = OtlpExporter(endpoint, self.instance) if endpoint else None

    async def close(self) -> None:
        if self.exporter is not None:
            await self.exporter.close()
            self.exporter = None


async def run_flusher(tracer: Tracer, db: Callable[[], Database | None],
                      stop: asyncio.Event) -> None:
    """Flush every FLUSH_S until `stop` is set, then once more."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_S)
        await tracer.flush(db())
    await tracer.close()


# -- the request's own span ---------------------------------------------------------------------

class ServerSpan:
    """A request's server span, current in the calling task until `end()` (call it in the same
    task, in a `finally`)."""

    __slots__ = ("record", "flags", "sampled", "_tracer", "_tokens", "_started")

    def __init__(self, tracer: Tracer, traceparent: str | None, name: str) -> None:
        parent = parse_traceparent(traceparent)
        if parent is not None:
            trace_id, parent_id, flags = parent
        else:       # a new trace: sampled with probability sample_ratio
            ratio = tracer.sample_ratio
            trace_id, parent_id = new_id(16), None
            flags = "01" if ratio >= 1.0 or random.random() < ratio else "00"
        self.record = SpanRecord(trace_id, new_id(8), parent_id, name, time.time(),
                                 kind="server")
        self.flags = flags
        self.sampled = int(flags, 16) & 1 == 1
        self._tracer = tracer
        self._tokens = (_CURRENT.set(self.record if self.sampled else None),
                        _TRACER.set(tracer))
        self._started = time.perf_counter()

    @property
    def traceparent(self) -> str:
        return f"00-{self.record.trace_id}-{self.record.span_id}-{self.flags}"

    def end(self, error: bool, **attributes: Any) -> None:
        _CURRENT.reset(self._tokens[0])
        _TRACER.reset(self._tokens[1])
        record = self.record
        record.duration_ms = (time.perf_counter() - self._started) * 1000.0
        record.status = "error" if error else "ok"
        record.attributes.update(attributes)
        if self.sampled:
            self._tracer.record(record)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[SpanRecord | None]:
    """A child of the current request's span, recorded when the block ends (an exception marks
    it "error"); a no-op outside a traced request."""
    parent = _CURRENT.get()
    tracer = _TRACER.get()
    if parent is None or tracer is None:
        yield None
        return
    child = SpanRecord(parent.trace_id, new_id(8), parent.span_id, name, time.time(),
                       attributes=dict(attributes))
    token = _CURRENT.set(child)
    started = time.perf_counter()
    try:
        yield child
    except BaseException as exc:
        child.status = "error"
        child.attributes["error.type"] = getattr(exc, "code", type(exc).__name__)
        raise
    finally:
        _CURRENT.reset(token)
        child.duration_ms = (time.perf_counter() - started) * 1000.0
        tracer.record(child)


# -- the dispatcher's span and the engine's -----------------------------------------------------

class DispatchSpan:
    """One request's trip to an engine: `begin()` in the task that sends it (None when the task
    is not traced), `finish()` once it ended, with the engine's final reply when there was
    one."""

    __slots__ = ("tracer", "record", "parent_start", "started", "reply", "error")

    def __init__(self, tracer: Tracer, parent: SpanRecord, attributes: dict[str, Any]) -> None:
        self.tracer = tracer
        self.record = SpanRecord(parent.trace_id, new_id(8), parent.span_id, "ferry.dispatch",
                                 0.0, attributes=attributes, kind="client")
        self.parent_start = parent.start
        self.started = time.monotonic()
        self.reply: P.InferResult | P.Tokens | None = None
        self.error: str | None = None

    @classmethod
    def begin(cls, engine: str, model: str, version: int) -> DispatchSpan | None:
        parent = _CURRENT.get()
        if parent is None:
            return None
        tracer = _TRACER.get()
        if tracer is None:
            return None
        return cls(tracer, parent, {"ferry.engine": engine, "ferry.model": model,
                                    "ferry.model_version": version})

    @property
    def traceparent(self) -> str:
        """The context the engine continues: this span, sampled."""
        return f"00-{self.record.trace_id}-{self.record.span_id}-01"

    def finish(self) -> None:
        ended = time.monotonic()
        offset = time.time() - ended          # CLOCK_MONOTONIC → Unix time, once for all
        record = self.record
        record.start = max(self.started + offset, self.parent_start)
        end = max(ended + offset, record.start)
        record.duration_ms = (end - record.start) * 1000.0
        if self.error is not None:
            record.status = "error"
            record.attributes["error.type"] = self.error
        self.tracer.record(record)
        reply = self.reply
        if reply is None or not reply.timing:
            return
        bounds = (record.start, end)
        timing = reply.timing
        if isinstance(reply, P.InferResult) and len(timing) >= 3:
            received, started, finished = (t / 1e6 + offset for t in timing[:3])
            self._child("engine.queue", bounds, received, started, {})
            self._child("engine.execute", bounds, started, finished, {
                "ferry.batch_size": reply.batch_size,
                "ferry.compute_ms": round(reply.compute_us / 1000.0, 3)})
        elif isinstance(reply, P.Tokens) and len(timing) >= 6:
            received, scheduled, first, finished = (t / 1e6 + offset for t in timing[:4])
            steps, prefill_steps = timing[4], timing[5]
            if not timing[2]:
                first = finished
            attrs = {"ferry.steps": steps, "ferry.prefill_steps": prefill_steps,
                     "ferry.decode_steps": steps - prefill_steps,
                     "ferry.prefill_ms": round((first - scheduled) * 1000.0, 3),
                     "ferry.decode_ms": round((finished - first) * 1000.0, 3)}
            self._child("engine.queue", bounds, received, scheduled, {})
            execute = self._child("engine.execute", bounds, scheduled, finished, attrs)
            inner = (execute.start, execute.start + execute.duration_ms / 1000.0)
            self._child("engine.prefill", inner, scheduled, first, {}, execute.span_id)
            if timing[2]:
                self._child("engine.decode", inner, first, finished, {}, execute.span_id)

    def _child(self, name: str, bounds: tuple[float, float], start: float, end: float,
               attributes: dict[str, Any], parent: str | None = None) -> SpanRecord:
        start = min(max(start, bounds[0]), bounds[1])
        end = min(max(end, start), bounds[1])
        child = SpanRecord(self.record.trace_id, new_id(8), parent or self.record.span_id,
                           name, start, (end - start) * 1000.0,
                           attributes={"ferry.engine": self.record.attributes["ferry.engine"],
                                       **attributes})
        self.tracer.record(child)
        return child
