"""OTLP/HTTP export of trace spans (off unless `[tracing] otlp_endpoint` is set).

Each frontend process (HTTP workers, the ZMQ frontend) sends its own finished spans, the
engine's spans of its requests among them, in the batches frontends/spans.py flushes, as one protobuf `ExportTraceServiceRequest` POSTed to `<otlp_endpoint>/v1/traces`
(`Content-Type: application/x-protobuf`), the OTLP/HTTP binding every collector (the
OpenTelemetry Collector, Jaeger, Tempo) accepts. The messages come from the `opentelemetry-proto`
package (the protobufs alone, no SDK). A collector that is down or slow costs a batch, never a
request: the send has a 2 s timeout, failures are logged once per outage and the batch is
dropped.
"""
from __future__ import annotations

import logging
from typing import Any

import aiohttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from daemon import __version__
from daemon.state.spans import SpanRecord

__all__ = ["encode", "OtlpExporter"]

log = logging.getLogger(__name__)
_TIMEOUT_S = 2.0


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


_KINDS = {"server": Span.SpanKind.SPAN_KIND_SERVER, "client": Span.SpanKind.SPAN_KIND_CLIENT}


def _span(record: SpanRecord) -> Span:
    start = int(record.start * 1e9)
    return Span(
        trace_id=bytes.fromhex(record.trace_id), span_id=bytes.fromhex(record.span_id),
        parent_span_id=bytes.fromhex(record.parent_span_id) if record.parent_span_id else b"",
        name=record.name,
        kind=_KINDS.get(record.kind, Span.SpanKind.SPAN_KIND_INTERNAL),
        start_time_unix_nano=start, end_time_unix_nano=start + int(record.duration_ms * 1e6),
        attributes=[KeyValue(key=k, value=_value(v)) for k, v in record.attributes.items()],
        status=Status(code=Status.StatusCode.STATUS_CODE_ERROR if record.status == "error"
                      else Status.StatusCode.STATUS_CODE_UNSET))


def encode(spans: list[SpanRecord], instance: str = "http0") -> bytes:
    """The serialized ExportTraceServiceRequest of `spans` (service.name "ferry"; the
    process that recorded them as service.instance.id: http0, http1, ..., zmq)."""
    resource = Resource(attributes=[
        KeyValue(key="service.name", value=AnyValue(string_value="ferry")),
        KeyValue(key="service.version", value=AnyValue(string_value=__version__)),
        KeyValue(key="service.instance.id", value=AnyValue(string_value=instance))])
    scope = InstrumentationScope(name="ferry", version=__version__)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource, scope_spans=[ScopeSpans(scope=scope,
                                                   spans=[_span(s) for s in spans])])])
    return request.SerializeToString()


class OtlpExporter:
    """Sends batches to one collector; `close()` when the worker stops."""

    def __init__(self, endpoint: str, instance: str = "http0") -> None:
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self.instance = instance
        self._session: aiohttp.ClientSession | None = None
        self._failing = False

    async def export(self, spans: list[SpanRecord]) -> bool:
        if not spans:
            return True
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S))
        try:
            async with self._session.post(
                    self.url, data=encode(spans, self.instance),
                    headers={"Content-Type": "application/x-protobuf"}) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                why = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok and not self._failing:
            log.warning("OTLP export to %s failing (%s); spans are dropped until it recovers",
                        self.url, why)
        elif ok and self._failing:
            log.info("OTLP export to %s recovered", self.url)
        self._failing = not ok
        return ok

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
