"""OpenTelemetry tracing, exported over OTLP/gRPC: off unless the OTEL_* variables turn it on
(config.py's `_tracing`), and then set up once per serving process (each worker of
`serve --workers N` after it is spawned).

What records what (docs/operations.md, "Tracing"):

- the call: a SERVER span per TwoFactorService call from the maintained gRPC instrumentation's
  aio server interceptor, which continues the caller's W3C `traceparent` and composes with the
  call pipeline (it wraps the handlers the pipeline made, so the span covers the whole pipeline,
  refusals and malformed requests included). At the call's end the pipeline's reporter adds
  what only the pipeline knows: the final status code and the refusal's ErrorInfo reason.
- the database work: a CLIENT span per statement from the maintained asyncpg instrumentation,
  with the statement's text and never its parameters (`capture_parameters` stays off).
- a VerifyCode batch: the calls it settles share its two statements, which belong to no single
  call; they are children of a span of its own, which links every call it settled (and every
  call links back to it). Hand-written: no instrumentation knows the batcher.

Never recorded: requests, responses, metadata values (only the instrumentation's user agent
and peer address, and the request id), statement parameters. So no password, code, secret,
session token or ticket reaches a span (tests/test_tracing.py checks every attribute).

This module imports OpenTelemetry; nothing imports it while tracing is off, so the calls of a
service without tracing run no OpenTelemetry code at all (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from twofactor_service.policy import SERVICE as SERVICE_DESCRIPTOR
from twofactor_service.transport.call_context import call_info
from twofactor_service.transport.pipeline import Context, Report

log = logging.getLogger(__name__)

SERVICE = "twofactor-service"
# How long a graceful stop waits for the last spans to reach the collector.
FLUSH_WITHIN_SECONDS = 5.0


class _CallsOnly(Sampler):
    """The configured sampler (OTEL_TRACES_SAMPLER), for spans that belong to a call or a
    VerifyCode batch. A database span with no parent is the server's own background work (the
    health check's `SELECT` every second, the audit chain's sealing, housekeeping): dropped, so
    a trace is a call's."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"CallsOnly{{{self.inner.get_description()}}}"


class Tracing:
    """The process's tracer provider, its exporter, and the hooks the server uses."""

    def __init__(self) -> None:
        resource = Resource.create({"process.pid": os.getpid()})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            # OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service when set.
            resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
        # The SDK reads the OTEL_* variables: the sampler, the span limits, the batching
        # (OTEL_BSP_*), and the exporter's endpoint, headers, certificates and timeout.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.sampler = _CallsOnly(provider.sampler)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.provider = provider
        self.tracer = provider.get_tracer("twofactor_service")
        self._asyncpg = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
        self._asyncpg.instrument(tracer_provider=provider)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The call's span, continuing the caller's trace (gRPC instrumentation). Only
        TwoFactorService's calls: health probes every few seconds would bury them, and health's
        Watch, written with context.write, is no generator the instrumentation could wrap."""
        prefix = f"/{SERVICE_DESCRIPTOR.full_name}/"

        def traced(details: grpc.HandlerCallDetails) -> bool:
            # Not filters.service_name: its isinstance checks against gRPC's protocol classes
            # cost more than this whole test, on every call.
            return details.method.startswith(prefix)

        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=traced
        )
        return [cast(grpc.aio.ServerInterceptor, interceptor)]

    def reporter(self, method: str, kind: str) -> Report:
        """The pipeline's reporter: at the end of a call, inside its span, what the pipeline
        alone knows. The status code is the one the client gets: the instrumentation sees only
        codes set on the context, not a cancellation or a deadline."""

        def report(context: Context, code: grpc.StatusCode, seconds: float, reason: str) -> None:
            span = trace.get_current_span()
            if not span.is_recording():
                return
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if reason:
                span.set_attribute("twofactor.error_reason", reason)
            info = call_info.get(None)
            if info is not None and info.method == method:
                span.set_attribute("twofactor.request_id", info.request_id)

        return report

    def current_call(self) -> Span:
        """The span of the call running now (a VerifyCode joining a batch)."""
        return trace.get_current_span()

    @contextmanager
    def verify_batch(self, calls: Sequence[Span]) -> Iterator[None]:
        """A VerifyCode batch's span, around its database work. A root span (the batch task was
        started from the first call's context, but serves every call alike) linked to each call
        it settles; each call links back to it."""
        links = [Link(call.get_span_context()) for call in calls if call.is_recording()]
        with self.tracer.start_as_current_span(
            "VerifyCode batch",
            context=otel_context.Context(),
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={"twofactor.verify.batch_size": len(calls)},
            # A failure's type only: no exception message or traceback on the span.
            record_exception=False,
            set_status_on_exception=False,
        ) as batch:
            batch_context = batch.get_span_context()
            for call in calls:
                if call.is_recording():
                    call.add_link(batch_context, {"twofactor.link": "verify_batch"})
            try:
                yield
            except BaseException as exc:
                batch.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    def stop(self, within_seconds: float = FLUSH_WITHIN_SECONDS) -> None:
        """Exports what is still queued, waiting at most `within_seconds` (a collector that is
        down must not hold up the stop), then stops recording."""
        self._asyncpg.uninstrument()
        flushing = threading.Thread(
            target=self.provider.shutdown, name="otel-shutdown", daemon=True
        )
        flushing.start()
        flushing.join(within_seconds)
        if flushing.is_alive():
            log.warning("tracing: spans not all exported before the stop")


def start_tracing() -> Tracing:
    tracing = Tracing()
    log.info(
        "tracing on",
        extra={"sampler": tracing.provider.sampler.get_description()},
    )
    return tracing
