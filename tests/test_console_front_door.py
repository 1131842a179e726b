"""The console's front door (console/front_door.py), one refusal at a time, over raw sockets as
an attacker sends them: compressed bodies (415, unread), heads and bodies that trickle in, idle
connections, too many connections, other Host names, malformed HTTP; and on every answer the
security headers and no `Server` banner.

A server of its own with short limits, so that each timeout is seen in about a second."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.support import wait_until
from twofactor_service.config import ConfigError, ConsoleLimits, load_config
from twofactor_service.console.front_door import SECURITY_HEADERS, allowed_hosts, host_name
from twofactor_service.runtime import Runtime
from twofactor_service.server import start_server

LIMITS = ConsoleLimits(
    header_timeout_seconds=1, body_timeout_seconds=1, idle_timeout_seconds=4, max_connections=4
)
# Beyond a limit, what the machine may add before the connection is seen closed.
SLACK_SECONDS = 5.0
SIGN_IN = "/twofactor.v1.TwoFactorService/SignIn"
WILDCARD = "0.0.0.0"  # noqa: S104 - a bound address for allowed_hosts, not a bind


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture(scope="module")
async def door(runtime: Runtime) -> AsyncIterator[tuple[str, int]]:
    config = dataclasses.replace(runtime.config, console_limits=LIMITS)
    running = await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)
    try:
        assert running.console is not None
        yield "127.0.0.1", running.console.port
    finally:
        await running.stop(grace=1)


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


async def send(door: tuple[str, int], data: bytes, within: float = 10) -> Answer:
    """Sends `data` on a new connection; the answer, read until the server closes."""
    reader, writer = await asyncio.open_connection(*door)
    try:
        writer.write(data)
        async with asyncio.timeout(within):
            return parse(await reader.read())
    finally:
        writer.close()


def request(door: tuple[str, int], head: str, body: bytes = b"") -> bytes:
    host = f"Host: {door[0]}:{door[1]}\r\n"
    first, _, rest = head.partition("\r\n")
    return f"{first}\r\n{host}{rest}".encode("latin-1") + b"\r\n" + body


def assert_guarded(answer: Answer) -> None:
    """The security headers of docs/console.md, and no software banner."""
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name.lower()) == value, (name, answer.headers)
    assert "server" not in answer.headers, answer.headers


def gzip_bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(bytes(inflated)) + packer.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "identity, gzip"])
async def test_a_compressed_body_is_refused_with_415_and_never_inflated(
    door: tuple[str, int], encoding: str
) -> None:
    bomb = gzip_bomb(64 << 20)
    answer = await send(
        door,
        request(
            door,
            f"POST {SIGN_IN} HTTP/1.1\r\nContent-Type: application/grpc-web+proto\r\n"
            f"Content-Encoding: {encoding}\r\nContent-Length: {len(bomb)}\r\n",
            bomb,
        ),
    )
    assert answer.status == 415
    assert b"compressed request bodies are not accepted" in answer.body
    assert answer.headers["connection"] == "close"
    assert_guarded(answer)


async def test_a_compressed_transfer_coding_is_refused_with_501(door: tuple[str, int]) -> None:
    bomb = gzip_bomb(64 << 20)
    chunked = f"{len(bomb):x}\r\n".encode() + bomb + b"\r\n0\r\n\r\n"
    answer = await send(
        door,
        request(
            door,
            f"POST {SIGN_IN} HTTP/1.1\r\nContent-Type: application/grpc-web+proto\r\n"
            "Transfer-Encoding: gzip, chunked\r\n",
            chunked,
        ),
    )
    assert answer.status == 501
    assert_guarded(answer)


async def test_an_identity_encoded_call_goes_through(door: tuple[str, int]) -> None:
    message = pb.GetSettingsRequest().SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    answer = await send(
        door,
        request(
            door,
            "POST /twofactor.v1.TwoFactorService/GetSettings HTTP/1.1\r\n"
            "Content-Type: application/grpc-web+proto\r\nContent-Encoding: identity\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n",
            body,
        ),
    )
    assert answer.status == 200
    assert b"grpc-status:16" in answer.body.replace(b" ", b"")  # UNAUTHENTICATED, by the service


async def closed_after(
    door: tuple[str, int], first: bytes, trickle: bytes, within: float
) -> tuple[float, bytes]:
    """Sends `first`, then `trickle` a byte every 0.2 s (as a slow client does) until the
    server closes; how long that took, and what it answered."""
    reader, writer = await asyncio.open_connection(*door)
    began = time.monotonic()
    try:
        writer.write(first)
        answer = asyncio.ensure_future(reader.read())
        position = 0
        async with asyncio.timeout(within):
            while not answer.done():
                if trickle:
                    writer.write(trickle[position % len(trickle) : position % len(trickle) + 1])
                    position += 1
                await asyncio.wait([answer], timeout=0.2)
        return time.monotonic() - began, answer.result()
    finally:
        writer.close()


async def test_a_head_that_trickles_in_is_cut_off_at_the_header_timeout(
    door: tuple[str, int],
) -> None:
    took, answered = await closed_after(
        door, f"GET / HTTP/1.1\r\nHost: {door[0]}:{door[1]}\r\n".encode(), b"X-Slow: yes\r\n", 30
    )
    # Closed by the header timeout, not the (longer) idle timeout, and with no answer.
    assert took < LIMITS.idle_timeout_seconds, took
    assert answered == b""


async def test_a_body_that_trickles_in_is_answered_408_at_the_body_timeout(
    door: tuple[str, int],
) -> None:
    head = request(
        door,
        f"POST {SIGN_IN} HTTP/1.1\r\nContent-Type: application/grpc-web+proto\r\n"
        "Content-Length: 1000\r\n",
    )
    took, answered = await closed_after(door, head, b"\x00", 30)
    assert took < LIMITS.idle_timeout_seconds, took
    answer = parse(answered)
    assert answer.status == 408
    assert_guarded(answer)


async def test_an_idle_connection_is_closed_at_the_idle_timeout(door: tuple[str, int]) -> None:
    for first in (b"", request(door, "GET / HTTP/1.1\r\n")):
        took, answered = await closed_after(
            door, first, b"", LIMITS.idle_timeout_seconds + SLACK_SECONDS
        )
        assert took >= LIMITS.idle_timeout_seconds - 0.5, took
        # The connection that asked for the page got it first, then was closed when idle.
        assert answered.startswith(b"HTTP/1.1 200") == bool(first)


async def test_connections_beyond_the_cap_are_answered_503(door: tuple[str, int]) -> None:
    page = request(door, "GET / HTTP/1.1\r\n")

    async def served_again() -> bool:
        return (
            await send(door, request(door, "GET / HTTP/1.1\r\nConnection: close\r\n"))
        ).status == 200

    # Connections of earlier tests have been closed.
    await wait_until(
        served_again, within=SLACK_SECONDS + LIMITS.idle_timeout_seconds, what="a free slot"
    )
    async with AsyncExitStack() as held:
        for _ in range(LIMITS.max_connections):
            reader, writer = await asyncio.open_connection(*door)
            held.callback(writer.close)
            writer.write(page)
            # Answered: the connection is open and counted (kept alive).
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        answer = await send(door, page)
        assert answer.status == 503
        assert answer.headers["connection"] == "close"
        assert_guarded(answer)
    await wait_until(served_again, within=SLACK_SECONDS, what="served again once they closed")


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:{port}",
        "127.0.0.2:{port}",
        "localhost.attacker.example",
    ],
)
async def test_a_host_name_that_is_not_the_consoles_is_refused(
    door: tuple[str, int], host: str
) -> None:
    head = f"GET / HTTP/1.1\r\nHost: {host.format(port=door[1])}\r\n\r\n"
    answer = await send(door, head.encode())
    assert answer.status == 421
    assert b"TWOFACTOR_CONSOLE_HOSTS" in answer.body
    assert_guarded(answer)


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.", "[::1]:{port}"]
)
async def test_the_bound_address_and_the_loopback_names_are_answered(
    door: tuple[str, int], host: str
) -> None:
    head = f"GET / HTTP/1.1\r\nHost: {host.format(port=door[1])}\r\nConnection: close\r\n\r\n"
    answer = await send(door, head.encode())
    assert answer.status == 200
    assert_guarded(answer)


async def test_a_request_without_a_host_is_refused(door: tuple[str, int]) -> None:
    answer = await send(door, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.status == 421


def test_the_host_names_are_a_setting() -> None:
    limits = load_config({"TWOFACTOR_CONSOLE_HOSTS": "Console.Example.org, [::1],10.0.0.5"})
    assert limits.console_limits.hosts == ("console.example.org", "::1", "10.0.0.5")
    # Set: exactly those names. Unset: the bound address and the loopback names; a wildcard
    # address is no name.
    assert allowed_hosts(WILDCARD, limits.console_limits.hosts) == {
        "console.example.org",
        "::1",
        "10.0.0.5",
    }
    assert allowed_hosts(WILDCARD, ()) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("192.0.2.7", ()) == {"localhost", "127.0.0.1", "::1", "192.0.2.7"}
    assert host_name("[::1]:8080") == "::1"
    assert host_name("Console.Example.org.:443") == "console.example.org"


@pytest.mark.parametrize("value", ["console.example.org:443", "https://console.example.org", "a b"])
def test_a_malformed_host_name_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="TWOFACTOR_CONSOLE_HOSTS"):
        load_config({"TWOFACTOR_CONSOLE_HOSTS": value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TWOFACTOR_CONSOLE_HEADER_TIMEOUT_SECONDS", "0"),
        ("TWOFACTOR_CONSOLE_BODY_TIMEOUT_SECONDS", "soon"),
        ("TWOFACTOR_CONSOLE_IDLE_TIMEOUT_SECONDS", "-1"),
        ("TWOFACTOR_CONSOLE_MAX_CONNECTIONS", "0"),
        ("TWOFACTOR_CONSOLE_CPU_CLASS", "realtime"),
    ],
)
def test_a_malformed_limit_is_a_configuration_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_config({variable: value})


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    ],
    ids=["tls-to-http", "bad-header", "bad-length", "bad-version"],
)
async def test_malformed_http_is_answered_400_with_the_security_headers(
    door: tuple[str, int], raw: bytes
) -> None:
    answer = await send(door, raw)
    assert answer.status == 400
    assert b"Traceback" not in answer.body
    assert_guarded(answer)


@pytest.mark.parametrize("path", ["/", "/static/console.js", "/no-such-page"])
async def test_no_answer_names_the_server_software(door: tuple[str, int], path: str) -> None:
    answer = await send(door, request(door, f"GET {path} HTTP/1.1\r\nConnection: close\r\n"))
    assert answer.status in (200, 404)
    assert_guarded(answer)
