"""OpenTelemetry tracing (docs/operations.md, "Tracing"): `twofactor serve` processes configured
with the standard OTEL_* variables export their spans over OTLP/gRPC to a real receiver, the
collector's TraceService from `opentelemetry-proto`, served here with grpcio.

The replicas run on the real clock, so codes here come from real time (pyotp), not TestClock.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyotp
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.grpc_web import GrpcWebChannel
from tests.replicas import Replica, start_replica, stop_replica, wait_serving
from tests.support import VERIFY_RIGHT, Actors, error_reason, wait_until
from twofactor_service.config import ConfigError, load_config

ARRIVE_WITHIN_SECONDS = 30.0
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
METHOD = "/twofactor.v1.TwoFactorService/{}"


# --- The receiver: what an OpenTelemetry Collector's OTLP/gRPC receiver is to the service.


@dataclass(frozen=True)
class ReceivedSpan:
    span: trace_pb2.Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return _attributes(self.span.attributes)


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.exports = 0
        self.spans: list[ReceivedSpan] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.exports += 1
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(span, resource) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        wanted = bytes.fromhex(trace_id)
        return [s for s in self.spans if s.span.trace_id == wanted]

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        return [
            s
            for s in self.spans
            if s.span.trace_id == parent.span.trace_id
            and s.span.parent_span_id == parent.span.span_id
        ]

    def server_span(self, trace_id: str, method: str) -> ReceivedSpan | None:
        for s in self.of_trace(trace_id):
            if s.span.kind == SERVER and s.span.name == METHOD.format(method):
                return s
        return None

    def strings(self) -> Iterator[tuple[str, str]]:
        """Every text the receiver got: span names, status messages, and the attributes of
        spans, events, links and resources."""
        for received in self.spans:
            span = received.span
            yield "name", span.name
            yield "status", span.status.message
            groups = [("resource", received.resource), ("span", received.attributes)]
            groups += [("event", _attributes(e.attributes)) for e in span.events]
            groups += [("link", _attributes(link.attributes)) for link in span.links]
            for where, attributes in groups:
                for key, value in attributes.items():
                    for text in value if isinstance(value, list) else [value]:
                        yield f"{where} {span.name} {key}", str(text)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    servicer = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _tracing_env(endpoint: str, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        # Spans leave every 100 ms, so the test waits little for them.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **more,
    }


def _traceparent() -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A caller's W3C trace context: (trace id, parent span id, metadata carrying them)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


@pytest.fixture
async def replica_with(database_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Starts replicas with the OTEL_* settings a test gives; stops what is left at the end."""
    started: list[Replica] = []

    async def start(env: dict[str, str], *serve_args: str) -> Replica:
        replica = start_replica(
            database_url, tmp_path / f"serve-{len(started)}.log", *serve_args, env=env
        )
        started.append(replica)
        await wait_serving(replica)
        return replica

    yield start
    for replica in started:
        if replica.process.poll() is None:
            await stop_replica(replica)


# --- The switch: off unless the OTEL_* variables turn it on.


def test_tracing_is_off_unless_otel_variables_turn_it_on() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert not load_config({}).tracing
    assert load_config(endpoint).tracing
    assert load_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}).tracing
    assert load_config({"OTEL_TRACES_EXPORTER": "otlp"}).tracing
    assert not load_config({**endpoint, "OTEL_SDK_DISABLED": "true"}).tracing
    assert not load_config({**endpoint, "OTEL_TRACES_EXPORTER": "none"}).tracing
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        load_config({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        load_config({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})


# --- Spans from a real `twofactor serve`.


async def test_spans_continue_the_callers_trace_and_carry_no_secret(
    receiver: tuple[Receiver, str], replica_with: Any, actors: Actors
) -> None:
    spans, endpoint = receiver
    replica: Replica = await replica_with(_tracing_env(endpoint))
    user = await actors.create("user")
    service = await actors.create("service", excluded=True, rights=(VERIFY_RIGHT,))
    others = [await actors.create("user") for _ in range(3)]

    # A first sign-in (password alone), then the key set up with a code: each call continues
    # its caller's trace.
    sign_in_trace, sign_in_parent, metadata = _traceparent()
    started = await replica.stub.SignIn(
        pb.SignInRequest(username=user.username, password=user.password), metadata=metadata
    )
    assert started.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    secret = started.enrollment.pending_key.secret_base32
    ticket = started.enrollment.enrollment_ticket
    code = pyotp.TOTP(secret).at(time.time())
    enroll_trace, _, metadata = _traceparent()
    done = await replica.stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(enrollment_ticket=ticket, code=code), metadata=metadata
    )
    user_token = done.session.token
    signed_in = await replica.stub.SignIn(
        pb.SignInRequest(username=service.username, password=service.password)
    )
    service_token = signed_in.session.token

    # VerifyCode calls arriving together: one batch (or a few) settles them.
    verify_traces: list[str] = []
    calls = []
    for target in [user, *others]:
        trace_id, _, metadata = _traceparent()
        verify_traces.append(trace_id)
        calls.append(
            replica.stub.VerifyCode(
                pb.VerifyCodeRequest(username=target.username, code=code),
                metadata=(("authorization", f"Bearer {service_token}"), *metadata),
            )
        )
    await asyncio.gather(*calls)

    # Through the console's gRPC-Web bridge, as a browser (or a proxy in front of it) calls.
    web_trace, web_parent, metadata = _traceparent()
    web = GrpcWebChannel(replica.console_url)
    try:
        web_stub = pb_grpc.TwoFactorServiceStub(web)  # type: ignore[call-overload]
        status = await web_stub.GetAccountStatus(
            pb.GetAccountStatusRequest(),
            metadata=(("authorization", f"Bearer {user_token}"), *metadata),
        )
        assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    finally:
        await web.close()

    # A refusal: an unknown session token.
    refused_trace, _, metadata = _traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.GetAccountStatus(
            pb.GetAccountStatusRequest(username=user.username),
            metadata=(("authorization", f"Bearer {user_token}x"), *metadata),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Bytes that are no VerifyCodeRequest: refused by the pipeline, traced like any call.
    malformed_trace, _, metadata = _traceparent()
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = replica.channel.unary_unary(
        METHOD.format("VerifyCode")
    )
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await raw(b"\xff\xff\xff", metadata=metadata)
    assert error_reason(malformed.value) == "MALFORMED_REQUEST"

    # A server-streaming call, refused: the instrumentation wraps the pipeline's stream too.
    stream_trace, _, metadata = _traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        async for _ in replica.stub.WatchAuditEvents(
            pb.WatchAuditEventsRequest(), metadata=metadata
        ):
            pass
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def batches() -> list[ReceivedSpan]:
        return [s for s in spans.spans if s.span.name == "VerifyCode batch"]

    def linked_calls() -> set[bytes]:
        return {link.span_id for batch in batches() for link in batch.span.links}

    async def all_arrived() -> bool:
        verify = [spans.server_span(t, "VerifyCode") for t in verify_traces]
        if spans.server_span(refused_trace, "GetAccountStatus") is None:
            return False
        if any(v is None for v in verify) or spans.server_span(sign_in_trace, "SignIn") is None:
            return False
        if spans.server_span(enroll_trace, "CompleteEnrollment") is None:
            return False
        if spans.server_span(web_trace, "GetAccountStatus") is None:
            return False
        if spans.server_span(malformed_trace, "VerifyCode") is None:
            return False
        if spans.server_span(stream_trace, "WatchAuditEvents") is None:
            return False
        # Every call's span ends before its batch's does: wait for the batches too.
        return all(v is not None and v.span.span_id in linked_calls() for v in verify)

    await wait_until(all_arrived, within=ARRIVE_WITHIN_SECONDS, what="the calls' spans")

    # The caller's trace goes on: its trace id, and its span as the parent.
    sign_in = spans.server_span(sign_in_trace, "SignIn")
    assert sign_in is not None
    assert sign_in.span.parent_span_id == bytes.fromhex(sign_in_parent)
    assert sign_in.resource["service.name"] == "twofactor-service"
    assert sign_in.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # The database work of the call, as its children, with the statement and no parameters.
    statements = [s for s in spans.children(sign_in) if s.span.kind == CLIENT]
    assert statements, "no database span under SignIn"
    assert all(s.attributes["db.system"] == "postgresql" for s in statements)
    assert all("db.statement.parameters" not in s.attributes for s in statements)
    assert any("$1" in str(s.attributes.get("db.statement", "")) for s in statements)

    # The browser's trace goes on through the bridge too.
    through_bridge = spans.server_span(web_trace, "GetAccountStatus")
    assert through_bridge is not None
    assert through_bridge.span.parent_span_id == bytes.fromhex(web_parent)

    # The refusal: its status code and reason, on the caller's trace.
    refusal = spans.server_span(refused_trace, "GetAccountStatus")
    assert refusal is not None
    assert refusal.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert refusal.attributes["twofactor.error_reason"] == error_reason(refused.value)

    unparsed = spans.server_span(malformed_trace, "VerifyCode")
    assert unparsed is not None
    assert unparsed.attributes["twofactor.error_reason"] == "MALFORMED_REQUEST"
    assert unparsed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    watch = spans.server_span(stream_trace, "WatchAuditEvents")
    assert watch is not None
    assert watch.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]

    # VerifyCode: each call on its caller's trace; the batches that settled them link them
    # all, each exactly the calls it settled, and do their database work as their children.
    verify_spans = [spans.server_span(t, "VerifyCode") for t in verify_traces]
    linked = {link.span_id: batch for batch in batches() for link in batch.span.links}
    for call in verify_spans:
        assert call is not None
        batch = linked[call.span.span_id]
        assert any(link.span_id == batch.span.span_id for link in call.span.links)
    for batch in batches():
        assert len(batch.span.links) == batch.attributes["twofactor.verify.batch_size"]
        assert batch.span.parent_span_id == b""
        work = [s.span.name for s in spans.children(batch) if s.span.kind == CLIENT]
        assert work, "no database span under the VerifyCode batch"

    # Nothing secret anywhere: not the password, the code, the key's secret, the enrollment
    # ticket, nor either session token (not even the refused one).
    secrets = {
        "password": user.password,
        "code": code,
        "secret": secret,
        "ticket": ticket,
        "user token": user_token,
        "service token": service_token,
    }
    leaks = [
        (what, where)
        for where, text in spans.strings()
        for what, value in secrets.items()
        if value in text
    ]
    assert not leaks
    assert await stop_replica(replica) == 0


async def test_the_last_spans_are_exported_at_a_graceful_stop(
    receiver: tuple[Receiver, str], replica_with: Any, actors: Actors
) -> None:
    """Spans wait up to ten minutes in the batch here: only the stop's flush can send them."""
    spans, endpoint = receiver
    replica: Replica = await replica_with(_tracing_env(endpoint, OTEL_BSP_SCHEDULE_DELAY="600000"))
    trace_id, _, metadata = _traceparent()
    with pytest.raises(grpc.aio.AioRpcError):
        await replica.stub.VerifyCode(
            pb.VerifyCodeRequest(username="nobody-here", code="123456"),
            metadata=(("authorization", "Bearer not-a-session"), *metadata),
        )
    assert spans.of_trace(trace_id) == []
    assert await stop_replica(replica) == 0
    assert spans.server_span(trace_id, "VerifyCode") is not None


async def test_each_worker_exports_its_own_spans(
    receiver: tuple[Receiver, str], replica_with: Any
) -> None:
    """`serve --workers 2`: each worker process sets up tracing after it is spawned. New
    connections land on either worker (SO_REUSEPORT), until spans come from both."""
    spans, endpoint = receiver
    replica: Replica = await replica_with(_tracing_env(endpoint), "--workers", "2")

    async def from_both_workers() -> bool:
        # A subchannel pool of its own: a new connection, not the process's shared one.
        options = (("grpc.use_local_subchannel_pool", 1),)
        async with grpc.aio.insecure_channel(replica.address, options=options) as channel:
            _, _, metadata = _traceparent()
            verify: grpc.aio.UnaryUnaryMultiCallable[pb.VerifyCodeRequest, bytes]
            verify = channel.unary_unary(
                METHOD.format("VerifyCode"),
                request_serializer=pb.VerifyCodeRequest.SerializeToString,
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await verify(pb.VerifyCodeRequest(), metadata=metadata)
        return len({s.resource["process.pid"] for s in spans.spans}) >= 2

    await wait_until(from_both_workers, within=ARRIVE_WITHIN_SECONDS, what="both workers' spans")
    assert await stop_replica(replica) == 0


async def test_no_span_is_sent_with_tracing_disabled(
    receiver: tuple[Receiver, str], replica_with: Any
) -> None:
    """The receiver is configured, but OTEL_SDK_DISABLED turns tracing off. A graceful stop
    would have flushed any span (the test above), so after it the receiver has had none."""
    spans, endpoint = receiver
    replica: Replica = await replica_with(_tracing_env(endpoint, OTEL_SDK_DISABLED="true"))
    _, _, metadata = _traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.VerifyCode(
            pb.VerifyCodeRequest(username="nobody-here", code="123456"),
            metadata=(("authorization", "Bearer not-a-session"), *metadata),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await stop_replica(replica) == 0
    assert spans.exports == 0
    assert spans.spans == []


def test_without_tracing_the_server_loads_no_opentelemetry() -> None:
    """Tracing off costs the calls nothing: what `twofactor serve` imports to serve (the CLI,
    the server, the pipeline, the VerifyCode batcher) loads no OpenTelemetry module."""
    probe = (
        "import sys, twofactor_service.cli, twofactor_service.server, "
        "twofactor_service.verification, twofactor_service.transport.servicer; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    found = subprocess.run(  # noqa: S603 - this interpreter, a fixed program
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"
    # The probe would see it: the tracing module does load OpenTelemetry.
    probe = probe.replace("twofactor_service.cli,", "twofactor_service.tracing,")
    found = subprocess.run(  # noqa: S603 - as above
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert "opentelemetry.sdk.trace" in found.stdout


async def test_a_collector_that_is_down_holds_up_neither_calls_nor_the_stop(
    replica_with: Any, tmp_path: Path
) -> None:
    """Nothing listens at the endpoint: the calls are answered, the exporter's failures are
    logged, and a graceful stop gives up on the spans in time, saying so."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # The exporter would retry each export for a minute: only the stop's bound ends the wait.
    replica: Replica = await replica_with(_tracing_env(endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="60"))
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await replica.stub.VerifyCode(
                pb.VerifyCodeRequest(username="nobody-here", code="123456"),
                metadata=(("authorization", "Bearer not-a-session"),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # stop_replica allows 20 s: the workers' own stop budget (workers.py) is 15 s past grace.
    assert await stop_replica(replica) == 0
    # The log (stderr; stdout's greeting is in the same file here) says what happened.
    records = [json.loads(line) for line in replica.log.read_text().splitlines() if line[:1] == "{"]
    assert any(r["logger"].startswith("opentelemetry.exporter") for r in records), records
    assert any(r["message"] == "tracing: spans not all exported before the stop" for r in records)
