"""SPEC §4 and RFC 4226 §7.3: consecutive failures lock further attempts with growing delays;
a success resets the count; never more than 100 consecutive failures without a lockout (NIST
SP 800-63B §5.2.2).

With the default policy (config.LockoutPolicy) the 5th consecutive failure locks the account
for 30 s, each further one locks it for twice as long, up to 15 minutes. Failed codes at
sign-in, in VerifyCode and in step-up, and wrong passwords, all count on the same account.
Tests end a lockout by moving `locked_until` into the past rather than waiting for it.
"""

from __future__ import annotations

import asyncio

import grpc
import pyotp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    PERIOD,
    Actors,
    Person,
    audit_events,
    error_reason,
    retry_delay_seconds,
)
from twofactor_service.config import LockoutPolicy
from twofactor_service.rules import AccountKind, lockout_delay_seconds, lockout_schedule
from twofactor_service.store import accounts
from twofactor_service.store.database import Connection

FREE_FAILURES = 5
# The lockout each failure from the 5th on causes, in seconds: 30 s, doubling, 15 min cap.
DELAYS = [30, 60, 120, 240, 480, 900, 900]
NIST_LIMIT = 100

OK = enums_pb2.VERIFY_CODE_RESULT_OK
FAILED = enums_pb2.VERIFY_CODE_RESULT_FAILED
FAILED_MAX_ATTEMPTS = enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS


def wrong_code(person: Person) -> str:
    """A code no step within the accepted window (±1) of now produces."""
    assert person.secret is not None
    totp = pyotp.TOTP(person.secret)
    now = person.clock.now()
    valid = {totp.at(now + offset * PERIOD) for offset in (-1, 0, 1)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in valid)


async def end_lockout(db: Connection, person: Person) -> None:
    """The lockout ran out (without waiting for it)."""
    await db.execute(
        "UPDATE accounts SET locked_until = now() - interval '1 second' WHERE username_key = $1",
        accounts.username_key(person.username),
    )


async def failed_attempts(db: Connection, person: Person) -> int:
    count: int = await db.fetchval(
        "SELECT failed_attempts FROM accounts WHERE username_key = $1",
        accounts.username_key(person.username),
    )
    return count


async def sign_in_error(
    stub: pb_grpc.TwoFactorServiceAsyncStub, person: Person, *, password: str, code: str = ""
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username=person.username, password=password, code=code))
    return failure.value


def assert_locked_for(error: grpc.aio.AioRpcError, seconds: int) -> None:
    """RESOURCE_EXHAUSTED with a RetryInfo of the lockout's length (a second or two of it may
    have passed already)."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert error_reason(error) == "TOO_MANY_FAILED_ATTEMPTS"
    delay = retry_delay_seconds(error)
    assert delay is not None
    assert seconds - 2 <= delay <= seconds


async def verify(
    stub: pb_grpc.TwoFactorServiceAsyncStub, verifier: Person, person: Person, code: str
) -> pb.VerifyCodeResponse:
    response: pb.VerifyCodeResponse = await stub.VerifyCode(
        pb.VerifyCodeRequest(username=person.username, code=code), metadata=verifier.metadata()
    )
    return response


# --- Sign-in


async def test_sign_in_locks_after_five_wrong_codes_with_growing_delays(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    bob = await actors.user()
    for _ in range(FREE_FAILURES):
        error = await sign_in_error(stub, bob, password=bob.password, code=wrong_code(bob))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(error) == "INVALID_CREDENTIALS"

    # Locked: even the right password and code are refused, with the time to wait.
    assert_locked_for(
        await sign_in_error(stub, bob, password=bob.password, code=bob.next_code()), 30
    )

    for delay in DELAYS[1:]:
        await end_lockout(db, bob)
        error = await sign_in_error(stub, bob, password=bob.password, code=wrong_code(bob))
        assert error_reason(error) == "INVALID_CREDENTIALS"
        assert_locked_for(
            await sign_in_error(stub, bob, password=bob.password, code=bob.next_code()), delay
        )

    await end_lockout(db, bob)
    response = await stub.SignIn(
        pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code())
    )
    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    assert await failed_attempts(db, bob) == 0


async def test_a_refused_sign_in_during_a_lockout_is_audited(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    for _ in range(FREE_FAILURES):
        await sign_in_error(stub, bob, password=bob.password, code=wrong_code(bob))

    await sign_in_error(stub, bob, password=bob.password, code=bob.next_code())

    events = await audit_events(stub, admin, target_username=bob.username, operation="SignIn")
    assert [(e.outcome, e.reason) for e in events[:2]] == [
        (enums_pb2.AUDIT_OUTCOME_FAILURE, "TOO_MANY_FAILED_ATTEMPTS"),
        (enums_pb2.AUDIT_OUTCOME_FAILURE, "INVALID_CREDENTIALS"),
    ]


async def test_wrong_passwords_count_toward_the_lockout(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    svc = await actors.create("svc", excluded=True)  # signs in with a password alone
    for person in (bob, svc):
        for _ in range(FREE_FAILURES):
            error = await sign_in_error(stub, person, password="not the password")
            assert error_reason(error) == "INVALID_CREDENTIALS"
        code = person.next_code() if person.secret else ""
        assert_locked_for(
            await sign_in_error(stub, person, password=person.password, code=code), 30
        )


async def test_unknown_accounts_get_the_same_answer_as_wrong_passwords(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    carol = await actors.create("carol", kind=AccountKind.DOMAIN)
    attempts = [
        ("nobody-" + bob.username, bob.password, "123456"),  # no such account
        (bob.username, "not the password", "123456"),  # wrong password
        (bob.username.upper(), "not the password", ""),  # wrong password, other case
        (bob.username, bob.password, wrong_code(bob)),  # wrong code
        (carol.username, "some password", "123456"),  # a domain account: not through SignIn
    ]
    answers = set()
    for username, password, code in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.SignIn(pb.SignInRequest(username=username, password=password, code=code))
        answers.add((failure.value.code(), failure.value.details(), error_reason(failure.value)))

    assert answers == {
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "the username, password or code is wrong",
            "INVALID_CREDENTIALS",
        )
    }


# --- VerifyCode


async def test_verify_code_locks_after_five_failures_with_growing_delays(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    verifier = await actors.service()
    bob = await actors.user()
    for _ in range(FREE_FAILURES):
        assert (await verify(stub, verifier, bob, wrong_code(bob))).result == FAILED

    for delay in DELAYS:
        locked = await verify(stub, verifier, bob, bob.next_code())
        assert locked.result == FAILED_MAX_ATTEMPTS
        assert delay - 2 <= locked.retry_delay.seconds <= delay
        await end_lockout(db, bob)
        assert (await verify(stub, verifier, bob, wrong_code(bob))).result == FAILED

    # The count goes on past the schedule; the cap holds.
    assert await failed_attempts(db, bob) == FREE_FAILURES + len(DELAYS)
    locked = await verify(stub, verifier, bob, bob.next_code())
    assert 898 <= locked.retry_delay.seconds <= 900


async def test_during_a_lockout_a_correct_code_is_not_even_checked(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    admin = await actors.admin()
    verifier = await actors.service()
    bob = await actors.user()
    for _ in range(FREE_FAILURES):
        await verify(stub, verifier, bob, wrong_code(bob))
    right = bob.next_code()

    refused = await verify(stub, verifier, bob, right)

    assert refused.result == FAILED_MAX_ATTEMPTS
    # Refused, not counted (the lockout does not grow), and audited.
    assert await failed_attempts(db, bob) == FREE_FAILURES
    [event, *_] = await audit_events(
        stub, admin, target_username=bob.username, operation="VerifyCode"
    )
    assert event.outcome == enums_pb2.AUDIT_OUTCOME_FAILURE
    assert event.reason == "TOO_MANY_FAILED_ATTEMPTS"
    assert event.actor == verifier.username
    # Not used up either: once the lockout is over, the same code is still good, once.
    await end_lockout(db, bob)
    assert (await verify(stub, verifier, bob, right)).result == OK
    assert (await verify(stub, verifier, bob, right)).result == FAILED


async def test_a_success_resets_the_count(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    verifier = await actors.service()
    bob = await actors.user()
    for _ in range(FREE_FAILURES - 1):
        assert (await verify(stub, verifier, bob, wrong_code(bob))).result == FAILED
    assert await failed_attempts(db, bob) == FREE_FAILURES - 1

    assert (await verify(stub, verifier, bob, bob.next_code())).result == OK

    status = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=bob.metadata())
    assert status.status.consecutive_failures == 0
    assert not status.status.HasField("locked_until")
    for _ in range(FREE_FAILURES - 1):
        assert (await verify(stub, verifier, bob, wrong_code(bob))).result == FAILED
    assert (await verify(stub, verifier, bob, bob.next_code())).result == OK


async def test_a_lockout_that_ran_out_lets_a_correct_code_in(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    verifier = await actors.service()
    bob = await actors.user()
    for _ in range(FREE_FAILURES):
        await verify(stub, verifier, bob, wrong_code(bob))
    assert (await verify(stub, verifier, bob, bob.next_code())).result == FAILED_MAX_ATTEMPTS

    await end_lockout(db, bob)

    assert (await verify(stub, verifier, bob, bob.next_code())).result == OK
    assert await failed_attempts(db, bob) == 0


async def test_parallel_guesses_are_each_counted(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    """A burst of guesses sent at once does not slip past the counter: exactly the budget is
    checked and counted, and the lockout that follows matches the count."""
    verifier = await actors.service()
    bob = await actors.user()
    guess = wrong_code(bob)

    burst = await asyncio.gather(*(verify(stub, verifier, bob, guess) for _ in range(25)))

    results = [r.result for r in burst]
    assert set(results) <= {FAILED, FAILED_MAX_ATTEMPTS}
    checked = results.count(FAILED)
    assert checked == FREE_FAILURES
    assert await failed_attempts(db, bob) == checked
    locked = await verify(stub, verifier, bob, bob.next_code())
    assert locked.result == FAILED_MAX_ATTEMPTS
    expected = DELAYS[min(checked - FREE_FAILURES, len(DELAYS) - 1)]
    assert expected - 2 <= locked.retry_delay.seconds <= expected


# --- Step-up, and every kind of failure on one counter


async def test_step_up_failures_lock_the_actor(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    admin = await actors.admin()
    target = await actors.user(protected=True)
    for _ in range(FREE_FAILURES):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.ResetSecret(
                pb.ResetSecretRequest(username=target.username),
                metadata=admin.step_up(code=wrong_code(admin)),
            )
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(failure.value) == "STEP_UP_FAILED"

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=target.username), metadata=admin.step_up()
        )

    assert_locked_for(failure.value, 30)
    # Nothing changed: the target still has its key.
    status = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=target.username), metadata=admin.metadata()
    )
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED


async def test_failures_at_sign_in_verify_and_step_up_add_up(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    verifier = await actors.service()
    admin = await actors.admin()
    target = await actors.user(protected=True)

    for _ in range(2):
        await sign_in_error(stub, admin, password=admin.password, code=wrong_code(admin))
    for _ in range(2):
        assert (await verify(stub, verifier, admin, wrong_code(admin))).result == FAILED
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=target.username),
            metadata=admin.step_up(code=wrong_code(admin)),
        )
    assert await failed_attempts(db, admin) == FREE_FAILURES

    assert (await verify(stub, verifier, admin, admin.next_code())).result == FAILED_MAX_ATTEMPTS
    assert_locked_for(
        await sign_in_error(stub, admin, password=admin.password, code=admin.next_code()), 30
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=target.username), metadata=admin.step_up()
        )
    assert_locked_for(failure.value, 30)


# --- The schedule itself, as plain functions (rules.py)

policies = st.builds(
    LockoutPolicy,
    # The ranges config.load_config accepts.
    free_failures=st.integers(1, 20),
    first_delay_seconds=st.integers(1, 3600),
    max_delay_seconds=st.integers(1, 86400),
)


def test_the_default_schedule() -> None:
    policy = LockoutPolicy()
    assert [lockout_delay_seconds(n, policy) for n in range(1, 13)] == [0] * 4 + DELAYS + [900]
    assert lockout_schedule(policy) == [0] * 4 + DELAYS[:-1]


@given(policies, st.integers(0, 10_000))
def test_never_more_than_100_consecutive_failures_without_a_lockout(
    policy: LockoutPolicy, failures: int
) -> None:
    # Every failure from the free_failures-th on locks the account, and that is at most the
    # 20th: an attacker never gets 100 failures in a row without a lockout.
    first_lockout = next(n for n in range(1, NIST_LIMIT + 1) if lockout_delay_seconds(n, policy))
    assert first_lockout == policy.free_failures <= NIST_LIMIT
    assert (lockout_delay_seconds(failures, policy) > 0) == (failures >= policy.free_failures)


@given(policies, st.integers(0, 10_000))
def test_delays_never_shrink_and_are_capped(policy: LockoutPolicy, failures: int) -> None:
    delay = lockout_delay_seconds(failures, policy)
    assert delay <= lockout_delay_seconds(failures + 1, policy)
    assert 0 <= delay <= policy.max_delay_seconds
    if failures >= policy.free_failures:
        assert delay == min(
            policy.first_delay_seconds * 2 ** (failures - policy.free_failures),
            policy.max_delay_seconds,
        )


@given(policies, st.integers(1, 10_000))
def test_the_schedule_sql_applies_matches_the_rule(policy: LockoutPolicy, failures: int) -> None:
    """The payment's SQL reads `schedule[min(n, len)]` (1-based) after n failures."""
    schedule = lockout_schedule(policy)
    assert schedule[-1] == policy.max_delay_seconds
    assert len(schedule) <= policy.free_failures + 32
    assert schedule[min(failures, len(schedule)) - 1] == lockout_delay_seconds(failures, policy)


async def test_the_sql_lockout_delay_is_the_rule(db: Connection) -> None:
    """lockout_delay() (migration 003), which every payment applies, against the rule."""
    for policy in (LockoutPolicy(), LockoutPolicy(free_failures=1, first_delay_seconds=7)):
        schedule = lockout_schedule(policy)
        for failures in (1, 2, 4, 5, 6, 9, 40, 10_000):
            delay = await db.fetchval(
                "SELECT extract(epoch FROM lockout_delay($1, $2::int[]))::int", failures, schedule
            )
            assert (delay or 0) == lockout_delay_seconds(failures, policy), (policy, failures)


def test_a_persistent_guesser_gets_about_a_hundred_guesses_a_day() -> None:
    """What the defaults allow an attacker who guesses whenever the account is not locked: the
    figure docs/security.md quotes."""
    policy, elapsed, failures = LockoutPolicy(), 0, 0
    while True:
        wait = lockout_delay_seconds(failures, policy)
        if elapsed + wait > 86400:
            break
        elapsed += wait
        failures += 1
    assert failures == 104
