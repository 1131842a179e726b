"""SPEC §4, "unknown usernames are indistinguishable from known ones by status, reason, message
and timing class, including once throttling starts".

At SignIn, a name that is no account (or no INTERNAL one) pays for its attempts on a counter
of its own that locks after the same failures as an account does, runs the same argon2 check
against a dummy hash, and takes the same round trips. These tests compare what a guesser sees:
the answers, and the time they take, sampled alternately and compared with a rank test.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, error_reason, retry_delay_seconds
from tests.test_lockout import wrong_code
from twofactor_service.recovery_codes import new_code
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts
from twofactor_service.store.database import Connection

FREE_FAILURES = 5
SAMPLES = 60
# Below this two-sided p-value the rank test would call the two timing samples different.
# Equal distributions fall below it one run in a thousand.
SIGNIFICANCE = 0.001


def rank_test_p_value(a: list[float], b: list[float]) -> float:
    """Two-sided Mann-Whitney U test (normal approximation, ties averaged and corrected): how
    likely samples this far apart are if both come from one distribution."""
    pooled = sorted([(value, 0) for value in a] + [(value, 1) for value in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    start = 0
    while start < len(pooled):
        end = start
        while end + 1 < len(pooled) and pooled[end + 1][0] == pooled[start][0]:
            end += 1
        for i in range(start, end + 1):
            ranks[i] = (start + end) / 2 + 1
        size = end - start + 1
        ties += size**3 - size
        start = end + 1
    n1, n2 = len(a), len(b)
    n = n1 + n2
    rank_sum = sum(rank for rank, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u = rank_sum - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (abs(u - mean) - 0.5) / sigma
    return math.erfc(max(z, 0.0) / math.sqrt(2))


def test_the_rank_test_tells_apart_what_differs_and_not_what_does_not() -> None:
    same_a = [float(i % 17) for i in range(60)]
    same_b = [float((i * 7) % 17) for i in range(60)]
    assert rank_test_p_value(same_a, same_b) > 0.5
    shifted = [value + 3 for value in same_b]
    assert rank_test_p_value(same_a, shifted) < SIGNIFICANCE


def unknown_name() -> str:
    return f"nobody-{uuid.uuid4().hex[:12]}"


Answer = tuple[grpc.StatusCode, str, str, int | None]


async def refused(
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    username: str,
    password: str,
    code: str = "",
    recovery_code: str = "",
) -> tuple[Answer, float]:
    """What a SignIn that must fail answers (status, reason, message with its numbers blanked,
    retry delay) and how long it took."""
    started = time.perf_counter()
    request = pb.SignInRequest(
        username=username, password=password, code=code, recovery_code=recovery_code
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(request)
    took = time.perf_counter() - started
    error = failure.value
    message = re.sub(r"\d+", "N", error.details() or "")
    return (error.code(), error_reason(error), message, retry_delay_seconds(error)), took


async def forget_failures(db: Connection, runtime: Runtime, person: Person) -> None:
    """The name's count back to zero between samples (its account's, or for a domain account
    the unknown-name counter SignIn pays on), so every sample is a first failure, as every
    sample of a new unknown name is."""
    key = accounts.username_key(person.username)
    await db.execute("UPDATE accounts SET failed_attempts = 0 WHERE username_key = $1", key)
    await db.execute(
        "DELETE FROM unknown_name_attempts WHERE bucket = unknown_name_bucket($1, $2)",
        key,
        runtime.config.lockout.unknown_name_buckets,
    )


async def sample_alternately(
    known: Callable[[], Awaitable[tuple[Answer, float]]],
    unknown: Callable[[], Awaitable[tuple[Answer, float]]],
    between: Callable[[], Awaitable[None]] | None = None,
) -> tuple[set[Answer], list[float], list[float]]:
    """SAMPLES of each, in pairs sent together (so the machine's load hits both alike), each
    kind first in every other pair (the first sent is served first)."""
    answers: set[Answer] = set()
    known_times: list[float] = []
    unknown_times: list[float] = []
    for sample in range(SAMPLES):
        if sample % 2:
            (unknown_answer, unknown_took), (known_answer, known_took) = await asyncio.gather(
                unknown(), known()
            )
        else:
            (known_answer, known_took), (unknown_answer, unknown_took) = await asyncio.gather(
                known(), unknown()
            )
        answers |= {known_answer, unknown_answer}
        known_times.append(known_took)
        unknown_times.append(unknown_took)
        if between is not None:
            await between()
    return answers, known_times, unknown_times


@pytest.mark.parametrize(
    "case",
    [
        "wrong password",
        "right password, wrong code",
        "domain",
        "wrong password, right recovery code",
        "right password, wrong recovery code",
    ],
)
async def test_a_known_name_answers_and_takes_as_long_as_an_unknown_one(
    actors: Actors,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    db: Connection,
    runtime: Runtime,
    case: str,
) -> None:
    recovery_code = ""
    if case == "domain":
        person = await actors.create("carol", kind=AccountKind.DOMAIN)
        code = "123456"
    elif "recovery code" in case:
        # An account with a full set of recovery codes: a wrong one is compared with all ten.
        person = await actors.user()
        codes = await stub.GenerateRecoveryCodes(
            pb.GenerateRecoveryCodesRequest(code=person.next_code()), metadata=person.metadata()
        )
        code = ""
        right = case.startswith("wrong password")
        recovery_code = codes.recovery_codes[0] if right else new_code()
    else:
        person = await actors.user()
        code = wrong_code(person)
    password = person.password if case.startswith("right password") else "not the password"

    async def known() -> tuple[Answer, float]:
        return await refused(stub, person.username, password, code, recovery_code)

    async def unknown() -> tuple[Answer, float]:
        return await refused(stub, unknown_name(), password, code, recovery_code)

    async def between() -> None:
        await forget_failures(db, runtime, person)

    answers, known_times, unknown_times = await sample_alternately(known, unknown, between)

    assert answers == {
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
            "the username, password or code is wrong",
            None,
        )
    }
    assert rank_test_p_value(known_times, unknown_times) > SIGNIFICANCE, (
        sorted(known_times),
        sorted(unknown_times),
    )


async def test_a_locked_account_answers_and_takes_as_long_as_an_equally_hammered_unknown_name(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    person = await actors.user()
    nobody = unknown_name()
    for _ in range(FREE_FAILURES):
        for name in (person.username, nobody):
            answer, _ = await refused(stub, name, "not the password")
            assert answer[1] == "INVALID_CREDENTIALS"

    async def known() -> tuple[Answer, float]:
        return await refused(stub, person.username, person.password)

    async def unknown() -> tuple[Answer, float]:
        return await refused(stub, nobody, person.password)

    answers, known_times, unknown_times = await sample_alternately(known, unknown)

    # Both locked, with the same words and the same wait (a second may pass between them).
    assert {(code, reason, message) for code, reason, message, _ in answers} == {
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_FAILED_ATTEMPTS",
            "too many failed attempts: this account is locked for N more seconds",
        )
    }
    delays = {delay for *_, delay in answers}
    assert None not in delays
    assert all(25 <= delay <= 30 for delay in delays if delay is not None), delays
    assert rank_test_p_value(known_times, unknown_times) > SIGNIFICANCE, (
        sorted(known_times),
        sorted(unknown_times),
    )
