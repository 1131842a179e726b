"""The call pipeline: what runs around every method, in order, in one frame per call.

For TwoFactorService's methods, from outside in:

1. Observation: the access log line and the metrics, with the status the client gets.
2. Errors: the request id and call info; bytes that do not parse; domain errors turned into a
   status with google.rpc details (AIP-193); unexpected ones into INTERNAL with a request id.
3. Authentication: a bearer session token, or a client certificate mapped to a service
   account, gives the actor (cached per process: transport/identities.py).
4. Authorization: the right and the 2FA the method's policy declares (proto options).
5. Step-up: account protection of the target the request names.

Each step is a function of its own. They are composed once per method, when the servicer's
handlers are registered (`PipelineServer`), into one handler whose one coroutine runs them in
turn: no gRPC interceptor chain, whose per-call cost (a coroutine and a continuation per
interceptor, a frame per layer) was the largest part of VerifyCode's CPU beyond the echo's
(docs/performance.md). Health and reflection get the observation only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import asyncpg
import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from twofactor_service import errors, rules
from twofactor_service.encryption import DecryptionFailed
from twofactor_service.runtime import Runtime
from twofactor_service.sign_in import verify_step_up
from twofactor_service.store import accounts, audit, database, sessions
from twofactor_service.transport.call_context import (
    CallInfo,
    call_info,
    caller,
    current_actor,
    current_target,
    payload_step_up,
    step_up_proven,
)
from twofactor_service.transport.client_certificates import mapped_account
from twofactor_service.transport.forwarded_peer import call_peer
from twofactor_service.transport.identities import IdentityCache

log = logging.getLogger(__name__)

ERROR_DOMAIN = "twofactor.v1"
Context = grpc.aio.ServicerContext[Any, Any]
# The type stubs describe a method handler's behaviours as the sync API's; under grpc.aio they
# are coroutine functions (unary) and async generators (server streaming) taking a Context.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
UnaryBehaviour = Callable[[Message, Context], Awaitable[Any]]
StreamBehaviour = Callable[[Message, Context], AsyncIterator[Any]]
# Called once per call, after it ended: (context, final status code, seconds it took, the
# ErrorInfo reason of a refusal or "").
Report = Callable[[Context, grpc.StatusCode, float, str], None]
# Makes the report of one method: (method path, "unary" or "server_stream") -> Report.
Reporter = Callable[[str, str], Report]

# Metadata that carries credentials: sent twice, which one counts would be a guess.
CREDENTIAL_METADATA = ("authorization", "x-step-up-password", "x-step-up-code")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# The call's metadata, read from gRPC once per call: ((key, value), ...).
Metadata = Sequence[tuple[str, str | bytes]]


def _read_metadata(context: Context) -> Metadata:
    return cast(Metadata, context.invocation_metadata() or ())


def _metadata(metadata: Metadata, key: str) -> str | None:
    for item_key, value in metadata:
        if item_key == key:
            return _text(value)
    return None


def _refuse_duplicated_credentials(metadata: Metadata) -> None:
    seen: set[str] = set()
    for key, _ in metadata:
        if key in CREDENTIAL_METADATA:
            if key in seen:
                raise errors.DuplicateMetadata(key)
            seen.add(key)


# --- 1. Observation


def final_code(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    """The status the client gets: what abort() or set_code() chose, else the call's end."""
    chosen: grpc.StatusCode | None = context.code()
    if chosen is not None:
        return chosen
    if exc is None:
        return grpc.StatusCode.OK
    # A stream the client stopped reading is closed with GeneratorExit.
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    # What gRPC answers for an exception nothing mapped.
    return grpc.StatusCode.UNKNOWN


def ended(report: Report, context: Context, started: float, failure: BaseException | None) -> None:
    """Reports a call that began at `started` (perf_counter) and ended with `failure` or not."""
    error = None if failure is None else _as_domain_error(failure)
    reason = "" if error is None else error.reason
    report(context, final_code(context, failure), time.perf_counter() - started, reason)


def call_type(handler: Handler) -> str:
    return "unary" if handler.unary_unary is not None else "server_stream"


def _observed_coroutine(inner: UnaryBehaviour, report: Report) -> UnaryBehaviour:
    async def observed_call(request: Message, context: Context) -> Any:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await inner(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            ended(report, context, started, failure)

    return observed_call


def observed(handler: Handler, report: Report) -> Handler:
    """Health and reflection: the handler, reporting its outcome when the call ends."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _observed_coroutine(cast(UnaryBehaviour, handler.unary_unary), report),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
        # A stream written with `await context.write(...)`, not yielded: health's Watch, which
        # load balancers and client-side health checking (gRFC A17) call.
        return grpc.unary_stream_rpc_method_handler(
            _observed_coroutine(cast(UnaryBehaviour, handler.unary_stream), report),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream = cast(StreamBehaviour, handler.unary_stream)

        async def stream(request: Message, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                async for item in inner_stream(request, context):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                ended(report, context, started, failure)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    # Reflection's bidirectional stream is left as it is.
    return handler


# --- 2. Errors


def error_status(error: errors.TwoFactorError) -> status_pb2.Status:
    """AIP-193: the status code, the message, an ErrorInfo and, where waiting helps, RetryInfo."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if isinstance(error, errors.InvalidArgument):
        info.metadata["field"] = error.field
    if error.location:
        info.metadata["location"] = error.location
    status.details.add().Pack(info)
    if error.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=max(1, round(error.retry_after_seconds)))
        )
        status.details.add().Pack(retry)
    return status


def _as_domain_error(exc: BaseException) -> errors.TwoFactorError | None:
    if isinstance(exc, errors.TwoFactorError):
        return exc
    if isinstance(exc, DecryptionFailed):
        # Logged as a refusal and audited like one: a sign of tampering worth seeing.
        return errors.SecretUnreadable()
    # SQLSTATE classes, not messages (asyncpg's exception hierarchy follows them).
    if isinstance(exc, asyncpg.SerializationError | asyncpg.DeadlockDetectedError):
        return errors.Conflict()
    if database.is_unavailable(exc):
        return errors.DatabaseUnavailable()
    return None


@dataclass(frozen=True)
class _Malformed:
    """What the lenient deserializer hands on for bytes that are not the request message."""

    message_type: str


def _lenient(deserializer: Callable[[bytes], Message] | None, message_type: str) -> Any:
    """The method's request deserializer, returning _Malformed instead of raising: bytes that do
    not parse then reach the error step, which refuses them like any other bad argument
    (logged once, counted, audited), instead of gRPC answering UNKNOWN with the parser's text."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Message | _Malformed:
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - whatever the parser says, the bytes are malformed
            return _Malformed(message_type)

    return deserialize


class Errors:
    """Step 2, for one method: begins the call, and turns what it raised into a status."""

    def __init__(self, runtime: Runtime, method: str, policy: rules.MethodPolicy) -> None:
        self.runtime = runtime
        self.method = method
        self.operation = method.rsplit("/", 1)[-1]
        self.policy = policy

    def begin(self, context: Context, metadata: Metadata, request: Message | _Malformed) -> None:
        request_id = (_metadata(metadata, "x-request-id") or os.urandom(16).hex())[:64]
        context.set_trailing_metadata((("x-request-id", request_id),))
        info = CallInfo(self.method, self.operation, self.policy, request_id, call_peer(context))
        call_info.set(info)
        current_actor.set(None)
        current_target.set("")
        payload_step_up.set(None)
        if isinstance(request, _Malformed):
            raise errors.MalformedRequest(request.message_type)

    async def refuse(self, context: Context, exc: BaseException) -> None:
        """Sets the status the call ends with: the domain error's that `exc` is (with its
        google.rpc details and the x-request-id trailer), or INTERNAL. A cancellation, a stream
        the client closed, or an abort a handler chose itself is raised again.

        The status is set, not raised with abort(): the handler then returns no response and
        gRPC sends the status, with no AbortError unwound through its frames. A refusal costs
        less that way, which matters when a flood of them is what the service answers."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit | grpc.aio.AbortError):
            raise exc
        error = _as_domain_error(exc)
        info = call_info.get()
        if error is None:
            log.error(
                "unexpected error",
                extra={"operation": self.operation, "request_id": info.request_id},
                exc_info=exc,
            )
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(
                f"internal error; quote request id {info.request_id} to the operator"
            )
            return
        if error.audited:
            await self._audit(error.audited_reason)
        status = rpc_status.to_status(error_status(error))
        context.set_code(status.code)
        context.set_details(status.details)
        context.set_trailing_metadata(
            (*status.trailing_metadata, ("x-request-id", info.request_id))
        )

    async def _audit(self, reason: str) -> None:
        info = call_info.get()
        actor = current_actor.get()
        entry = audit.AuditEntry(
            actor=actor.username if actor else "",
            target=current_target.get(),
            operation=self.operation,
            success=False,
            reason=reason,
            request_id=info.request_id,
            peer=info.peer,
        )
        try:
            async with self.runtime.pool.acquire() as conn:
                await audit.append(conn, entry)
        except Exception:  # noqa: BLE001 - the database may be the failure being reported
            log.warning("could not write audit event", extra={"operation": self.operation})


# --- 3. Authentication


class Authentication:
    """The caller: a bearer session token, or a client certificate mapped to a service account
    (transport/client_certificates.py). Resolved callers are kept in the identity cache, and a
    call that changes an account drops that account from it before answering."""

    def __init__(self, runtime: Runtime, identities: IdentityCache) -> None:
        self.runtime = runtime
        self.identities = identities
        self.certificate_accounts = dict(runtime.config.client_certificate_accounts)

    async def authenticate(
        self, context: Context, metadata: Metadata, policy: rules.MethodPolicy
    ) -> None:
        _refuse_duplicated_credentials(metadata)
        header = _metadata(metadata, "authorization")
        if header is not None:
            current_actor.set(await self._session_actor(header))
            return
        account = mapped_account(context, self.certificate_accounts)
        if account is not None:
            current_actor.set(await self._certificate_actor(account))
        elif not policy.allow_anonymous:
            raise errors.Unauthenticated(
                "sign in first and send the session token as 'authorization: Bearer <token>'"
            )

    def forget_changed(self, policy: rules.MethodPolicy) -> None:
        """After a call that may have changed an account (its target, or the caller). A call
        whose targets were named in its payload (an import: rare, and of many accounts) drops
        every cached caller."""
        if policy.protects_targets_in_payload:
            self.identities.clear()
        else:
            self.identities.drop_named(current_target.get())

    async def _session_actor(self, header: str) -> rules.Actor:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > 512:
            raise errors.Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        hashed = sessions.token_hash(token.strip())
        cached = self.identities.get(hashed)
        if cached is not None:
            return cached
        epoch = self.identities.epoch
        async with self.runtime.pool.acquire() as conn:
            found = await sessions.resolve(conn, hashed, self.runtime.config.session_idle_seconds)
            if found is None:
                raise errors.Unauthenticated(
                    "the session token is unknown, expired or ended; sign in again"
                )
            if found.idle_seconds > 60:
                # Idle-time bookkeeping at most once a minute, not on every call.
                await sessions.touch(conn, hashed)
        actor = _actor(found, session_id=hashed)
        self.identities.put(hashed, actor, epoch=epoch, expires_at=found.expires_at)
        return actor

    async def _certificate_actor(self, account: str) -> rules.Actor:
        key = ("certificate", account)
        cached = self.identities.get(key)
        if cached is not None:
            return cached
        epoch = self.identities.epoch
        async with self.runtime.pool.acquire() as conn:
            found = await sessions.resolve_account(conn, accounts.username_key(account))
        if found is None or not found.excluded:
            # The operator's mapping names no service account: say so, to the operator.
            log.warning("client certificate maps to no service account", extra={"account": account})
            raise errors.Unauthenticated(
                "this client certificate is mapped to an account that does not exist or is not "
                "a service account (on the exclusion list)"
            )
        actor = _actor(found, session_id=b"")
        self.identities.put(key, actor, epoch=epoch, expires_at=None)
        return actor


def _actor(found: sessions.SessionActor, *, session_id: bytes) -> rules.Actor:
    return rules.Actor(
        account_id=found.account_id,
        username=found.username,
        kind=found.kind,
        session_id=session_id,
        signed_in_with_two_factor=found.signed_in_with_two_factor,
        has_active_key=found.has_active_key,
        protected=found.protected,
        rights=found.rights,
    )


# --- 4. Authorization


def _target_of(request: Message, policy: rules.MethodPolicy) -> str:
    if policy.target_field is None:
        return ""
    value = getattr(request, policy.target_field)
    return value if isinstance(value, str) else ""


def authorize(request: Message, policy: rules.MethodPolicy) -> None:
    target = _target_of(request, policy)
    actor = current_actor.get()
    # Recorded as typed, so failed sign-ins show whom they aimed at; made printable and bounded,
    # so any input can be written to the audit log. A call that names nobody and acts on its
    # caller is recorded against the caller.
    recorded = rules.acted_on(policy, target, actor)
    if not recorded.isprintable():
        recorded = "".join(ch if ch.isprintable() else "?" for ch in recorded)
    current_target.set(recorded[: rules.MAX_USERNAME_LENGTH])
    if actor is None:
        return  # an anonymous RPC: authentication let it through
    # Permission before existence (AIP-131): nothing about the target is read yet.
    rules.authorize(actor, policy, target)


# --- 5. Step-up


async def step_up(
    runtime: Runtime, request: Message, metadata: Metadata, policy: rules.MethodPolicy
) -> None:
    actor = current_actor.get()
    assert actor is not None
    target = _target_of(request, policy) if policy.target_field else actor.username
    if policy.target_field:
        rules.validate_username(target)
    proven = await verify_step_up(
        runtime,
        caller(),
        target,
        password=_metadata(metadata, "x-step-up-password"),
        code=_metadata(metadata, "x-step-up-code"),
    )
    step_up_proven.set(proven)


def defer_step_up(runtime: Runtime, metadata: Metadata) -> None:
    """Step 5 for a method whose targets are named in its payload: the operation reads the
    payload, then checks the call's proof for a protected target it found (one proof per call),
    before it changes anything."""
    password = _metadata(metadata, "x-step-up-password")
    code = _metadata(metadata, "x-step-up-code")

    async def prove(target: str) -> None:
        # A refusal is then audited against the protected account that needed the proof.
        current_target.set(target)
        await verify_step_up(runtime, caller(), target, password=password, code=code)

    payload_step_up.set(prove)


# --- The steps composed, once per method.


class Pipeline:
    """Wraps each method's handler once, at registration (see PipelineServer)."""

    def __init__(
        self,
        runtime: Runtime,
        policies: dict[str, rules.MethodPolicy],
        identities: IdentityCache,
        reporters: Sequence[Reporter],
    ) -> None:
        self.runtime = runtime
        self.policies = policies
        self.authentication = Authentication(runtime, identities)
        self.reporters = reporters

    def _report(self, method: str, handler: Handler) -> Report:
        reports = [make(method, call_type(handler)) for make in self.reporters]

        def report(context: Context, code: grpc.StatusCode, seconds: float, reason: str) -> None:
            for each in reports:
                each(context, code, seconds, reason)

        return report

    def wrap(self, method: str, handler: Handler) -> Handler:
        report = self._report(method, handler)
        policy = self.policies.get(method)
        if policy is None:
            return observed(handler, report)  # health, reflection
        runtime = self.runtime
        errors_step = Errors(runtime, method, policy)
        authentication = self.authentication
        changes_accounts = (
            policy.protects_target or policy.acts_on_caller or policy.protects_targets_in_payload
        )

        async def admit(request: Message, context: Context, metadata: Metadata) -> None:
            """Steps 3 to 5, before the method runs."""
            await authentication.authenticate(context, metadata, policy)
            authorize(request, policy)
            if policy.protects_target:
                await step_up(runtime, request, metadata, policy)
            elif policy.protects_targets_in_payload:
                defer_step_up(runtime, metadata)

        deserializer = _lenient(handler.request_deserializer, policy.request_type)
        if handler.unary_unary is not None:
            inner_unary = cast(UnaryBehaviour, handler.unary_unary)

            async def unary(request: Message, context: Context) -> Any:
                started = time.perf_counter()
                failure: BaseException | None = None
                try:
                    metadata = _read_metadata(context)
                    errors_step.begin(context, metadata, request)
                    await admit(request, context, metadata)
                    try:
                        return await inner_unary(request, context)
                    finally:
                        if changes_accounts:
                            authentication.forget_changed(policy)
                except BaseException as exc:  # noqa: BLE001 - refuse() raises a cancellation
                    failure = exc
                    await errors_step.refuse(context, exc)
                    return None
                finally:
                    ended(report, context, started, failure)

            return grpc.unary_unary_rpc_method_handler(
                unary, deserializer, handler.response_serializer
            )

        inner_stream = cast(StreamBehaviour, handler.unary_stream)

        async def stream(request: Message, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                metadata = _read_metadata(context)
                errors_step.begin(context, metadata, request)
                await admit(request, context, metadata)
                async for item in inner_stream(request, context):
                    yield item
            except BaseException as exc:  # noqa: BLE001 - refuse() raises a cancellation
                failure = exc
                await errors_step.refuse(context, exc)
            finally:
                ended(report, context, started, failure)

        return grpc.unary_stream_rpc_method_handler(
            stream, deserializer, handler.response_serializer
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out of the pipeline (wrapped once each)."""

    def __init__(self, inner: grpc.GenericRpcHandler, pipeline: Pipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline
        self._wrapped: dict[str, Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = (
                None if handler is None else self._pipeline.wrap(method, handler)
            )
        return self._wrapped[method]


class PipelineServer:
    """What the generated `add_*_to_server` functions register with: a grpc.aio server whose
    method handlers all pass through the pipeline."""

    def __init__(self, server: grpc.aio.Server, pipeline: Pipeline) -> None:
        self.server = server
        self.pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(handler, self.pipeline) for handler in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        """Not passed on: the generic handler added with them already serves these methods.
        grpc.aio keeps a task per registered method waiting for calls and waits on all of them
        at every call (31 here), which cost a VerifyCode about 60 µs of CPU."""
