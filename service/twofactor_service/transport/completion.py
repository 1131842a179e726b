"""How a call ended: its final status code and how long it took.

The access log and the metrics wrap every method handler from outside the ErrorInterceptor, so
the code they see is the one the client gets, including the aborts that turn domain errors into
statuses (`context.code()` holds what `abort()` or `set_code()` chose).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from twofactor_service.transport.interceptors import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
)

# Called once per call, after it ended: (context, final status code, seconds it took).
Report = Callable[[Context, grpc.StatusCode, float], None]


def final_code(context: Context, exc: BaseException | None) -> grpc.StatusCode:
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
    # What gRPC answers for an exception no interceptor mapped.
    return grpc.StatusCode.UNKNOWN


def call_type(handler: Handler) -> str:
    return "unary" if handler.unary_unary is not None else "server_stream"


def observed(handler: Handler, report: Report) -> Handler:
    """The handler, reporting its outcome when the call ends, however it ends."""
    if handler.unary_unary is not None:
        inner_unary = cast(UnaryBehaviour, handler.unary_unary)

        async def unary(request: Message, context: Context) -> Any:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                return await inner_unary(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                report(context, final_code(context, failure), time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
        # A stream written with `await context.write(...)`, not yielded: health's Watch, which
        # load balancers and client-side health checking (gRFC A17) call.
        inner_writer = cast(UnaryBehaviour, handler.unary_stream)

        async def writer(request: Message, context: Context) -> None:
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                await inner_writer(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                report(context, final_code(context, failure), time.perf_counter() - started)

        return grpc.unary_stream_rpc_method_handler(
            writer, handler.request_deserializer, handler.response_serializer
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
                report(context, final_code(context, failure), time.perf_counter() - started)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    # Health, reflection and TwoFactorService have no client-streaming methods.
    return handler


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method's handler with `observed`, once per method rather than on every call
    (as the policy interceptors do): the report only depends on the method."""

    def __init__(self) -> None:
        # method -> (the handler it wrapped, the wrapped handler)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: nothing to report on
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = observed(handler, self.reporter(handler, method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def reporter(self, handler: Handler, method: str) -> Report:
        raise NotImplementedError
