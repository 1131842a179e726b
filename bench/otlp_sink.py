"""An OTLP/gRPC trace receiver for `make bench`'s verify-traced phase: the collector's
TraceService (opentelemetry-proto), answering every export at once and counting the spans, so
the phase measures what tracing costs the service, not what a collector costs."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        names = Counter(
            span.name
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        )
        with self._lock:
            self.spans.update(names)
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None)

    def describe(self) -> str:
        with self._lock:
            total = sum(self.spans.values())
            top = ", ".join(f"{name} {count}" for name, count in self.spans.most_common(4))
        return f"   OTLP receiver: {total} spans in the whole phase ({top})"
