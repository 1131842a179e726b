"""SPEC §3/§4: all state lives in PostgreSQL, so replicas behind one load balancer behave as one
service. Two `twofactor serve` processes on the test database: a code sent to both at the same
moment is accepted once, and failures counted on either replica add up to one lockout.

The replicas run on the real clock, so codes here come from real time (pyotp), not TestClock.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import aiohttp
import grpc
import psutil
import pyotp
from grpc_health.v1 import health_pb2
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.replicas import (
    START_WITHIN_SECONDS,
    Replica,
    start_replica,
    stop_replica,
    wait_serving,
)
from tests.support import (
    PERIOD,
    VOUCH_RIGHT,
    Actors,
    Person,
    health_status,
    wait_until,
)
from twofactor_service.rules import AccountKind

ACCOUNTS = 20
ATTEMPTS_PER_ACCOUNT = 10
FREE_FAILURES = 5  # the configured lockout policy's default (config.LockoutPolicy)


def _code_at(secret: str, seconds_ahead: float = 0.0) -> str:
    return pyotp.TOTP(secret).at(time.time() + seconds_ahead)


def _wrong_code(secret: str) -> str:
    """A well-formed code valid at no step near now (drift window and a step change included)."""
    near = {_code_at(secret, k * PERIOD) for k in range(-2, 4)}
    return next(c for c in (f"{n:06d}" for n in range(1000, 1_000_000, 7919)) if c not in near)


async def _enroll_across(
    person: Person, first: Replica, second: Replica, voucher: Person
) -> Person:
    """A DOMAIN account's first sign-in (vouched for by a service account after the directory
    checked the password) on one replica, its key set up on the other: the enrollment ticket
    lives in PostgreSQL. Domain accounts keep argon2 out of the way of a test about codes."""
    started = await first.stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=person.username), metadata=voucher.metadata()
    )
    assert started.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    person.secret = started.enrollment.pending_key.secret_base32
    done = await second.stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=_code_at(person.secret)
        )
    )
    person.token = done.session.token
    return person


async def _domain_accounts(actors: Actors, count: int) -> list[Person]:
    return list(
        await asyncio.gather(
            *(actors.create("user", kind=AccountKind.DOMAIN) for _ in range(count))
        )
    )


async def _verify(
    replica: Replica, verifier: Person, username: str, code: str
) -> pb.VerifyCodeResponse:
    return await replica.stub.VerifyCode(
        pb.VerifyCodeRequest(username=username, code=code), metadata=verifier.metadata(), timeout=10
    )


async def test_the_same_code_at_both_replicas_is_accepted_once(
    replicas: tuple[Replica, Replica], actors: Actors
) -> None:
    a, b = replicas
    verifier = await actors.service()
    voucher = await actors.service(VOUCH_RIGHT)
    admin = await actors.admin()
    created = await _domain_accounts(actors, ACCOUNTS)
    people = await asyncio.gather(*(_enroll_across(p, a, b, voucher) for p in created))

    # Each account's next code (one step ahead of the step its enrollment used), sent
    # ATTEMPTS_PER_ACCOUNT times at once, alternately to each replica.
    attempts = []
    for person in people:
        assert person.secret is not None
        code = _code_at(person.secret, PERIOD)
        for n in range(ATTEMPTS_PER_ACCOUNT):
            attempts.append(
                (person.username, _verify(replicas[n % 2], verifier, person.username, code))
            )
    results = await asyncio.gather(*(call for _, call in attempts))

    for person in people:
        mine = [
            r.result
            for (name, _), r in zip(attempts, results, strict=True)
            if name == person.username
        ]
        assert mine.count(enums_pb2.VERIFY_CODE_RESULT_OK) == 1, (person.username, mine)
        assert set(mine) <= {
            enums_pb2.VERIFY_CODE_RESULT_OK,
            enums_pb2.VERIFY_CODE_RESULT_FAILED,
            enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS,
        }
        # The audit log, read through a third server, agrees: one acceptance.
        events = await actors.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(target_username=person.username, operation="VerifyCode"),
            metadata=admin.metadata(),
        )
        outcomes = [e.outcome for e in events.events]
        assert outcomes.count(enums_pb2.AUDIT_OUTCOME_SUCCESS) == 1
        assert len(outcomes) == ATTEMPTS_PER_ACCOUNT


async def test_the_same_code_signs_in_once_across_replicas(
    replicas: tuple[Replica, Replica], actors: Actors
) -> None:
    a, b = replicas
    voucher = await actors.service(VOUCH_RIGHT)
    created = await _domain_accounts(actors, 5)
    people = await asyncio.gather(*(_enroll_across(p, b, a, voucher) for p in created))

    attempts = []
    for person in people:
        assert person.secret is not None
        request = pb.SignInDomainAccountRequest(
            username=person.username, code=_code_at(person.secret, PERIOD)
        )
        for n in range(6):
            call = replicas[n % 2].stub.SignInDomainAccount(
                request, metadata=voucher.metadata(), timeout=10
            )
            attempts.append((person.username, call))
    results = await asyncio.gather(*(call for _, call in attempts), return_exceptions=True)

    for person in people:
        mine = [
            r for (name, _), r in zip(attempts, results, strict=True) if name == person.username
        ]
        opened = [r for r in mine if isinstance(r, pb.SignInDomainAccountResponse)]
        refused = [r for r in mine if isinstance(r, grpc.aio.AioRpcError)]
        assert len(opened) == 1, mine
        assert opened[0].outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        # The others lost the race for the time step (UNAUTHENTICATED), or arrived while five
        # attempts were paid for and not yet settled: the budget holds them off until the
        # success settles (RESOURCE_EXHAUSTED; tests/test_attempt_budget.py).
        assert {r.code() for r in refused} <= {
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
        assert len(opened) + len(refused) == len(mine)


async def test_failures_on_either_replica_add_up_to_one_lockout(
    replicas: tuple[Replica, Replica], actors: Actors
) -> None:
    verifier = await actors.service()
    voucher = await actors.service(VOUCH_RIGHT)
    admin = await actors.admin()
    (person,) = await _domain_accounts(actors, 1)
    await _enroll_across(person, *replicas, voucher)
    assert person.secret is not None

    for n in range(FREE_FAILURES):
        response = await _verify(
            replicas[n % 2], verifier, person.username, _wrong_code(person.secret)
        )
        assert response.result == enums_pb2.VERIFY_CODE_RESULT_FAILED, n

    # The next attempt, on the other replica and with the right code, meets the lockout.
    right = _code_at(person.secret, PERIOD)
    locked = await _verify(replicas[FREE_FAILURES % 2], verifier, person.username, right)
    assert locked.result == enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
    assert locked.retry_delay.seconds > 0
    again = await _verify(replicas[(FREE_FAILURES + 1) % 2], verifier, person.username, right)
    assert again.result == enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS

    status = await actors.stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=person.username), metadata=admin.metadata()
    )
    assert status.status.consecutive_failures == FREE_FAILURES
    assert status.status.HasField("locked_until")


async def test_workers_share_one_port_and_the_supervisor_stops_with_them(
    database_url: str, actors: Actors, tmp_path: Path
) -> None:
    """`serve --workers 2`: two processes answer on one port (SO_REUSEPORT), SIGTERM stops
    all with status 0; a worker that dies takes the supervisor down with status 1, so an
    orchestrator restarts the whole replica instead of running on at half strength."""
    person = await actors.enroll(await actors.create("workers"))
    assert person.secret is not None
    for ending in ("sigterm", "worker-dies"):
        server = start_replica(database_url, tmp_path / f"{ending}.log", "--workers", "2")
        try:
            await wait_serving(server)
            supervisor = psutil.Process(server.process.pid)
            await wait_until(
                functools.partial(_worker_count, supervisor, 2),
                within=START_WITHIN_SECONDS,
                what="2 worker processes",
            )
            # New connections land on either worker; every one of them answers, on the gRPC
            # port and on the web console's, which the workers share the same way.
            for _ in range(8):
                async with grpc.aio.insecure_channel(server.address) as channel:
                    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
                async with aiohttp.ClientSession() as http, http.get(server.console_url) as page:
                    assert page.status == 200
            if ending == "worker-dies":
                _workers(supervisor)[0].kill()
                status = await asyncio.to_thread(server.process.wait, 20)
                await server.channel.close()
                assert status == 1, server.log.read_text()
            else:
                assert await stop_replica(server) == 0, server.log.read_text()
            assert not supervisor.is_running() or supervisor.status() == psutil.STATUS_ZOMBIE
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


async def test_a_replica_stopped_while_its_workers_start_stops_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    """An orchestrator may stop a replica at any time, also while its workers are still
    importing and connecting (they have no SIGTERM handler yet): that is a stop as asked,
    status 0, not a failure."""
    server = start_replica(database_url, tmp_path / "starting.log", "--workers", "2")
    try:
        supervisor = psutil.Process(server.process.pid)
        await wait_until(
            functools.partial(_worker_count, supervisor, 2),
            within=START_WITHIN_SECONDS,
            what="2 worker processes",
        )
        assert await stop_replica(server) == 0, server.log.read_text()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def _workers(supervisor: psutil.Process) -> list[psutil.Process]:
    """The supervisor's worker processes (multiprocessing's resource tracker is not one)."""
    return [
        child
        for child in supervisor.children()
        if "resource_tracker" not in " ".join(child.cmdline())
    ]


async def _worker_count(supervisor: psutil.Process, expected: int) -> bool:
    return len(_workers(supervisor)) == expected
