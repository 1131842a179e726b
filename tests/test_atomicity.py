"""SPEC §4: reset and delete are atomic, and two administrators acting on one account at the same
moment end in one consistent state.

Failures are injected between the statements of an operation by PostgreSQL triggers that the
test creates for one target account only (and drops afterwards): one raises a serialization
failure, one terminates its own backend, as a lost connection or a crash would.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, audit_events, error_reason
from twofactor_service.store.database import Connection

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

ROUNDS = 24
# Every call of the concurrent rounds carries a deadline: a hang fails the test, not the run.
CALL_DEADLINE_SECONDS = 10.0

# What each kind of injected failure does inside the trigger, and the status it must give.
FAILURES = {
    "serialization-failure": (
        "RAISE EXCEPTION 'injected failure' USING ERRCODE = 'serialization_failure';",
        grpc.StatusCode.ABORTED,
    ),
    "lost-connection": (
        "PERFORM pg_terminate_backend(pg_backend_pid());",
        grpc.StatusCode.UNAVAILABLE,
    ),
}
# Where the failure strikes: in the middle (ending the target's sessions, after its keys
# are deleted and its list membership changed) or at the very end (the audit event).
PLACES = ("sessions", "audit_events")


Inject = Callable[[str, str, Person, str], Awaitable[None]]


@pytest.fixture
async def inject_failure(db: Connection) -> AsyncIterator[Inject]:
    """Creates triggers that fail one operation on one account; drops them afterwards."""
    created: list[tuple[str, str]] = []

    async def inject(failure: str, place: str, target: Person, operation: str) -> None:
        name = f"inject_failure_{uuid.uuid4().hex[:12]}"
        account_id = await db.fetchval(
            "SELECT id FROM accounts WHERE username_key = $1", target.username.casefold()
        )
        assert isinstance(account_id, int)
        body, _ = FAILURES[failure]
        await db.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body} RETURN NULL; END $$"
        )
        created.append((name, place))
        if place == "sessions":
            when = f"OLD.account_id = {account_id}"
            event = "DELETE"
        else:
            # Only the operation's own success event: the failure it reports must get through.
            when = (
                f"NEW.target = '{target.username}' AND NEW.operation = '{operation}'"
                " AND NEW.outcome = 'SUCCESS'"
            )
            event = "INSERT"
        await db.execute(
            f"CREATE TRIGGER {name} BEFORE {event} ON {place} FOR EACH ROW WHEN ({when})"
            f" EXECUTE FUNCTION {name}()"
        )

    yield inject
    for name, place in created:
        await db.execute(f"DROP TRIGGER IF EXISTS {name} ON {place}")
        await db.execute(f"DROP FUNCTION IF EXISTS {name}()")


async def status_of(stub: Stub, reader: Person, username: str) -> pb.AccountStatus:
    response = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=username), metadata=reader.metadata()
    )
    return response.status


async def change(stub: Stub, admin: Person, operation: str, username: str) -> object:
    if operation == "ResetSecret":
        return await stub.ResetSecret(
            pb.ResetSecretRequest(username=username), metadata=admin.metadata()
        )
    if operation == "DeleteSecret":
        return await stub.DeleteSecret(
            pb.DeleteSecretRequest(username=username), metadata=admin.metadata()
        )
    assert operation == "AddToAllowlist"
    return await stub.AddToAllowlist(
        pb.AddToAllowlistRequest(username=username), metadata=admin.metadata()
    )


@pytest.mark.parametrize("operation", ["ResetSecret", "DeleteSecret"])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_a_failure_between_the_statements_leaves_the_old_state_whole(
    actors: Actors,
    stub: Stub,
    inject_failure: Inject,
    operation: str,
    place: str,
    failure: str,
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    before = await status_of(stub, admin, bob.username)
    await inject_failure(failure, place, bob, operation)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await change(stub, admin, operation, bob.username)

    assert refused.value.code() == FAILURES[failure][1]
    after = await status_of(stub, admin, bob.username)
    assert after == before
    assert after.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not after.allowlisted
    # Bob's session survived, and his key still signs him in.
    assert (await status_of(stub, bob, bob.username)).username == bob.username
    await actors.sign_in(bob)
    successes = [
        e
        for e in await audit_events(stub, admin, target_username=bob.username, operation=operation)
        if e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS
    ]
    assert successes == []


async def test_the_operation_succeeds_once_the_failure_is_gone(
    actors: Actors, stub: Stub, db: Connection, inject_failure: Inject
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    await inject_failure("serialization-failure", "sessions", bob, "ResetSecret")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await change(stub, admin, "ResetSecret", bob.username)
    assert error_reason(refused.value) == "CONCURRENT_MODIFICATION"
    await db.execute(
        "DO $$ DECLARE t record; BEGIN"
        " FOR t IN SELECT tgname FROM pg_trigger WHERE tgname LIKE 'inject_failure_%' LOOP"
        "  EXECUTE format('DROP TRIGGER %I ON sessions', t.tgname); END LOOP; END $$"
    )

    response = await stub.ResetSecret(
        pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


# --- Two administrators (and the account's owner) at the same moment.


@dataclass
class Model:
    """What the account must look like after the successful operations, in their order."""

    has_key: bool
    allowlisted: bool

    def apply(self, operation: str) -> None:
        if operation == "ResetSecret":
            self.has_key, self.allowlisted = False, True
        elif operation == "DeleteSecret":
            self.has_key, self.allowlisted = False, False
        elif operation == "AddToAllowlist":
            assert not self.has_key, "an account with a key was allowlisted"
            self.allowlisted = True
        elif operation == "CompleteEnrollment":
            assert self.allowlisted, "an enrollment completed off the allowlist"
            assert not self.has_key, "an enrollment completed beside an active key"
            self.has_key, self.allowlisted = True, False


# Refusals a racing call may meet, besides OK: each is the answer of some serial order. Not
# ABORTED: every change to an account takes the account's row lock first, so racing changes
# queue up instead of deadlocking (which would abort one and stall the rest).
ACCEPTABLE_REFUSALS = {
    ("AddToAllowlist", "ACCOUNT_HAS_KEY"),
    ("CompleteEnrollment", "ENROLLMENT_TICKET_INVALID"),
    ("CompleteEnrollment", "CODE_INVALID"),
}


async def bring_to(
    actors: Actors, stub: Stub, admin: Person, bob: Person, *, enrolled: bool
) -> pb.SignInResponse | None:
    """Puts bob, through the API, into ENROLLED (signed in) or ALLOWLISTED with an enrollment
    started (whose sign-in response is returned)."""
    status = await status_of(stub, admin, bob.username)
    if status.HasField("key_create_time") and not enrolled:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
        )
    elif not status.HasField("key_create_time") and not status.allowlisted:
        await stub.AddToAllowlist(
            pb.AddToAllowlistRequest(username=bob.username), metadata=admin.metadata()
        )
    if enrolled:
        if status.HasField("key_create_time"):
            await actors.sign_in(bob)
        else:
            await actors.enroll(bob)
        return None
    started = await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password))
    # The key bob's app now holds: his active key if the enrollment wins its race.
    bob.secret = started.enrollment.pending_key.secret_base32
    return started


async def test_concurrent_administrators_end_in_one_consistent_state(
    actors: Actors, stub: Stub
) -> None:
    first_admin = await actors.admin()
    second_admin = await actors.admin()
    bob = await actors.create("bob")
    rng = random.Random(20240611)  # fixed: a failing round can be replayed
    outcomes: set[tuple[str, str]] = set()

    for round_number in range(ROUNDS):
        enrolled = round_number % 2 == 0
        enrollment = await bring_to(actors, stub, first_admin, bob, enrolled=enrolled)
        start = await status_of(stub, first_admin, bob.username)
        session_before = bob.metadata() if enrolled else None
        newest = await audit_events(stub, first_admin, target_username=bob.username)
        after_sequence = newest[0].sequence

        admins = [first_admin, second_admin]
        rng.shuffle(admins)
        calls: list[tuple[str, Awaitable[object]]] = [
            ("ResetSecret", change(stub, admins[0], "ResetSecret", bob.username)),
            ("DeleteSecret", change(stub, admins[1], "DeleteSecret", bob.username)),
            ("AddToAllowlist", change(stub, rng.choice(admins), "AddToAllowlist", bob.username)),
        ]
        if enrollment is not None:
            code = bob.next_code()
            calls.append(
                (
                    "CompleteEnrollment",
                    stub.CompleteEnrollment(
                        pb.CompleteEnrollmentRequest(
                            enrollment_ticket=enrollment.enrollment.enrollment_ticket, code=code
                        )
                    ),
                )
            )
        rng.shuffle(calls)
        results = await asyncio.wait_for(
            asyncio.gather(*(call for _, call in calls), return_exceptions=True),
            CALL_DEADLINE_SECONDS,
        )

        for (operation, _), result in zip(calls, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                outcome = (operation, error_reason(result))
                assert outcome in ACCEPTABLE_REFUSALS, (
                    round_number,
                    outcome,
                    result.details(),
                )
                outcomes.add(outcome)
            else:
                assert not isinstance(result, BaseException), (round_number, operation, result)
                outcomes.add((operation, "OK"))

        # The audit events of the successes were written under the account's row lock, so
        # their order is the order the changes took effect in.
        events = await audit_events(stub, first_admin, target_username=bob.username)
        applied = [
            e.operation
            for e in reversed(events)
            if e.sequence > after_sequence
            and e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS
            and e.operation in {op for op, _ in calls}
        ]
        model = Model(has_key=start.HasField("key_create_time"), allowlisted=start.allowlisted)
        for operation in applied:
            model.apply(operation)
        final = await status_of(stub, first_admin, bob.username)
        assert (final.HasField("key_create_time"), final.allowlisted) == (
            model.has_key,
            model.allowlisted,
        ), (round_number, applied)
        assert not final.has_pending_key or model.allowlisted
        if "ResetSecret" in applied:
            # Never a key surviving a reset, unless set up again after it.
            last_reset = len(applied) - 1 - applied[::-1].index("ResetSecret")
            assert final.HasField("key_create_time") == (
                "CompleteEnrollment" in applied[last_reset:]
            )
        if session_before is not None and {"ResetSecret", "DeleteSecret"} & set(applied):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=session_before)
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The rounds met more than one serial order (or the test proves little).
    assert ("AddToAllowlist", "OK") in outcomes
    assert ("ResetSecret", "OK") in outcomes
    assert ("DeleteSecret", "OK") in outcomes
