"""What attackers send on the wire (SPEC §4): bytes that do not parse as the request answer
INVALID_ARGUMENT with reason MALFORMED_REQUEST, for every RPC, logged once like any other call
and never with a traceback; duplicated credential metadata is refused, naming the key."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, access_lines, error_reason, wait_until
from twofactor_service.policy import SERVICE

# Each one breaks the wire format of any message: a truncated length-delimited field, a
# varint tag that never ends, a group that never closes, a field shorter than its length.
GARBAGE = [b"\x0a\xff", b"\xff" * 11, b"\x0b", b"\x12\x05ab"]
METHODS = [(m.name, m.input_type.full_name, m.server_streaming) for m in SERVICE.methods]


async def raw_call(channel: grpc.aio.Channel, method: str, body: bytes, streaming: bool) -> None:
    """Sends `body` as the request, as bytes, and reads the whole answer."""
    path = f"/{SERVICE.full_name}/{method}"
    # No (de)serializers: the bytes go out as they are.
    if streaming:
        stream: Any = channel.unary_stream(path)
        async for _ in stream(body, timeout=5):
            pass
    else:
        unary: Any = channel.unary_unary(path)
        await unary(body, timeout=5)


@pytest.mark.parametrize(("method", "message_type", "streaming"), METHODS)
async def test_bytes_that_are_not_the_request_are_a_bad_argument(
    channel: grpc.aio.Channel,
    log_lines: list[str],
    method: str,
    message_type: str,
    streaming: bool,
) -> None:
    for body in GARBAGE:
        log_lines.clear()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await raw_call(channel, method, body, streaming)

        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, body
        assert error_reason(failure.value) == "MALFORMED_REQUEST"
        assert failure.value.details() == f"the request body is not a valid {message_type} message"

        # One access-log line like any other call's (written as the call ends on the server,
        # just after the client has its answer), and nothing logged as an error.
        async def logged() -> bool:
            return bool(access_lines(log_lines, method))

        await wait_until(logged, within=5, what=f"the access log line of {method}")
        [line] = access_lines(log_lines, method)
        assert (line["code"], line["reason"]) == ("INVALID_ARGUMENT", "MALFORMED_REQUEST")
        records = [json.loads(text) for text in log_lines]
        assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records
        assert not [text for text in log_lines if "Traceback" in text or "DecodeError" in text]


@pytest.mark.parametrize("key", ["authorization", "x-step-up-password", "x-step-up-code"])
async def test_credentials_sent_twice_are_refused(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, key: str
) -> None:
    admin = await actors.admin()
    target = await actors.user(protected=True)
    proof = dict(admin.step_up())
    metadata = [*proof.items(), (key, proof[key])]

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(pb.ResetSecretRequest(username=target.username), metadata=metadata)

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(failure.value) == "DUPLICATE_METADATA"
    assert key in (failure.value.details() or "")
    # Nothing happened: the target still has its key.
    after = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=target.username), metadata=admin.metadata()
    )
    assert after.status.HasField("key_create_time")
