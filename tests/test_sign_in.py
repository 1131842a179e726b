"""O6 sign-in in every state, first-time enrollment, and the bad inputs of sign-in."""

from __future__ import annotations

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, error_reason


async def test_allowlisted_account_sets_up_a_key_at_first_sign_in(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    alice = await actors.create("alice")

    response = await stub.SignIn(pb.SignInRequest(username=alice.username, password=alice.password))

    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    key = response.enrollment.pending_key
    assert len(key.secret_base32) == 32  # 160 bits, RFC 4226 R6
    assert key.provisioning_uri.startswith("otpauth://totp/")
    assert key.qr_code_png.startswith(b"\x89PNG")
    assert "<svg" in key.qr_code_svg
    alice.secret = key.secret_base32
    done = await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=response.enrollment.enrollment_ticket, code=alice.next_code()
        )
    )
    assert done.session.token
    alice.token = done.session.token
    status = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=alice.metadata())
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not status.status.allowlisted


async def test_enrolled_account_signs_in_with_password_and_code(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()

    response = await stub.SignIn(
        pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code())
    )

    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    assert response.session.token


async def test_enrolled_account_without_code_is_asked_for_one(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password))

    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(failure.value) == "CODE_REQUIRED"


async def test_excluded_account_signs_in_with_password_alone(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    svc = await actors.create("svc", excluded=True)

    response = await stub.SignIn(pb.SignInRequest(username=svc.username, password=svc.password))

    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED


async def test_blocked_account_is_told_an_administrator_must_allowlist_it(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    admin = await actors.admin()
    carol = await actors.user()
    await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=carol.username), metadata=admin.metadata()
    )

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(
            pb.SignInRequest(
                username=carol.username, password=carol.password, code=carol.next_code()
            )
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "TWO_FACTOR_KEY_DELETED"
    assert "allowlist" in (failure.value.details() or "")


async def test_wrong_password_and_unknown_account_look_the_same(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    failures = []
    for username, password in (
        (bob.username, "wrong password!"),
        ("nobody-" + bob.username, bob.password),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.SignIn(pb.SignInRequest(username=username, password=password, code="123456"))
        failures.append(
            (failure.value.code(), failure.value.details(), error_reason(failure.value))
        )

    assert failures[0] == failures[1]
    assert failures[0][0] == grpc.StatusCode.UNAUTHENTICATED
    assert failures[0][2] == "INVALID_CREDENTIALS"


async def test_a_code_is_accepted_only_once(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    code = bob.next_code()
    await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password, code=code))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password, code=code))

    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(failure.value) == "INVALID_CREDENTIALS"


async def test_an_enrollment_ticket_works_once(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    alice = await actors.create("alice")
    response = await stub.SignIn(pb.SignInRequest(username=alice.username, password=alice.password))
    secret = response.enrollment.pending_key.secret_base32
    ticket = response.enrollment.enrollment_ticket
    await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(enrollment_ticket=ticket, code=alice.next_code(secret))
    )

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(enrollment_ticket=ticket, code=alice.next_code(secret))
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "ENROLLMENT_TICKET_INVALID"


@pytest.mark.parametrize(
    ("username", "password", "code", "field"),
    [
        ("", "pw", "", "username"),
        ("x" * 257, "pw", "", "username"),
        ("bob\x00", "pw", "", "username"),
        ("bob", "", "", "password"),
        ("bob", "pw", "12345", "code"),
        ("bob", "pw", "12a456", "code"),
        ("bob", "pw", "123456789", "code"),
    ],
)
async def test_malformed_sign_in_is_invalid_argument(
    stub: pb_grpc.TwoFactorServiceAsyncStub, username: str, password: str, code: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username=username, password=password, code=code))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith(field)


async def test_calls_without_a_session_are_unauthenticated(
    stub: pb_grpc.TwoFactorServiceAsyncStub,
) -> None:
    for metadata in (
        (),
        (("authorization", "Bearer not-a-real-token"),),
        (("authorization", "Basic abc"),),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=metadata)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
