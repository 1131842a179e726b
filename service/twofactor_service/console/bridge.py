"""Forwards a browser's gRPC-Web call to the gRPC server, as bytes.

The bridge runs in the console's own process (process.py); the call goes over a unix socket
that only the gRPC server listens on (server.py adds it, in a folder only the service's user
can open), into the same grpc.aio server as a native call, so the same call pipeline decides
it: authentication, rights, two-factor, step-up, throttling, audit. Nothing here knows a rule;
the bridge only changes the framing, and chooses what crosses:

- into the call: the metadata a client of the contract sends (session token, step-up proof,
  request id), and the browser's address for the audit log (forwarded_peer.py);
- out of it: the messages, and the status with its google.rpc details
  (`grpc-status-details-bin`, which carries ErrorInfo and RetryInfo) and the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2

from twofactor_service.console import grpc_web
from twofactor_service.console.front_door import Refusal
from twofactor_service.transport.forwarded_peer import FORWARDED_FOR, FORWARDED_KEY

# The metadata of the contract (twofactor_service.proto's service comment); nothing else a
# browser sends reaches the server.
FORWARDED_METADATA = (
    "authorization",
    "x-step-up-password",
    "x-step-up-code",
    "x-request-id",
    "traceparent",
)
# Trailing metadata returned to the browser besides the status.
RETURNED_TRAILERS = ("x-request-id",)
STATUS_DETAILS = "grpc-status-details-bin"
# No (de)serializers: requests and responses pass through as bytes.
Unary: TypeAlias = "grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]"
Streaming: TypeAlias = "grpc.aio.UnaryStreamMultiCallable[bytes, bytes]"
ERROR_DOMAIN = "twofactor.v1"


def _browser_address(request: web.Request) -> str:
    """The browser's address in gRPC's peer notation, e.g. "ipv4:127.0.0.1:51234"."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"


def _malformed_status(message: str) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """INVALID_ARGUMENT with ErrorInfo MALFORMED_REQUEST, as the server answers bytes that do
    not parse."""
    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="MALFORMED_REQUEST", domain=ERROR_DOMAIN)
    )
    details = grpc_web.binary_value(status.SerializeToString())
    return grpc.StatusCode.INVALID_ARGUMENT, message, [(STATUS_DETAILS, details)]


def _returned_trailers(metadata: grpc.aio.Metadata | None) -> list[tuple[str, str]]:
    returned: list[tuple[str, str]] = []
    for key, value in metadata or ():
        if key == STATUS_DETAILS and isinstance(value, bytes):
            returned.append((key, grpc_web.binary_value(value)))
        elif key in RETURNED_TRAILERS and isinstance(value, str):
            returned.append((key, value))
    return returned


class Bridge:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        service: ServiceDescriptor,
        forwarded_key: str,
        body_timeout_seconds: float,
    ) -> None:
        self.channel = channel
        self.service = service
        # The gRPC server's key for forwarded peers (transport/forwarded_peer.py), handed to
        # this process on its stdin.
        self.forwarded_key = forwarded_key
        self.body_timeout_seconds = body_timeout_seconds
        self.methods: dict[str, MethodDescriptor] = {m.name: m for m in service.methods}

    def _metadata(self, request: web.Request) -> list[tuple[str, str]]:
        metadata = [
            (key, value) for key in FORWARDED_METADATA for value in request.headers.getall(key, ())
        ]
        for key, value in metadata:
            # What gRPC accepts in a text metadata value.
            if not (value.isascii() and value.isprintable()):
                raise grpc_web.MalformedRequest(f"the {key} header must be printable ASCII")
        metadata.append((FORWARDED_FOR, _browser_address(request)))
        metadata.append((FORWARDED_KEY, self.forwarded_key))
        return metadata

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """POST /twofactor.v1.TwoFactorService/<Method>, a gRPC-Web call."""
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in grpc_web.ACCEPTED_CONTENT_TYPES:
            raise web.HTTPUnsupportedMediaType(
                text=f"send {grpc_web.CONTENT_TYPE} (binary gRPC-Web)"
            )
        length = request.content_length
        if length is not None and length > request.client_max_size:
            # Refused unread; the connection closes after the answer.
            return Refusal(413, "the request body is larger than the largest message accepted")
        try:
            async with asyncio.timeout(self.body_timeout_seconds):
                body = await request.read()
        except TimeoutError:
            return Refusal(408, "the request body did not arrive in time")
        except RequestPayloadError:
            return Refusal(400, "the request body is not framed as HTTP/1.1 says")
        response = web.StreamResponse(headers={"Content-Type": grpc_web.CONTENT_TYPE})
        method = self.methods.get(request.match_info["method"])
        if method is None or method.client_streaming:
            await response.prepare(request)
            await self._finish(response, grpc.StatusCode.UNIMPLEMENTED, "no such method", [])
            return response
        try:
            message = grpc_web.single_message(body)
            deadline = grpc_web.timeout_seconds(request.headers.get("grpc-timeout"))
            metadata = self._metadata(request)
        except grpc_web.MalformedRequest as exc:
            await response.prepare(request)
            await self._finish(response, *_malformed_status(str(exc)))
            return response
        path = f"/{self.service.full_name}/{method.name}"
        if method.server_streaming:
            await self._stream(request, response, path, message, metadata, deadline)
        else:
            await self._unary(request, response, path, message, metadata, deadline)
        return response

    async def _unary(
        self,
        request: web.Request,
        response: web.StreamResponse,
        path: str,
        message: bytes,
        metadata: list[tuple[str, str]],
        deadline_seconds: float | None,
    ) -> None:
        method: Unary = self.channel.unary_unary(path)
        call = method(message, metadata=metadata, timeout=deadline_seconds)
        try:
            answer: bytes = await call
        except grpc.aio.AioRpcError as error:
            await response.prepare(request)
            await self._finish(
                response,
                error.code(),
                error.details() or "",
                _returned_trailers(error.trailing_metadata()),
            )
            return
        await response.prepare(request)
        await response.write(grpc_web.message_frame(answer))
        trailers = _returned_trailers(await call.trailing_metadata())
        await self._finish(response, grpc.StatusCode.OK, "", trailers)

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        path: str,
        message: bytes,
        metadata: list[tuple[str, str]],
        deadline_seconds: float | None,
    ) -> None:
        method: Streaming = self.channel.unary_stream(path)
        call = method(message, metadata=metadata, timeout=deadline_seconds)
        await response.prepare(request)
        try:
            async for answer in _messages(call):
                await response.write(grpc_web.message_frame(answer))
        except grpc.aio.AioRpcError as error:
            await self._finish(
                response,
                error.code(),
                error.details() or "",
                _returned_trailers(error.trailing_metadata()),
            )
            return
        finally:
            # The browser went away (the handler is cancelled) or the stream ended: either
            # way the server's side of the call ends now.
            call.cancel()
        trailers = _returned_trailers(await call.trailing_metadata())
        await self._finish(response, grpc.StatusCode.OK, "", trailers)

    async def _finish(
        self,
        response: web.StreamResponse,
        code: grpc.StatusCode,
        message: str,
        trailers: list[tuple[str, str]],
    ) -> None:
        with contextlib.suppress(ConnectionResetError):
            await response.write(grpc_web.trailer_frame(code, message, trailers))
            await response.write_eof()


async def _messages(call: grpc.aio.UnaryStreamCall[bytes, bytes]) -> AsyncIterator[bytes]:
    while True:
        answer = await call.read()
        if answer is grpc.aio.EOF:
            return
        assert isinstance(answer, bytes)
        yield answer
