"""The web console's HTTP side: the page and its bundle, the headers that keep the page to
itself, the refusal of other origins, the gRPC-Web bridge's framing and errors, and the
browser's address in the audit log that no other caller can forge.

The authorization matrix runs over the bridge as well (test_authorization_matrix.py), and a
real browser plays the seed through it (test_console_browser.py).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import TypeAlias

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, audit_events, error_reason
from twofactor_service.config import ConfigError, load_config
from twofactor_service.runtime import Runtime
from twofactor_service.server import RunningServer

Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"
GRPC_WEB = {"Content-Type": "application/grpc-web+proto"}
SIGN_IN = "twofactor.v1.TwoFactorService/SignIn"


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    assert server.console is not None
    async with aiohttp.ClientSession() as session:
        yield session, server.console.url


def frame(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def trailers_of(body: bytes) -> dict[str, str]:
    """The trailer frame (the last frame) of a gRPC-Web response body, as a dict."""
    position, found = 0, {}
    while position < len(body):
        flags, length = struct.unpack_from(">BI", body, position)
        data = body[position + 5 : position + 5 + length]
        position += 5 + length
        if flags & 0x80:
            for line in data.decode("ascii").split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    found[key.strip()] = value.strip()
    return found


async def test_the_page_and_its_bundle_are_served_with_a_strict_policy(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, url = http
    for path, kind in (("", "text/html"), ("static/console.js", "javascript")):
        async with session.get(url + path) as response:
            assert response.status == 200
            assert kind in response.headers["Content-Type"]
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy
            assert "style-src 'self'" in policy
            assert "frame-ancestors 'none'" in policy
            assert "unsafe-inline" not in policy
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            assert not any(h.lower().startswith("access-control-") for h in response.headers)
    async with session.get(url) as response:
        page = await response.text()
    # No inline script or style: everything comes from the bundle and the stylesheet.
    assert "<script>" not in page
    assert "<style" not in page
    assert " style=" not in page


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://elsewhere.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
    ids=["other-origin", "cross-site", "same-site"],
)
async def test_calls_from_another_origin_are_refused_before_the_service(
    http: tuple[aiohttp.ClientSession, str], headers: dict[str, str]
) -> None:
    session, url = http
    request = pb.SignInRequest(username="nobody", password="a password").SerializeToString()
    async with session.post(url + SIGN_IN, data=frame(request), headers=GRPC_WEB | headers) as r:
        assert r.status == 403
        assert "grpc-status" not in r.headers
        assert not any(h.lower().startswith("access-control-") for h in r.headers)


async def test_a_same_origin_call_goes_through(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, url = http
    request = pb.GetSettingsRequest().SerializeToString()
    origin = {"Origin": url.rstrip("/"), "Sec-Fetch-Site": "same-origin"}
    path = "twofactor.v1.TwoFactorService/GetSettings"
    async with session.post(url + path, data=frame(request), headers=GRPC_WEB | origin) as r:
        assert r.status == 200
        # Answered by the service (no session), not by the origin check.
        assert trailers_of(await r.read())["grpc-status"] == str(
            grpc.StatusCode.UNAUTHENTICATED.value[0]
        )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00\x00", "shorter than"),
        (frame(b"abc") + frame(b"def"), "exactly one"),
        (frame(b"abc", flags=1), "compressed"),
        (frame(b"abc", flags=0x80), "message frame"),
    ],
    ids=["truncated", "two-messages", "compressed", "trailer-as-request"],
)
async def test_a_malformed_body_is_invalid_argument_with_a_reason(
    http: tuple[aiohttp.ClientSession, str], body: bytes, message: str
) -> None:
    session, url = http
    async with session.post(url + SIGN_IN, data=body, headers=GRPC_WEB) as response:
        trailers = trailers_of(await response.read())
    assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert message in trailers["grpc-message"]
    status = status_pb2.Status.FromString(base64.b64decode(trailers["grpc-status-details-bin"]))
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "MALFORMED_REQUEST"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"authorization": "Bearer caf\u00e9"}, "authorization header"),
        ({"x-step-up-code": "12\t34"}, "x-step-up-code header"),
        ({"grpc-timeout": "soon"}, "grpc-timeout"),
        # Arabic-Indic and full-width digits are digits to Python, not to the gRPC spec.
        ({"grpc-timeout": "\u0661\u0662S"}, "grpc-timeout"),
        ({"grpc-timeout": "\uff15S"}, "grpc-timeout"),
        ({"grpc-timeout": "123456789S"}, "grpc-timeout"),
        ({"grpc-timeout": "5s"}, "grpc-timeout"),
        ({"grpc-timeout": "+5S"}, "grpc-timeout"),
        ({"grpc-timeout": "5"}, "grpc-timeout"),
        ({"grpc-timeout": "S"}, "grpc-timeout"),
        ({"grpc-timeout": "1.5S"}, "grpc-timeout"),
    ],
    ids=[
        "non-ascii-token",
        "control-character",
        "bad-timeout",
        "timeout-in-arabic-digits",
        "timeout-in-full-width-digits",
        "timeout-of-nine-digits",
        "timeout-unit-lowercase-s",
        "timeout-with-sign",
        "timeout-without-unit",
        "timeout-without-digits",
        "timeout-with-fraction",
    ],
)
async def test_a_malformed_header_is_invalid_argument_with_a_reason(
    http: tuple[aiohttp.ClientSession, str], headers: dict[str, str], message: str
) -> None:
    session, url = http
    request = frame(pb.SignInRequest(username="nobody", password="pw").SerializeToString())
    async with session.post(url + SIGN_IN, data=request, headers=GRPC_WEB | headers) as r:
        trailers = trailers_of(await r.read())
    assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert message in trailers["grpc-message"]


@pytest.mark.parametrize("value", ["99999999H", "99999999M", "1H", "00000030S", "30000000u"])
async def test_any_timeout_the_spec_allows_reaches_the_service(
    http: tuple[aiohttp.ClientSession, str], value: str
) -> None:
    """Up to 8 digits and a unit, however long: the service answers (here: no session), never
    DEADLINE_EXCEEDED nor a refusal of the header."""
    session, url = http
    request = frame(pb.GetSettingsRequest().SerializeToString())
    path = "twofactor.v1.TwoFactorService/GetSettings"
    headers = GRPC_WEB | {"grpc-timeout": value}
    async with session.post(url + path, data=request, headers=headers) as response:
        trailers = trailers_of(await response.read())
    assert trailers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


async def test_an_unknown_method_is_unimplemented(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, url = http
    path = "twofactor.v1.TwoFactorService/NoSuchMethod"
    async with session.post(url + path, data=frame(b""), headers=GRPC_WEB) as response:
        trailers = trailers_of(await response.read())
    assert trailers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


async def test_other_services_are_not_reachable_through_the_console(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, url = http
    path = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    async with session.post(url + path, data=frame(b""), headers=GRPC_WEB) as response:
        assert response.status in (404, 405)


async def test_a_body_that_is_not_grpc_web_is_refused(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, url = http
    json = {"Content-Type": "application/json"}
    async with session.post(url + SIGN_IN, data=b"{}", headers=json) as response:
        assert response.status == 415


async def test_refusals_over_the_bridge_carry_the_reason_and_keep_the_request_id(
    actors: Actors, stub: Stub, web_stub: Stub
) -> None:
    user = await actors.user()
    reader = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await web_stub.ResetSecret(
            pb.ResetSecretRequest(username=reader.username),
            metadata=(*user.metadata(), ("x-request-id", f"console-{user.username}")),
        )

    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(failure.value) == "MISSING_RIGHT"
    [event] = await audit_events(stub, reader, actor_username=user.username)
    assert (event.operation, event.reason) == ("ResetSecret", "MISSING_RIGHT")
    assert event.request_id == f"console-{user.username}"


async def test_a_browser_call_is_audited_with_the_browsers_address(
    actors: Actors, stub: Stub, web_stub: Stub
) -> None:
    admin = await actors.admin()
    target = await actors.user()

    await web_stub.ResetSecret(
        pb.ResetSecretRequest(username=target.username), metadata=admin.metadata()
    )

    [event] = await audit_events(
        stub, admin, target_username=target.username, operation="ResetSecret"
    )
    assert event.actor == admin.username
    assert event.peer.startswith("console:ipv4:127.0.0.1:")


async def test_no_other_caller_can_claim_a_browser_address(
    actors: Actors, stub: Stub, server: RunningServer
) -> None:
    """Native calls, over TCP and over the bridge's own unix socket, that send the bridge's
    metadata without its key are recorded with their real peer."""
    admin = await actors.admin()
    assert server.console is not None
    forged = (
        ("x-twofactor-forwarded-for", "ipv4:203.0.113.9:443"),
        ("x-twofactor-forwarded-key", "a guess"),
    )
    socket = f"unix:{server.console.socket_dir / 'grpc.sock'}"
    async with grpc.aio.insecure_channel(socket) as local:
        for caller in (stub, pb_grpc.TwoFactorServiceStub(local)):
            target = await actors.user()
            await caller.ResetSecret(
                pb.ResetSecretRequest(username=target.username),
                metadata=(*admin.metadata(), *forged),
            )
            [event] = await audit_events(
                stub, admin, target_username=target.username, operation="ResetSecret"
            )
            assert "203.0.113.9" not in event.peer
            assert not event.peer.startswith("console:")


async def test_the_audit_log_follows_over_the_bridge(
    actors: Actors, stub: Stub, web_stub: Stub
) -> None:
    admin = await actors.admin()
    [newest] = (
        await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1), metadata=admin.metadata()
        )
    ).events
    follow = web_stub.WatchAuditEvents(
        pb.WatchAuditEventsRequest(after_sequence=newest.sequence), metadata=admin.metadata()
    )
    try:
        created = await actors.create("followed")
        seen: list[str] = []
        while created.username not in seen:
            message = await follow.read()
            assert isinstance(message, pb.WatchAuditEventsResponse)
            seen.append(message.event.target)
    finally:
        follow.cancel()


@pytest.mark.parametrize("value", ["8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_malformed_console_address_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="TWOFACTOR_CONSOLE_ADDRESS"):
        load_config({"TWOFACTOR_CONSOLE_ADDRESS": value})


def test_the_console_is_on_by_default_and_off_with_an_empty_value() -> None:
    assert load_config({}).console_address == "127.0.0.1:8080"
    assert load_config({"TWOFACTOR_CONSOLE_ADDRESS": ""}).console_address is None


async def test_a_body_beyond_the_message_limit_is_refused_unread(
    http: tuple[aiohttp.ClientSession, str], runtime: Runtime
) -> None:
    session, url = http
    oversized = frame(b"x" * (runtime.config.max_message_bytes + 1))
    async with session.post(url + SIGN_IN, data=oversized, headers=GRPC_WEB) as response:
        assert response.status == 413
