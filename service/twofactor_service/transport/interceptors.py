"""Server interceptors, one concern each, outermost first:

1. ErrorInterceptor: request id, call info, and domain errors → status + google.rpc details.
2. AuthenticationInterceptor: bearer session token → actor.
3. AuthorizationInterceptor: the method's declared right and 2FA requirement.
4. StepUpInterceptor: account protection of the target named in the request.

grpc.aio interceptors see only the method and the metadata; to see the request (the target
account) each wraps the method handler, the way `grpc-interceptor` does.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
from twofactor_service.store import audit, database, sessions
from twofactor_service.transport.call_context import (
    CallInfo,
    call_info,
    caller,
    current_actor,
    current_target,
)
from twofactor_service.transport.forwarded_peer import call_peer

log = logging.getLogger(__name__)

ERROR_DOMAIN = "twofactor.v1"
Context = grpc.aio.ServicerContext[Any, Any]
# The type stubs describe a method handler's behaviours as the sync API's; under grpc.aio they
# are coroutine functions (unary) and async generators (server streaming) taking a Context.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
UnaryBehaviour = Callable[[Message, Context], Awaitable[Any]]
StreamBehaviour = Callable[[Message, Context], AsyncIterator[Any]]
Inspect = Callable[[Message, Context], Awaitable[None]]


# Metadata that carries credentials: sent twice, which one counts would be a guess.
CREDENTIAL_METADATA = ("authorization", "x-step-up-password", "x-step-up-code")


def _metadata(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _refuse_duplicated_credentials(context: Context) -> None:
    seen: set[str] = set()
    for key, _ in context.invocation_metadata() or ():
        if key in CREDENTIAL_METADATA:
            if key in seen:
                raise errors.DuplicateMetadata(key)
            seen.add(key)


@dataclass(frozen=True)
class _Malformed:
    """What the lenient deserializer hands on for bytes that are not the request message."""

    message_type: str


def _lenient(deserializer: Callable[[bytes], Message] | None, message_type: str) -> Any:
    """The method's request deserializer, returning _Malformed instead of raising: bytes that do
    not parse then reach the ErrorInterceptor, which refuses them like any other bad argument
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


def _wrap(handler: Handler, before: Inspect) -> Handler:
    """A handler that runs `before(request, context)` first, then the original behaviour."""
    if handler.unary_unary is not None:
        inner_unary = cast(UnaryBehaviour, handler.unary_unary)

        async def unary(request: Message, context: Context) -> Any:
            await before(request, context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = cast(StreamBehaviour, handler.unary_stream)

        async def stream(request: Message, context: Context) -> AsyncIterator[Any]:
            await before(request, context)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    raise TypeError("TwoFactorService has only unary-unary and unary-stream methods")


class _OwnMethods(grpc.aio.ServerInterceptor):
    """Applies only to TwoFactorService's methods (not health or reflection)."""

    def __init__(self, runtime: Runtime, policies: dict[str, rules.MethodPolicy]) -> None:
        self.runtime = runtime
        self.policies = policies
        # method -> (the handler it wrapped, the wrapped handler). A wrapped handler keeps no
        # per-call state (that travels in contextvars), so it is built once per method, not on
        # every call: the hot path runs this for each of the four interceptors.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.policies:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


def error_status(error: errors.TwoFactorError) -> status_pb2.Status:
    """AIP-193: the status code, the message, an ErrorInfo and, where waiting helps, RetryInfo."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if isinstance(error, errors.InvalidArgument):
        info.metadata["field"] = error.field
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


class ErrorInterceptor(_OwnMethods):
    def wrap(self, handler: Handler, method: str) -> Handler:
        policy = self.policies[method]
        operation = method.rsplit("/", 1)[-1]
        runtime = self.runtime

        async def audit_failure(reason: str) -> None:
            info = call_info.get()
            actor = current_actor.get()
            entry = audit.AuditEntry(
                actor=actor.username if actor else "",
                target=current_target.get(),
                operation=operation,
                success=False,
                reason=reason,
                request_id=info.request_id,
                peer=info.peer,
            )
            try:
                async with runtime.pool.acquire() as conn:
                    await audit.append(conn, entry)
            except Exception:  # noqa: BLE001 - the database may be the failure being reported
                log.warning("could not write audit event", extra={"operation": operation})

        async def fail(context: Context, exc: BaseException) -> None:
            if isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError):
                # Cancelled by the client, or an abort() that already chose the status.
                raise exc
            error = _as_domain_error(exc)
            info = call_info.get()
            if error is None:
                log.error(
                    "unexpected error",
                    extra={"operation": operation, "request_id": info.request_id},
                    exc_info=exc,
                )
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error; quote request id {info.request_id} to the operator",
                )
            assert error is not None
            if error.audited:
                await audit_failure(error.reason)
            log.info(
                "call refused",
                extra={
                    "operation": operation,
                    "request_id": info.request_id,
                    "code": error.code.name,
                    "reason": error.reason,
                },
            )
            await context.abort_with_status(rpc_status.to_status(error_status(error)))

        message_type = policy.request_type

        def begin(context: Context) -> None:
            request_id = _metadata(context, "x-request-id") or uuid.uuid4().hex
            request_id = request_id[:64]
            context.set_trailing_metadata((("x-request-id", request_id),))
            call_info.set(CallInfo(method, operation, policy, request_id, call_peer(context)))
            current_actor.set(None)
            current_target.set("")

        deserializer = _lenient(handler.request_deserializer, message_type)
        if handler.unary_unary is not None:
            inner_unary = cast(UnaryBehaviour, handler.unary_unary)

            async def unary(request: Message, context: Context) -> Any:
                begin(context)
                try:
                    if isinstance(request, _Malformed):
                        raise errors.MalformedRequest(message_type)
                    return await inner_unary(request, context)
                except BaseException as exc:  # mapped or re-raised in fail()
                    await fail(context, exc)
                    raise

            return grpc.unary_unary_rpc_method_handler(
                unary, deserializer, handler.response_serializer
            )

        inner_stream = cast(StreamBehaviour, handler.unary_stream)

        async def stream(request: Message, context: Context) -> AsyncIterator[Any]:
            begin(context)
            try:
                if isinstance(request, _Malformed):
                    raise errors.MalformedRequest(message_type)
                async for item in inner_stream(request, context):
                    yield item
            except BaseException as exc:  # mapped or re-raised in fail()
                await fail(context, exc)
                raise

        return grpc.unary_stream_rpc_method_handler(
            stream, deserializer, handler.response_serializer
        )


class AuthenticationInterceptor(_OwnMethods):
    def wrap(self, handler: Handler, method: str) -> Handler:
        policy = self.policies[method]
        runtime = self.runtime
        idle = runtime.config.session_idle_seconds

        async def authenticate(request: Message, context: Context) -> None:
            _refuse_duplicated_credentials(context)
            header = _metadata(context, "authorization")
            if header is None:
                if policy.allow_anonymous:
                    return
                raise errors.Unauthenticated(
                    "sign in first and send the session token as 'authorization: Bearer <token>'"
                )
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip() or len(token) > 512:
                raise errors.Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            hashed = sessions.token_hash(token.strip())
            async with runtime.pool.acquire() as conn:
                found = await sessions.resolve(conn, hashed, idle)
                if found is None:
                    raise errors.Unauthenticated(
                        "the session token is unknown, expired or ended; sign in again"
                    )
                if found.idle_seconds > 60:
                    # Idle-time bookkeeping at most once a minute, not on every call.
                    await sessions.touch(conn, hashed)
            current_actor.set(
                rules.Actor(
                    account_id=found.account_id,
                    username=found.username,
                    kind=found.kind,
                    session_id=hashed,
                    signed_in_with_two_factor=found.signed_in_with_two_factor,
                    has_active_key=found.has_active_key,
                    protected=found.protected,
                    rights=found.rights,
                )
            )

        return _wrap(handler, authenticate)


def _target_of(request: Message, policy: rules.MethodPolicy) -> str:
    if policy.target_field is None:
        return ""
    value = getattr(request, policy.target_field)
    return value if isinstance(value, str) else ""


class AuthorizationInterceptor(_OwnMethods):
    def wrap(self, handler: Handler, method: str) -> Handler:
        policy = self.policies[method]

        async def authorize(request: Message, context: Context) -> None:
            target = _target_of(request, policy)
            actor = current_actor.get()
            # Recorded as typed, so failed sign-ins show whom they aimed at; made printable
            # and bounded, so any input can be written to the audit log. A call that names
            # nobody and acts on its caller is recorded against the caller.
            recorded = rules.acted_on(policy, target, actor)
            printable = "".join(ch if ch.isprintable() else "?" for ch in recorded)
            current_target.set(printable[: rules.MAX_USERNAME_LENGTH])
            if actor is None:
                return  # anonymous RPC: the authentication interceptor let it through
            # Permission before existence (AIP-131): nothing about the target is read yet.
            rules.authorize(actor, policy, target)

        return _wrap(handler, authorize)


class StepUpInterceptor(_OwnMethods):
    def wrap(self, handler: Handler, method: str) -> Handler:
        policy = self.policies[method]
        if not policy.protects_target:
            return handler
        runtime = self.runtime

        async def step_up(request: Message, context: Context) -> None:
            actor = current_actor.get()
            assert actor is not None
            target = _target_of(request, policy) if policy.target_field else actor.username
            if policy.target_field:
                rules.validate_username(target)
            await verify_step_up(
                runtime,
                caller(),
                target,
                password=_metadata(context, "x-step-up-password"),
                code=_metadata(context, "x-step-up-code"),
            )

        return _wrap(handler, step_up)


def interceptors(
    runtime: Runtime, policies: dict[str, rules.MethodPolicy]
) -> list[grpc.aio.ServerInterceptor]:
    return [
        ErrorInterceptor(runtime, policies),
        AuthenticationInterceptor(runtime, policies),
        AuthorizationInterceptor(runtime, policies),
        StepUpInterceptor(runtime, policies),
    ]
