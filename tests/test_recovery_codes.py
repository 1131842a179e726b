"""O11: recovery codes. An ENROLLED account makes a set of one-time codes for itself (a current
code of its key, step-up where it is protected), shown once and stored only as hashes; each code
signs in once in place of a TOTP code; a new set replaces the old one; a reset, a deletion or an
exclusion voids them; the audit log records their use, their failure and a new set, never a
code. (The attempt budget over two replicas: tests/test_attempt_budget.py; unknown-name parity:
tests/test_enumeration.py.)"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeAlias

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    VOUCH_RIGHT,
    Actors,
    Person,
    audit_events,
    audit_rows_containing,
    error_reason,
)
from tests.test_cli import twofactor as twofactor
from twofactor_service import recovery_codes
from twofactor_service.errors import InvalidArgument
from twofactor_service.rules import AccountKind
from twofactor_service.store.database import Connection

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

CODE_FORMAT = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")


async def generate(stub: Stub, person: Person) -> pb.GenerateRecoveryCodesResponse:
    response: pb.GenerateRecoveryCodesResponse = await stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code=person.next_code()), metadata=person.metadata()
    )
    return response


async def sign_in_with_recovery_code(
    stub: Stub, person: Person, recovery_code: str, password: str | None = None
) -> pb.SignInResponse:
    response: pb.SignInResponse = await stub.SignIn(
        pb.SignInRequest(
            username=person.username,
            password=person.password if password is None else password,
            recovery_code=recovery_code,
        )
    )
    return response


async def remaining(stub: Stub, person: Person, reader: Person | None = None) -> int:
    """The account's unused codes, as GetAccountStatus tells them (to itself, or to `reader`)."""
    if reader is None:
        reader = person
    response = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=person.username), metadata=reader.metadata()
    )
    return response.status.recovery_codes_remaining


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The status and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code(), error_reason(refused.value)


INVALID_CREDENTIALS = (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


# --- The format: plain functions.


def test_a_new_code_has_80_random_bits_in_four_groups_of_crockford_base32() -> None:
    codes = {recovery_codes.new_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(CODE_FORMAT.match(code) for code in codes)
    # 16 symbols of a 32-letter alphabet: 80 bits.
    assert recovery_codes.CODE_LENGTH * 5 == 80
    assert len(recovery_codes.ALPHABET) == 32


def test_a_code_is_read_in_any_case_with_or_without_dashes_and_spaces() -> None:
    assert recovery_codes.normalise("abcd-efgh-jkmn-pqrs") == "ABCDEFGHJKMNPQRS"
    assert recovery_codes.normalise(" ABCD EFGH jkmn PQRS ") == "ABCDEFGHJKMNPQRS"
    assert recovery_codes.normalise("ABCDEFGHJKMNPQRS") == "ABCDEFGHJKMNPQRS"
    # Crockford's decoding: I and L are 1, O is 0.
    assert recovery_codes.normalise("IL0O-0000-0000-0000") == "1100000000000000"


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "ABCD-EFGH-JKMN-PQR",  # too short
        "ABCD-EFGH-JKMN-PQRST",  # too long
        "ABCD-EFGH-JKMN-PQRU",  # U is not in the alphabet
        "ABCD_EFGH_JKMN_PQRS",  # not a separator
        "ÄBCD-EFGH-JKMN-PQRS",
        "A" * 100,
    ],
)
def test_what_cannot_be_a_code_is_refused_with_its_shape(typed: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        recovery_codes.normalise(typed)
    assert "Crockford base32" in refused.value.message


# --- Generating a set.


async def test_an_enrolled_account_gets_ten_codes_shown_once_and_stored_as_hashes(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    bob = await actors.user()
    assert await remaining(stub, bob) == 0

    response = await generate(stub, bob)

    codes = list(response.recovery_codes)
    assert len(codes) == len(set(codes)) == 10
    assert all(CODE_FORMAT.match(code) for code in codes)
    assert response.status.recovery_codes_remaining == 10
    assert await remaining(stub, bob) == 10
    stored = await db.fetch(
        "SELECT rc::text AS row FROM recovery_codes rc JOIN accounts a ON a.id = rc.account_id"
        " WHERE a.username = $1",
        bob.username,
    )
    assert len(stored) == 10
    plain = [recovery_codes.normalise(code) for code in codes]
    assert not [r for r in stored for code in codes + plain if code in r["row"]]
    assert await audit_rows_containing(db, codes + plain) == []
    admin = await actors.admin()
    [event] = await audit_events(
        stub, admin, target_username=bob.username, operation="GenerateRecoveryCodes"
    )
    assert event.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS
    assert event.reason == "RECOVERY_CODES_GENERATED"
    assert event.actor == bob.username


async def test_a_new_set_replaces_the_old_one(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    old = (await generate(stub, bob)).recovery_codes
    await sign_in_with_recovery_code(stub, bob, old[0])

    new = (await generate(stub, bob)).recovery_codes

    assert set(new).isdisjoint(old)
    assert await remaining(stub, bob) == 10
    assert await refusal(sign_in_with_recovery_code(stub, bob, old[1])) == INVALID_CREDENTIALS
    assert (await sign_in_with_recovery_code(stub, bob, new[1])).session.token


async def test_generating_needs_a_current_code_of_ones_own_key(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    kept = (await generate(stub, bob)).recovery_codes
    stale = bob.code_now()  # used up by the generation above

    for request, expected in [
        (pb.GenerateRecoveryCodesRequest(), (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")),
        (
            pb.GenerateRecoveryCodesRequest(code="12ab56"),
            (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ),
        (
            pb.GenerateRecoveryCodesRequest(code=stale),
            (grpc.StatusCode.FAILED_PRECONDITION, "CODE_INVALID"),
        ),
    ]:
        call = stub.GenerateRecoveryCodes(request, metadata=bob.metadata())
        assert await refusal(call) == expected, request

    # Nothing changed: the old set still works.
    assert await remaining(stub, bob) == 10
    assert (await sign_in_with_recovery_code(stub, bob, kept[0])).session.token


async def test_an_account_without_two_factor_cannot_generate_codes(
    actors: Actors, stub: Stub
) -> None:
    excluded = await actors.user_without_2fa()
    call = stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code="123456"), metadata=excluded.metadata()
    )
    assert await refusal(call) == (grpc.StatusCode.PERMISSION_DENIED, "TWO_FACTOR_NOT_CONFIGURED")


async def test_a_protected_account_generates_with_the_account_protection_window(
    actors: Actors, stub: Stub
) -> None:
    """The step-up proof's code is the current code: the window asks once, not twice."""
    carol = await actors.user(protected=True)
    without = stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code=carol.next_code()), metadata=carol.metadata()
    )
    assert await refusal(without) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    wrong = stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(),
        metadata=carol.metadata(x_step_up_password="not the password", x_step_up_code="123456"),
    )
    assert await refusal(wrong) == (grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert await remaining(stub, carol) == 0

    proof_code = carol.next_code()
    response = await stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code=proof_code), metadata=carol.step_up(proof_code)
    )

    assert len(response.recovery_codes) == 10
    assert (await sign_in_with_recovery_code(stub, carol, response.recovery_codes[3])).session


# --- Signing in with a code.


async def test_each_code_signs_in_once_in_place_of_a_totp_code(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes
    # Typed as a person would: lower case, spaces instead of dashes.
    typed = codes[2].lower().replace("-", " ")

    signed_in = await sign_in_with_recovery_code(stub, bob, typed)

    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    bob.token = signed_in.session.token
    # A session opened with a recovery code is a two-factor session: it may set up a new key.
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    assert begun.pending_key.secret_base32
    assert await remaining(stub, bob) == 9
    assert await refusal(sign_in_with_recovery_code(stub, bob, codes[2])) == INVALID_CREDENTIALS
    admin = await actors.admin()
    events = await audit_events(stub, admin, target_username=bob.username, operation="SignIn")
    assert [(e.outcome, e.reason) for e in events[:2]] == [
        (enums_pb2.AUDIT_OUTCOME_FAILURE, "RECOVERY_CODE_INVALID"),
        (enums_pb2.AUDIT_OUTCOME_SUCCESS, "RECOVERY_CODE_USED"),
    ]
    plain = [recovery_codes.normalise(code) for code in codes]
    assert await audit_rows_containing(db, [*codes, typed, *plain]) == []


async def test_a_wrong_password_with_a_right_code_uses_nothing(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes

    refused = sign_in_with_recovery_code(stub, bob, codes[0], password="not the password")

    assert await refusal(refused) == INVALID_CREDENTIALS
    assert await remaining(stub, bob) == 10
    assert (await sign_in_with_recovery_code(stub, bob, codes[0])).session.token


async def test_a_wrong_code_answers_as_a_wrong_totp_code_does(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    await generate(stub, bob)
    guess = recovery_codes.new_code()

    assert await refusal(sign_in_with_recovery_code(stub, bob, guess)) == INVALID_CREDENTIALS
    status = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=bob.metadata())
    assert status.status.consecutive_failures == 1
    assert status.status.recovery_codes_remaining == 10


async def test_an_account_without_codes_is_refused_a_recovery_code(
    actors: Actors, stub: Stub
) -> None:
    bob = await actors.user()
    guess = recovery_codes.new_code()
    assert await refusal(sign_in_with_recovery_code(stub, bob, guess)) == INVALID_CREDENTIALS


@pytest.mark.parametrize("known", [True, False])
async def test_bad_recovery_code_input_is_refused_alike_for_every_name(
    actors: Actors, stub: Stub, known: bool
) -> None:
    bob = await actors.user()
    name = bob.username if known else f"nobody-{bob.username}"
    cases = [
        pb.SignInRequest(username=name, password=bob.password, recovery_code="not a code"),
        pb.SignInRequest(
            username=name,
            password=bob.password,
            code=bob.code_now(),
            recovery_code=recovery_codes.new_code(),
        ),
    ]
    for request in cases:
        assert await refusal(stub.SignIn(request)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )


async def test_one_code_sent_twice_at_once_signs_in_once(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()
    code = (await generate(stub, bob)).recovery_codes[0]

    results = await asyncio.gather(
        *(sign_in_with_recovery_code(stub, bob, code) for _ in range(4)), return_exceptions=True
    )

    opened = [r for r in results if isinstance(r, pb.SignInResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(opened) == 1
    assert [(e.code(), error_reason(e)) for e in refused] == [INVALID_CREDENTIALS] * 3
    assert await remaining(stub, bob) == 9


async def test_a_domain_account_signs_in_with_a_recovery_code(actors: Actors, stub: Stub) -> None:
    voucher = await actors.service(VOUCH_RIGHT)
    dora = await actors.create("dora", kind=AccountKind.DOMAIN)
    started = await stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=dora.username), metadata=voucher.metadata()
    )
    dora.secret = started.enrollment.pending_key.secret_base32
    done = await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=dora.next_code()
        )
    )
    dora.token = done.session.token
    code = (await generate(stub, dora)).recovery_codes[0]

    vouched = await stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=dora.username, recovery_code=code),
        metadata=voucher.metadata(),
    )

    assert vouched.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    again = stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=dora.username, recovery_code=code),
        metadata=voucher.metadata(),
    )
    assert await refusal(again) == INVALID_CREDENTIALS


# --- Reset, delete and exclusion void the codes.


@pytest.mark.parametrize("operation", ["ResetSecret", "DeleteSecret", "AddToExclusionList"])
async def test_losing_the_key_voids_the_codes(
    actors: Actors, stub: Stub, db: Connection, operation: str
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes
    request = {
        "ResetSecret": pb.ResetSecretRequest,
        "DeleteSecret": pb.DeleteSecretRequest,
        "AddToExclusionList": pb.AddToExclusionListRequest,
    }[operation](username=bob.username)

    response = await getattr(stub, operation)(request, metadata=admin.metadata())

    assert response.status.recovery_codes_remaining == 0
    left = await db.fetchval(
        "SELECT count(*) FROM recovery_codes rc JOIN accounts a ON a.id = rc.account_id"
        " WHERE a.username = $1",
        bob.username,
    )
    assert left == 0
    if operation == "ResetSecret":
        # Set up again, the account's old codes stay void.
        await actors.enroll(bob)
        refused = sign_in_with_recovery_code(stub, bob, codes[0])
        assert await refusal(refused) == INVALID_CREDENTIALS
        assert await remaining(stub, bob) == 0


async def test_regenerating_ones_own_key_keeps_the_codes(actors: Actors, stub: Stub) -> None:
    """The owner changed phones; the printed codes still hold (docs/choices.md)."""
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
    )
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=bob.next_code(begun.pending_key.secret_base32)),
        metadata=bob.metadata(),
    )

    assert await remaining(stub, bob) == 10
    assert (await sign_in_with_recovery_code(stub, bob, codes[0])).session.token


async def test_an_administrator_sees_another_accounts_remaining_codes(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes
    await sign_in_with_recovery_code(stub, bob, codes[0])
    assert await remaining(stub, bob, reader=admin) == 9


async def test_the_operator_sees_the_count_and_a_reset_at_the_terminal_voids_it(
    actors: Actors, stub: Stub, twofactor: Any
) -> None:
    bob = await actors.user()
    codes = (await generate(stub, bob)).recovery_codes

    text, as_json = await asyncio.gather(
        twofactor("status", bob.username), twofactor("status", bob.username, "--json")
    )

    assert text.code == as_json.code == 0, text.err
    assert "  recovery codes left: 10" in text.out.splitlines()
    assert as_json.json()["recovery_codes_remaining"] == 10
    reset = await twofactor("reset-key", bob.username, "--json")
    assert reset.code == 0, reset.err
    assert reset.json()["recovery_codes_remaining"] == 0
    # Set up again, the old codes stay void.
    await actors.enroll(bob)
    assert await refusal(sign_in_with_recovery_code(stub, bob, codes[0])) == INVALID_CREDENTIALS
