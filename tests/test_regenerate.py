"""O1/O2: regenerating one's own key ("Regenerate secret key", then "Check and apply"), as the
seed page's first numbered steps describe, including the Account protection window."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, audit_events, audit_rows_containing, error_reason
from twofactor_service.store.database import Connection

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"


async def sign_in_with_code(stub: Stub, person: Person, code: str) -> pb.SignInResponse:
    return await stub.SignIn(
        pb.SignInRequest(username=person.username, password=person.password, code=code)
    )


async def own_status(stub: Stub, person: Person) -> pb.AccountStatus:
    response = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=person.metadata())
    return response.status


async def test_confirming_a_regenerated_key_swaps_it_for_the_old_one(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    bob = await actors.user()
    before = await own_status(stub, bob)
    old_secret = bob.secret

    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )

    new_key = begun.pending_key
    assert len(new_key.secret_base32) == 32
    assert new_key.secret_base32 != old_secret
    assert new_key.provisioning_uri.startswith("otpauth://totp/")
    assert parse_qs(urlsplit(new_key.provisioning_uri).query)["secret"] == [new_key.secret_base32]
    assert new_key.qr_code_png.startswith(b"\x89PNG")
    assert "<svg" in new_key.qr_code_svg
    assert (new_key.algorithm, new_key.digits, new_key.period_seconds) == ("SHA1", 6, 30)
    # Pending for 10 minutes (the database's clock; allow for a slow machine).
    assert 9 * 60 <= new_key.expire_time.seconds - time.time() <= 10 * 60 + 5
    pending = await own_status(stub, bob)
    assert pending.has_pending_key
    assert pending.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert pending.key_create_time == before.key_create_time
    # Until "Check and apply" the old key is the one that signs in.
    await sign_in_with_code(stub, bob, bob.next_code())

    confirmed = await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=bob.next_code(new_key.secret_base32)),
        metadata=bob.metadata(),
    )

    assert confirmed.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not confirmed.status.has_pending_key
    assert confirmed.status.key_create_time.ToDatetime() > before.key_create_time.ToDatetime()
    with pytest.raises(grpc.aio.AioRpcError) as old_key_refused:
        await sign_in_with_code(stub, bob, bob.next_code(old_secret))
    assert old_key_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(old_key_refused.value) == "INVALID_CREDENTIALS"
    bob.secret = new_key.secret_base32
    signed_in = await sign_in_with_code(stub, bob, bob.next_code())
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    # The session that regenerated the key keeps working.
    assert (await own_status(stub, bob)).username == bob.username

    admin = await actors.admin()
    events = await audit_events(stub, admin, actor_username=bob.username)
    operations = [(e.operation, e.outcome, e.target) for e in events]
    assert ("BeginRegenerateSecret", enums_pb2.AUDIT_OUTCOME_SUCCESS, bob.username) in operations
    assert ("ConfirmRegenerateSecret", enums_pb2.AUDIT_OUTCOME_SUCCESS, bob.username) in operations
    assert (
        await audit_rows_containing(db, [old_secret or "", new_key.secret_base32, bob.password])
        == []
    )


async def test_a_wrong_code_leaves_the_old_key_working(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    new_secret = begun.pending_key.secret_base32

    # The user typed the code of the old entry in the authenticator app.
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=bob.next_code()), metadata=bob.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "CODE_INVALID"
    assert "old key still works" in (failure.value.details() or "")
    status = await own_status(stub, bob)
    assert status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert status.has_pending_key
    assert status.consecutive_failures == 1
    signed_in = await sign_in_with_code(stub, bob, bob.next_code())
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    # The pending key survives a mistake: the right code still applies it.
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=bob.next_code(new_secret)), metadata=bob.metadata()
    )
    bob.secret = new_secret
    await sign_in_with_code(stub, bob, bob.next_code())


async def test_confirm_without_a_pending_key_is_refused(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=bob.next_code()), metadata=bob.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "NO_PENDING_KEY"
    await sign_in_with_code(stub, bob, bob.next_code())


async def test_a_pending_key_is_applied_only_once(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    bob.secret = begun.pending_key.secret_base32
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=bob.next_code()), metadata=bob.metadata()
    )

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=bob.next_code()), metadata=bob.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "NO_PENDING_KEY"


async def test_beginning_again_replaces_the_pending_key(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    first = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    second = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    assert first.pending_key.secret_base32 != second.pending_key.secret_base32

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=bob.next_code(first.pending_key.secret_base32)),
            metadata=bob.metadata(),
        )

    assert error_reason(failure.value) == "CODE_INVALID"
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=bob.next_code(second.pending_key.secret_base32)),
        metadata=bob.metadata(),
    )


@pytest.mark.parametrize("code", ["", "12345", "12a456", "123456789"])
async def test_a_malformed_confirmation_code_is_invalid_argument(
    actors: Actors, stub: Stub, code: str
) -> None:
    bob = await actors.user()
    await stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=bob.metadata())

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=code), metadata=bob.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith("code")
    assert (await own_status(stub, bob)).has_pending_key


# --- Seed: "If your account is protected against unauthorized modification, you must confirm
# that you have the permissions to change this account."


async def test_protected_account_needs_step_up_to_begin(actors: Actors, stub: Stub) -> None:
    carol = await actors.user(protected=True)

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=carol.metadata()
        )
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(missing.value) == "STEP_UP_REQUIRED"
    assert not (await own_status(stub, carol)).has_pending_key

    wrong_password = carol.metadata(
        x_step_up_password="not my password", x_step_up_code=carol.next_code()
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad_password:
        await stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=wrong_password)
    assert bad_password.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(bad_password.value) == "STEP_UP_FAILED"

    # A code that is already used (the replay rule applies to step-up codes too).
    used = carol.next_code()
    await sign_in_with_code(stub, carol, used)
    with pytest.raises(grpc.aio.AioRpcError) as bad_code:
        await stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=carol.step_up(used)
        )
    assert bad_code.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(bad_code.value) == "STEP_UP_FAILED"
    assert not (await own_status(stub, carol)).has_pending_key

    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=carol.step_up()
    )

    assert begun.pending_key.secret_base32
    assert (await own_status(stub, carol)).has_pending_key


async def test_protected_account_needs_step_up_to_confirm(actors: Actors, stub: Stub) -> None:
    carol = await actors.user(protected=True)
    old_secret = carol.secret
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=carol.step_up()
    )
    new_secret = begun.pending_key.secret_base32

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=carol.next_code(new_secret)),
            metadata=carol.metadata(),
        )
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(missing.value) == "STEP_UP_REQUIRED"

    wrong = carol.metadata(x_step_up_password="not my password", x_step_up_code=carol.next_code())
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=carol.next_code(new_secret)), metadata=wrong
        )
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(failed.value) == "STEP_UP_FAILED"
    # Nothing changed: the old key signs in, the new one is still pending.
    assert (await own_status(stub, carol)).has_pending_key
    await sign_in_with_code(stub, carol, carol.next_code(old_secret))

    proof = carol.step_up()  # the Account protection window: own password, code of the old key
    confirmed = await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=carol.next_code(new_secret)), metadata=proof
    )

    assert not confirmed.status.has_pending_key
    assert confirmed.status.protected
    carol.secret = new_secret
    await sign_in_with_code(stub, carol, carol.next_code())


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        ("ConfirmRegenerateSecret", "NO_PENDING_KEY"),
        ("ConfirmRegenerateSecret", "CODE_INVALID"),
        ("ChangePassword", "INVALID_CREDENTIALS"),
        ("BeginRegenerateSecret", "STEP_UP_REQUIRED"),
    ],
)
async def test_a_refused_self_service_call_is_audited_against_the_account_that_made_it(
    actors: Actors, stub: Stub, operation: str, reason: str
) -> None:
    """The request names no account: the caller is the target, so filtering the audit log by
    the user finds the failures that count towards its lockout."""
    admin = await actors.admin()
    bob = await actors.user(protected=reason == "STEP_UP_REQUIRED")
    if reason == "CODE_INVALID":
        await stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=bob.metadata())
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "ConfirmRegenerateSecret": lambda: stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code="000000"), metadata=bob.metadata()
        ),
        "ChangePassword": lambda: stub.ChangePassword(
            pb.ChangePasswordRequest(
                current_password="not the password", new_password="a new long password"
            ),
            metadata=bob.metadata(),
        ),
        "BeginRegenerateSecret": lambda: stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
        ),
    }

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await calls[operation]()

    assert error_reason(failure.value) == reason
    [event, *_] = await audit_events(stub, admin, target_username=bob.username, operation=operation)
    assert (event.actor, event.target, event.outcome, event.reason) == (
        bob.username,
        bob.username,
        enums_pb2.AUDIT_OUTCOME_FAILURE,
        reason,
    )
