"""Structured logs: every call leaves one access log line with its method, status, duration,
request id and peer, and no log line at any level ever holds a password, code, secret, session
token or enrollment ticket."""

from __future__ import annotations

import json
import logging
import re
import uuid

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import VERIFY_RIGHT, Actors, access_lines, error_reason
from twofactor_service import rules
from twofactor_service.logs import JsonFormatter


class Scenario:
    """Remembers every secret value the scenario sends or receives."""

    def __init__(self) -> None:
        self.texts: set[str] = set()  # passwords, base32 secrets, URIs, tokens, tickets
        self.codes: set[str] = set()  # one-time codes: short digit strings

    def text(self, value: str) -> str:
        assert value
        self.texts.add(value)
        return value

    def code(self, value: str) -> str:
        self.codes.add(value)
        return value


async def test_no_log_line_holds_a_secret_and_each_call_is_logged_with_its_request_id(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, log_lines: list[str]
) -> None:
    seen = Scenario()
    admin = await actors.create("admin", rights=(rules.ADMIN_RIGHT,))
    alice = await actors.create("alice")
    carol = await actors.create("carol", protected=True)
    verifier = await actors.create("service", excluded=True, rights=(VERIFY_RIGHT,))
    for person in (admin, alice, carol, verifier):
        seen.text(person.password)

    # Enrollment at first sign-in.
    for person in (admin, alice, carol):
        started = await stub.SignIn(
            pb.SignInRequest(username=person.username, password=person.password)
        )
        key = started.enrollment.pending_key
        person.secret = seen.text(key.secret_base32)
        seen.text(key.provisioning_uri)
        done = await stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=seen.text(started.enrollment.enrollment_ticket),
                code=seen.code(person.next_code()),
            )
        )
        person.token = seen.text(done.session.token)

    # Sign-in with password and code; the service account with its password alone.
    signed_in = await stub.SignIn(
        pb.SignInRequest(
            username=alice.username, password=alice.password, code=seen.code(alice.next_code())
        )
    )
    alice.token = seen.text(signed_in.session.token)
    service_session = await stub.SignIn(
        pb.SignInRequest(username=verifier.username, password=verifier.password)
    )
    verifier.token = seen.text(service_session.session.token)

    # Regenerating one's own key.
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=alice.metadata()
    )
    alice.secret = seen.text(begun.pending_key.secret_base32)
    seen.text(begun.pending_key.provisioning_uri)
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=seen.code(alice.next_code())),
        metadata=alice.metadata(),
    )

    # VerifyCode, valid then replayed, with the caller's request id.
    request_id = f"req-{uuid.uuid4().hex}"
    code = seen.code(alice.next_code())
    for _ in range(2):
        await stub.VerifyCode(
            pb.VerifyCodeRequest(username=alice.username, code=code),
            metadata=(*verifier.metadata(), ("x-request-id", request_id)),
        )

    # A wrong password, with a request id of its own.
    wrong_id = f"req-{uuid.uuid4().hex}"
    wrong_password = seen.text("not alice's password at all")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SignIn(
            pb.SignInRequest(
                username=alice.username, password=wrong_password, code=seen.code(alice.next_code())
            ),
            metadata=(("x-request-id", wrong_id),),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Resetting a protected account's key: without step-up, with a wrong code, then properly.
    reset = pb.ResetSecretRequest(username=carol.username)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ResetSecret(reset, metadata=admin.metadata())
    assert error_reason(missing.value) == "STEP_UP_REQUIRED"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.ResetSecret(
            reset,
            metadata=admin.metadata(x_step_up_password=admin.password, x_step_up_code="000000"),
        )
    assert error_reason(failed.value) == "STEP_UP_FAILED"
    done_reset = await stub.ResetSecret(reset, metadata=admin.step_up(seen.code(admin.next_code())))
    assert done_reset.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED

    # Nothing secret in any line, at any level.
    assert log_lines
    for line in log_lines:
        for text in seen.texts:
            assert text not in line, f"a secret value is logged: {line}"
        for one_time in seen.codes:
            # As a token of its own (a request id's hex may hold six digits by chance).
            assert not re.search(rf"(?<![0-9A-Za-z]){one_time}(?![0-9A-Za-z])", line), line

    # The access log: one line per call, with the request id the caller sent.
    calls = 3 + 3 + 2 + 2 + 2 + 1 + 3  # enrollments, sign-ins, regenerate, verify, wrong, reset
    entries = [json.loads(line) for line in log_lines]
    assert len([e for e in entries if e["logger"] == "twofactor_service.access"]) == calls
    verify_lines = [
        e for e in access_lines(log_lines, "VerifyCode") if e["request_id"] == request_id
    ]
    assert len(verify_lines) == 2
    for entry in verify_lines:
        assert (entry["code"], entry["reason"]) == ("OK", "")
        assert entry["level"] == "INFO"
        assert isinstance(entry["duration_ms"], float | int)
        assert str(entry["peer"]).startswith(("ipv4:", "ipv6:"))
    [wrong_line] = [e for e in access_lines(log_lines, "SignIn") if e["request_id"] == wrong_id]
    assert (wrong_line["code"], wrong_line["reason"]) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
    # A refusal's line names its ErrorInfo reason, as the client got it.
    resets = [(e["code"], e["reason"]) for e in access_lines(log_lines, "ResetSecret")]
    assert resets == [
        (missing.value.code().name, "STEP_UP_REQUIRED"),
        (failed.value.code().name, "STEP_UP_FAILED"),
        ("OK", ""),
    ]
    # Calls without x-request-id get one generated, which the access log shows.
    assert all(e["request_id"] for e in access_lines(log_lines, "CompleteEnrollment"))


async def test_access_lines_are_json_of_the_formatter_shape_whatever_request_id_is_sent(
    stub: pb_grpc.TwoFactorServiceAsyncStub, log_lines: list[str]
) -> None:
    """The access log builds its lines without the formatter: they must still parse, one object
    per line, with the keys in the formatter's order, whatever printable text a client chose."""
    sent = ['a"b\\c}{"level": "ERROR"', 'say "hi" \\ } {']
    for request_id in sent:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.VerifyCode(
                pb.VerifyCodeRequest(username="alice", code="123456"),
                metadata=(("x-request-id", request_id),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = [line for line in log_lines if '"twofactor_service.access"' in line]
    entries = [json.loads(line) for line in lines]
    assert [e["request_id"] for e in entries] == sent
    assert [(e["code"], e["reason"]) for e in entries] == [
        ("UNAUTHENTICATED", "UNAUTHENTICATED")
    ] * 2
    record = logging.makeLogRecord(
        {"name": "twofactor_service.access", "levelno": logging.INFO, "levelname": "INFO"}
        | {"msg": "rpc", "method": "m", "code": "c", "reason": "", "duration_ms": 1}
        | {"request_id": "", "peer": ""}
    )
    formatted = json.loads(JsonFormatter().format(record))
    for entry in entries:
        assert list(entry) == list(formatted)
        assert entry["level"] == "INFO"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


async def test_the_request_id_comes_back_in_a_trailer_with_an_answer_and_with_a_refusal(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    verifier = await actors.service()
    bob = await actors.user()
    answered = stub.VerifyCode(
        pb.VerifyCodeRequest(username=bob.username, code=bob.next_code()),
        metadata=(*verifier.metadata(), ("x-request-id", "answered-1")),
    )
    assert (await answered).result == enums_pb2.VERIFY_CODE_RESULT_OK
    assert ("x-request-id", "answered-1") in tuple(await answered.trailing_metadata())

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SignIn(
            pb.SignInRequest(username=bob.username, password="not bob's password"),
            metadata=(("x-request-id", "refused-1"),),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(refused.value) == "INVALID_CREDENTIALS"  # the details are there too
    assert ("x-request-id", "refused-1") in tuple(refused.value.trailing_metadata())
