"""An in-process OTLP/HTTP trace collector for the tracing tests, built on the OTLP protobufs
(opentelemetry-proto), not on the SDK."""
from __future__ import annotations


class Collector:
    """An OTLP/HTTP trace receiver: decodes each POST /v1/traces body with the OTLP protobufs;
    answers `fail` 503s first (a collector that is down), then 200."""

    def __init__(self, fail: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)
        self.requests: list = []
        self.content_types: list[str] = []
        self.fail = fail
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):    # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    self.send_response(404)
                elif collector.fail > 0:
                    collector.fail -= 1
                    self.send_response(503)
                else:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    collector.requests.append(req)
                    collector.content_types.append(self.headers["Content-Type"])
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list:
        return [(rs, span) for req in self.requests for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
