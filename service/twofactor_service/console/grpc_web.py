"""The gRPC-Web wire format (github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md), binary
mode: each message is a frame (1 flag byte, a 4-byte big-endian length, the bytes), and the
status travels in a last frame, flagged 0x80, holding HTTP/1-style header lines.

Only framing lives here: the messages themselves pass through as bytes, never parsed.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterable
from urllib.parse import quote

import grpc

CONTENT_TYPE = "application/grpc-web+proto"
# What a client may send: "application/grpc-web" means +proto too. The text mode (base64
# bodies, for clients without binary fetch) is not offered; browsers today all have it.
ACCEPTED_CONTENT_TYPES = ("application/grpc-web", "application/grpc-web+proto")

_HEADER = struct.Struct(">BI")
_TRAILER_FLAG = 0x80
_COMPRESSED_FLAG = 0x01
# grpc-timeout: 1 to 8 ASCII digits and a unit (PROTOCOL-HTTP2.md: TimeoutValue, TimeoutUnit).
# [0-9], not \d: \d takes any script's digits; fullmatch, not $: $ allows a final newline.
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# The spec allows up to 99999999 hours (11,000 years), past what gRPC's clock can add to now;
# a deadline beyond this is no deadline at all, and is passed on as none.
LONGEST_DEADLINE_SECONDS = 365 * 86400.0
# grpc-message is percent-encoded: everything but printable ASCII, and "%" itself.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class MalformedRequest(ValueError):
    """Not a gRPC-Web request this bridge takes: the body is not exactly one uncompressed message
    frame, or a header is not in the protocol's form."""


def message_frame(message: bytes) -> bytes:
    return _HEADER.pack(0, len(message)) + message


def single_message(body: bytes) -> bytes:
    """The one message of a unary or server-streaming request."""
    if len(body) < _HEADER.size:
        raise MalformedRequest("the body is shorter than a gRPC-Web frame header")
    flags, length = _HEADER.unpack_from(body)
    if flags & _COMPRESSED_FLAG:
        raise MalformedRequest("compressed messages are not accepted; send them uncompressed")
    if flags != 0:
        raise MalformedRequest("the request's frame must be a message frame")
    if len(body) != _HEADER.size + length:
        raise MalformedRequest("the body must hold exactly one message frame")
    return body[_HEADER.size :]


def trailer_frame(
    code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, str]]
) -> bytes:
    """The last frame: grpc-status, grpc-message, then `trailers` (already text)."""
    lines = [f"grpc-status: {code.value[0]}", f"grpc-message: {quote(message, safe=_MESSAGE_SAFE)}"]
    lines += [f"{key}: {value}" for key, value in trailers]
    block = "".join(line + "\r\n" for line in lines).encode("ascii")
    return _HEADER.pack(_TRAILER_FLAG, len(block)) + block


def binary_value(value: bytes) -> str:
    """A `-bin` metadata value, as gRPC-Web carries it in text: base64."""
    return base64.b64encode(value).decode("ascii")


def timeout_seconds(header: str | None) -> float | None:
    """The grpc-timeout header in seconds; None when absent or beyond any useful deadline."""
    if header is None:
        return None
    match = _TIMEOUT.fullmatch(header)
    if match is None:
        raise MalformedRequest(
            "grpc-timeout must be 1 to 8 ASCII digits and a unit (H, M, S, m, u or n)"
        )
    seconds = int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]
    return None if seconds > LONGEST_DEADLINE_SECONDS else seconds
