"""SPEC §4, "the attempt budget holds under concurrency": between two successes at most
LOCKOUT_FREE_FAILURES evaluations of a secret may fail before the lockout starts, however many
calls arrive at once over however many replicas; while locked nothing is evaluated and no
success is granted.

Each test fires bursts of concurrent calls, split over two `twofactor serve` processes on one
database, at one credential-checking RPC: wrong secrets, with the right one placed at a
different position in each round (or absent). What the callers were told and what the audit
log recorded must both show the budget held: at most 5 evaluated failures between successes,
and a right secret never accepted after 5 failures of its window. Every round uses a fresh
account and is repeated, since a race that shows once in four runs is still a race.

The replicas run on the real clock, so codes come from real time (pyotp).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyotp
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.replicas import Replica
from tests.support import (
    PERIOD,
    VERIFY_RIGHT,
    VOUCH_RIGHT,
    Actors,
    Person,
    audit_events,
    error_reason,
)
from twofactor_service.recovery_codes import new_code
from twofactor_service.rules import ADMIN_RIGHT, AccountKind

FREE_FAILURES = 5  # the default policy (config.LockoutPolicy)
BURST = 48
# Where the right secret goes in each round's burst (None: a round of wrong ones only).
POSITIONS = (None, 0, BURST // 3, BURST // 2, BURST - 1)

# Audit reasons of a secret that was evaluated and found wrong.
EVALUATED_FAILURES = {
    "INVALID_CREDENTIALS",
    "CODE_INVALID",
    "STEP_UP_FAILED",
    # The audit log's word for a wrong recovery code (its caller is told INVALID_CREDENTIALS).
    "RECOVERY_CODE_INVALID",
}
# Refusals that evaluated nothing: the lockout, and an enrollment ticket or a pending key that
# another call of the burst used up.
UNEVALUATED = {"TOO_MANY_FAILED_ATTEMPTS", "ENROLLMENT_TICKET_INVALID", "NO_PENDING_KEY"}
# Shed before anything was paid for, when too many password checks wait: not audited.
SHED = "PASSWORD_CHECKS_BUSY"

Replicas = tuple[Replica, Replica]


def code_at(secret: str, seconds_ahead: float = 0.0) -> str:
    return pyotp.TOTP(secret).at(time.time() + seconds_ahead)


def wrong_codes(secret: str, count: int) -> list[str]:
    """Well-formed codes that match no step near now (drift window and a step change included)."""
    near = {code_at(secret, k * PERIOD) for k in range(-2, 4)}
    candidates = (f"{n:06d}" for n in range(1000, 1_000_000, 7919))
    return [c for c in candidates if c not in near][:count]


def burst_of(wrong: list[Any], right: Any, position: int | None) -> list[tuple[bool, Any]]:
    """(is_right, item) for each call of the burst."""
    calls = [(False, item) for item in wrong]
    if position is not None:
        calls.insert(position, (True, right))
    return calls


Metadata = tuple[tuple[str, str], ...]


def code_burst(secret: str | None, position: int | None, *, ahead: float = 0.0) -> Burst:
    """Wrong codes, and the code of the step `ahead` seconds from now at `position`: the next
    step (PERIOD ahead) for a key whose enrollment used the current one."""
    assert secret is not None
    return Burst(burst_of(wrong_codes(secret, BURST), code_at(secret, ahead), position))


# (replica, the burst's item, metadata with the call's own x-request-id) -> the answer
Call = Callable[[Replica, Any, Metadata], Awaitable[Any]]


def signing_in(request_for: Callable[[str], pb.SignInRequest]) -> Call:
    """A burst's call: SignIn with the request `request_for` makes of the burst's item."""

    async def sign_in(replica: Replica, item: str, metadata: Metadata) -> pb.SignInResponse:
        response: pb.SignInResponse = await replica.stub.SignIn(
            request_for(item), metadata=metadata, timeout=60
        )
        return response

    return sign_in


@dataclass
class Answers:
    """What the callers of one burst were told."""

    accepted: int
    evaluated_failures: int
    unevaluated: int
    shed: int

    @classmethod
    def of(cls, results: list[Any], is_failure: Callable[[Any], str | None]) -> Answers:
        reasons = Counter(is_failure(r) for r in results)
        unexpected = set(reasons) - EVALUATED_FAILURES - UNEVALUATED - {SHED, None}
        assert not unexpected, (unexpected, results)
        return cls(
            accepted=reasons[None],
            evaluated_failures=sum(reasons[r] for r in EVALUATED_FAILURES),
            unevaluated=sum(reasons[r] for r in UNEVALUATED),
            shed=reasons[SHED],
        )

    @property
    def audited(self) -> int:
        return self.accepted + self.evaluated_failures + self.unevaluated


def refusal_reason(result: Any) -> str | None:
    """The ErrorInfo reason of a refused call, None for an answer."""
    if isinstance(result, grpc.aio.AioRpcError):
        return error_reason(result) or result.code().name
    if isinstance(result, BaseException):
        raise result
    return None


@dataclass
class Burst:
    """One round: its calls, and the request ids that find its audit events."""

    calls: list[tuple[bool, Any]]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    async def fire(self, replicas: Replicas, call: Call) -> list[Any]:
        """Every call at once, alternately to each replica; errors are returned, not raised."""
        return list(
            await asyncio.gather(
                *(
                    call(replicas[n % 2], item, (("x-request-id", f"{self.tag}-{n}"),))
                    for n, (_, item) in enumerate(self.calls)
                ),
                return_exceptions=True,
            )
        )

    async def events(
        self, actors: Actors, admin: Person, operation: str, **where: str
    ) -> list[pb.AuditEvent]:
        """The audit events of this burst's calls, oldest first."""
        events = await audit_events(actors.stub, admin, operation=operation, **where)
        return [e for e in reversed(events) if e.request_id.startswith(self.tag)]


def assert_budget_held(events: list[pb.AuditEvent]) -> int:
    """Walks the audit events (oldest first): never more than FREE_FAILURES evaluated failures
    between successes, and a success only while fewer than FREE_FAILURES of its window had
    failed. Returns the number of evaluated failures."""
    failures_in_window = 0
    total = 0
    for event in events:
        if event.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS:
            assert failures_in_window < FREE_FAILURES, events
            failures_in_window = 0
        elif event.reason in EVALUATED_FAILURES:
            failures_in_window += 1
            total += 1
            assert failures_in_window <= FREE_FAILURES, events
        else:
            assert event.reason in UNEVALUATED, event
    return total


def check_round(answers: Answers, events: list[pb.AuditEvent], position: int | None) -> None:
    evaluated = assert_budget_held(events)
    # The log and the callers agree: every evaluated failure was recorded, and every success.
    assert evaluated == answers.evaluated_failures
    successes = [e for e in events if e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS]
    assert len(successes) == answers.accepted <= 1
    if position is None:
        # Wrong secrets only: exactly the budget was evaluated; the rest met the lockout.
        assert answers.evaluated_failures == FREE_FAILURES, answers
        assert answers.unevaluated + answers.shed == BURST - FREE_FAILURES, answers
    else:
        # A success clears its window; the next window has its own budget.
        assert answers.evaluated_failures <= 2 * FREE_FAILURES - 1, answers
    assert answers.audited + answers.shed == BURST + (position is not None)
    assert len(events) == answers.audited


# --- Setting up accounts through the replicas (real time), as their owners would.


async def enroll_on(replica: Replica, person: Person) -> Person:
    """First sign-in of an allowlisted INTERNAL account, and its key set up."""
    started = await replica.stub.SignIn(
        pb.SignInRequest(username=person.username, password=person.password)
    )
    assert started.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    person.secret = started.enrollment.pending_key.secret_base32
    done = await replica.stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=code_at(person.secret)
        )
    )
    person.token = done.session.token
    return person


async def enroll_domain_on(replica: Replica, person: Person, voucher: Person) -> Person:
    started = await replica.stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=person.username), metadata=voucher.metadata()
    )
    person.secret = started.enrollment.pending_key.secret_base32
    done = await replica.stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=code_at(person.secret)
        )
    )
    person.token = done.session.token
    return person


@pytest.fixture
async def admin(actors: Actors) -> Person:
    return await actors.admin()


# --- The bursts, one RPC each.


def verify_reason(response: pb.VerifyCodeResponse) -> str | None:
    return {
        enums_pb2.VERIFY_CODE_RESULT_OK: None,
        enums_pb2.VERIFY_CODE_RESULT_FAILED: "CODE_INVALID",
        enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS: "TOO_MANY_FAILED_ATTEMPTS",
    }[response.result]


@pytest.mark.parametrize("position", POSITIONS)
async def test_verify_code_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    verifier = await actors.service(VERIFY_RIGHT)
    voucher = await actors.service(VOUCH_RIGHT)
    person = await enroll_domain_on(
        replicas[0], await actors.create("user", kind=AccountKind.DOMAIN), voucher
    )
    burst = code_burst(person.secret, position, ahead=PERIOD)

    async def verify(replica: Replica, code: str, metadata: Metadata) -> pb.VerifyCodeResponse:
        request = pb.VerifyCodeRequest(username=person.username, code=code)
        response: pb.VerifyCodeResponse = await replica.stub.VerifyCode(
            request, metadata=verifier.metadata() + metadata, timeout=30
        )
        return response

    answers = Answers.of(await burst.fire(replicas, verify), verify_reason)
    check_round(answers, await burst.events(actors, admin, "VerifyCode"), position)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("state", ["EXCLUDED", "ALLOWLISTED"])
async def test_sign_in_password_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, state: str, position: int | None
) -> None:
    """The right password among wrong ones: for an EXCLUDED account it opens a session, for an
    ALLOWLISTED one it hands out an enrollment ticket and the pending secret; either is an
    account takeover if it comes after the budget is spent."""
    person = await actors.create("user", excluded=state == "EXCLUDED")
    burst = Burst(
        burst_of([f"wrong password {n}" for n in range(BURST)], person.password, position)
    )

    sign_in = signing_in(lambda p: pb.SignInRequest(username=person.username, password=p))
    answers = Answers.of(await burst.fire(replicas, sign_in), refusal_reason)
    check_round(answers, await burst.events(actors, admin, "SignIn"), position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_sign_in_code_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    """The right password with wrong codes, and the right code among them."""
    person = await enroll_on(replicas[0], await actors.create("user"))
    burst = code_burst(person.secret, position, ahead=PERIOD)

    sign_in = signing_in(
        lambda c: pb.SignInRequest(username=person.username, password=person.password, code=c)
    )
    answers = Answers.of(await burst.fire(replicas, sign_in), refusal_reason)
    check_round(answers, await burst.events(actors, admin, "SignIn"), position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_domain_sign_in_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    voucher = await actors.service(VOUCH_RIGHT)
    person = await enroll_domain_on(
        replicas[1], await actors.create("user", kind=AccountKind.DOMAIN), voucher
    )
    burst = code_burst(person.secret, position, ahead=PERIOD)

    async def sign_in(
        replica: Replica, code: str, metadata: Metadata
    ) -> pb.SignInDomainAccountResponse:
        request = pb.SignInDomainAccountRequest(username=person.username, code=code)
        response: pb.SignInDomainAccountResponse = await replica.stub.SignInDomainAccount(
            request, metadata=voucher.metadata() + metadata, timeout=30
        )
        return response

    answers = Answers.of(await burst.fire(replicas, sign_in), refusal_reason)
    check_round(answers, await burst.events(actors, admin, "SignInDomainAccount"), position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_complete_enrollment_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    person = await actors.create("user")
    started = await replicas[0].stub.SignIn(
        pb.SignInRequest(username=person.username, password=person.password)
    )
    ticket = started.enrollment.enrollment_ticket
    secret = started.enrollment.pending_key.secret_base32
    burst = code_burst(secret, position)

    async def complete(
        replica: Replica, code: str, metadata: Metadata
    ) -> pb.CompleteEnrollmentResponse:
        request = pb.CompleteEnrollmentRequest(enrollment_ticket=ticket, code=code)
        response: pb.CompleteEnrollmentResponse = await replica.stub.CompleteEnrollment(
            request, metadata=metadata, timeout=30
        )
        return response

    answers = Answers.of(await burst.fire(replicas, complete), refusal_reason)
    check_round(answers, await burst.events(actors, admin, "CompleteEnrollment"), position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_confirm_regenerate_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    person = await enroll_on(replicas[1], await actors.create("user"))
    begun = await replicas[0].stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=person.metadata()
    )
    secret = begun.pending_key.secret_base32
    burst = code_burst(secret, position)

    async def confirm(
        replica: Replica, code: str, metadata: Metadata
    ) -> pb.ConfirmRegenerateSecretResponse:
        request = pb.ConfirmRegenerateSecretRequest(code=code)
        response: pb.ConfirmRegenerateSecretResponse = await replica.stub.ConfirmRegenerateSecret(
            request, metadata=person.metadata() + metadata, timeout=30
        )
        return response

    answers = Answers.of(await burst.fire(replicas, confirm), refusal_reason)
    # Failed confirmations are recorded against the account that asked (the request names
    # nobody), so filtering by the user finds them.
    events = await burst.events(
        actors, admin, "ConfirmRegenerateSecret", target_username=person.username
    )
    check_round(answers, events, position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_step_up_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    """An administrator's step-up proofs for a protected account: the budget is the
    administrator's own."""
    boss = await enroll_on(replicas[0], await actors.create("boss", rights=(ADMIN_RIGHT,)))
    target = await actors.user(protected=True)
    burst = code_burst(boss.secret, position, ahead=PERIOD)

    async def reset(replica: Replica, code: str, metadata: Metadata) -> pb.ResetSecretResponse:
        proof = boss.metadata(x_step_up_password=boss.password, x_step_up_code=code)
        response: pb.ResetSecretResponse = await replica.stub.ResetSecret(
            pb.ResetSecretRequest(username=target.username), metadata=proof + metadata, timeout=60
        )
        return response

    answers = Answers.of(await burst.fire(replicas, reset), refusal_reason)
    events = await burst.events(actors, admin, "ResetSecret", actor_username=boss.username)
    check_round(answers, events, position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_sign_in_recovery_code_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    """The right password with guessed recovery codes, and one of the account's codes among
    them: a guess is an attempt like a wrong TOTP code, paid for before it is looked at."""
    person = await enroll_on(replicas[0], await actors.create("user"))
    generated = await replicas[1].stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code=code_at(person.secret or "", PERIOD)),
        metadata=person.metadata(),
    )
    burst = Burst(
        burst_of([new_code() for _ in range(BURST)], generated.recovery_codes[0], position)
    )

    sign_in = signing_in(
        lambda c: pb.SignInRequest(
            username=person.username, password=person.password, recovery_code=c
        )
    )
    answers = Answers.of(await burst.fire(replicas, sign_in), refusal_reason)
    check_round(answers, await burst.events(actors, admin, "SignIn"), position)


@pytest.mark.parametrize("position", POSITIONS)
async def test_generate_recovery_codes_bursts_keep_the_budget(
    replicas: Replicas, actors: Actors, admin: Person, position: int | None
) -> None:
    """Wrong TOTP codes asking for a new set of recovery codes, and the right one among them."""
    person = await enroll_on(replicas[1], await actors.create("user"))
    burst = code_burst(person.secret, position, ahead=PERIOD)

    async def generate(
        replica: Replica, code: str, metadata: Metadata
    ) -> pb.GenerateRecoveryCodesResponse:
        request = pb.GenerateRecoveryCodesRequest(code=code)
        response: pb.GenerateRecoveryCodesResponse = await replica.stub.GenerateRecoveryCodes(
            request, metadata=person.metadata() + metadata, timeout=30
        )
        return response

    answers = Answers.of(await burst.fire(replicas, generate), refusal_reason)
    events = await burst.events(
        actors, admin, "GenerateRecoveryCodes", target_username=person.username
    )
    check_round(answers, events, position)
