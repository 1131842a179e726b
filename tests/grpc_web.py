"""A gRPC-Web client for the suite: the generated stubs over the console's HTTP endpoint, as
a browser reaches the service, with the same call interface as a grpc.aio channel, so a test
can run one body over both transports.

Why not a library: sonora's client (the one Python gRPC-Web client on PyPI) returns None for a
unary call whose status comes in the trailer frame instead of raising, keeps neither the
trailers nor `grpc-status-details-bin` on its errors (so no ErrorInfo reason can be read), and
pins urllib3 below 2. The framing is a few lines, written here independently of the server's
(service/twofactor_service/console/grpc_web.py), so a mistake in one is not mirrored.
Failures raise grpc.aio.AioRpcError with the trailers decoded as gRPC gives them (`-bin`
values as bytes), so tests.support.error_reason reads them unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
import grpc

_FRAME = struct.Struct(">BI")
_TRAILERS = 0x80
_CODES = {code.value[0]: code for code in grpc.StatusCode}

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]


def _trailers(block: bytes) -> dict[str, str | bytes]:
    found: dict[str, str | bytes] = {}
    for line in block.decode("ascii").split("\r\n"):
        if line:
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            found[key] = base64.b64decode(value + "==") if key.endswith("-bin") else value
    return found


def _error(trailers: dict[str, str | bytes], http_status: int) -> grpc.aio.AioRpcError | None:
    status = trailers.get("grpc-status")
    if status is None:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.UNKNOWN,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            f"no grpc-status (HTTP {http_status})",
        )
    code = _CODES[int(str(status))]
    if code is grpc.StatusCode.OK:
        return None
    metadata = grpc.aio.Metadata(
        *((k, v) for k, v in trailers.items() if k not in ("grpc-status", "grpc-message"))
    )
    details = unquote(str(trailers.get("grpc-message", "")))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), metadata, details)


class _Call:
    """One call's HTTP exchange: the request frame out, frames back."""

    def __init__(
        self,
        channel: GrpcWebChannel,
        method: str,
        body: bytes,
        metadata: Any,
        timeout: float | None,
    ) -> None:
        headers = {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"}
        self._headers = list(headers.items()) + [(k, v) for k, v in metadata or ()]
        self._channel, self._method, self._body, self._timeout = channel, method, body, timeout
        self._response: aiohttp.ClientResponse | None = None

    async def _frames(self) -> AsyncIterator[tuple[bool, bytes]]:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        self._response = await self._channel.session.post(
            self._channel.base_url + self._method.lstrip("/"),
            data=_FRAME.pack(0, len(self._body)) + self._body,
            headers=self._headers,
            timeout=timeout,
        )
        content = self._response.content
        while True:
            try:
                header = await content.readexactly(_FRAME.size)
            except asyncio.IncompleteReadError:  # the body ended without a trailer frame
                return
            flags, length = _FRAME.unpack(header)
            yield bool(flags & _TRAILERS), await content.readexactly(length)

    async def messages(self) -> AsyncIterator[bytes]:
        trailers: dict[str, str | bytes] = {}
        try:
            async for is_trailer, data in self._frames():
                if is_trailer:
                    trailers = _trailers(data)
                    break
                yield data
            assert self._response is not None
            error = _error(trailers, self._response.status)
            if error is not None:
                raise error
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._response is not None:
            self._response.close()


class _UnaryUnary:
    def __init__(
        self, channel: GrpcWebChannel, method: str, serialize: Serializer, read: Deserializer
    ) -> None:
        self._channel, self._method, self._serialize, self._read = channel, method, serialize, read

    def __call__(
        self, request: Any, *, metadata: Any = None, timeout: float | None = None
    ) -> Awaitable[Any]:
        call = _Call(self._channel, self._method, self._serialize(request), metadata, timeout)
        return self._answer(call)

    async def _answer(self, call: _Call) -> Any:
        answers = [answer async for answer in call.messages()]
        assert len(answers) == 1, f"a unary call answered {len(answers)} messages"
        return self._read(answers[0])


class _StreamCall:
    def __init__(self, call: _Call, read: Deserializer) -> None:
        self._call, self._messages, self._read = call, call.messages(), read

    async def read(self) -> Any:
        try:
            return self._read(await anext(self._messages))
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> bool:
        self._call.cancel()
        return True


class _UnaryStream:
    def __init__(
        self, channel: GrpcWebChannel, method: str, serialize: Serializer, read: Deserializer
    ) -> None:
        self._channel, self._method, self._serialize, self._read = channel, method, serialize, read

    def __call__(
        self, request: Any, *, metadata: Any = None, timeout: float | None = None
    ) -> _StreamCall:
        call = _Call(self._channel, self._method, self._serialize(request), metadata, timeout)
        return _StreamCall(call, self._read)


class GrpcWebChannel:
    """Pass it to a generated stub in place of a grpc.aio channel."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession()

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        **_: Any,
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        **_: Any,
    ) -> _UnaryStream:
        return _UnaryStream(self, method, request_serializer, response_deserializer)

    async def close(self) -> None:
        await self.session.close()
