"""VerifyCode timed over native gRPC in blocks that alternate between an attack and quiet: the
sign-in flood (test_password_checks.py) and the console's attackers
(test_console_isolation.py).

The attacker is another process in the lowest CPU class (SCHED_IDLE): it stands for clients on
other machines, whose CPU is not the server's (here all share two cores). It prints `attacking`
(its own word for it) once its attack is under way, stops on SIGUSR1 and prints "paused" once
none of its calls is in flight, starts again on SIGUSR2, and prints its report (JSON) when
terminated. Attacked and quiet blocks alternate, so that whatever else changes on the machine
meanwhile weighs on both medians alike.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyotp
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import VOUCH_RIGHT, Actors
from twofactor_service.rules import AccountKind
from twofactor_service.store import accounts
from twofactor_service.store.database import Connection

Probe = Callable[[], Awaitable[float]]


async def verify_code_probe(
    stub: pb_grpc.TwoFactorServiceAsyncStub, actors: Actors, db: Connection
) -> Probe:
    """A domain account enrolled through `stub`, and a probe: one VerifyCode with a wrong code,
    timed. Its failure is forgotten afterwards, so the probes never lock the account."""
    verifier = await actors.service()
    voucher = await actors.service(VOUCH_RIGHT)
    person = await actors.create("user", kind=AccountKind.DOMAIN)
    started = await stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=person.username), metadata=voucher.metadata()
    )
    secret = started.enrollment.pending_key.secret_base32
    await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=pyotp.TOTP(secret).now()
        )
    )

    async def probe() -> float:
        request = pb.VerifyCodeRequest(username=person.username, code="000000")
        began = time.perf_counter()
        response = await stub.VerifyCode(request, metadata=verifier.metadata(), timeout=30)
        took = time.perf_counter() - began
        assert response.result != enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
        await db.execute(
            "UPDATE accounts SET failed_attempts = 0 WHERE username_key = $1",
            accounts.username_key(person.username),
        )
        return took

    return probe


@dataclass
class Alternation:
    attacked: list[float]
    quiet: list[float]
    # What the attacker reported at its end.
    report: Any


async def alternate(
    module: str,
    arguments: list[str],
    attacking: bytes,
    probe: Probe,
    *,
    blocks: int,
    probes: int,
    after_attacked_probe: Callable[[], None] = lambda: None,
) -> Alternation:
    """Runs `python -m module *arguments` as the attacker and `blocks` attacked and quiet
    blocks of `probes` probes each."""
    attacker = await asyncio.create_subprocess_exec(
        "chrt", "--idle", "0", sys.executable, "-m", module, *arguments,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert attacker.stdout is not None
    stdout = attacker.stdout

    async def said(what: bytes) -> None:
        assert await asyncio.wait_for(stdout.readline(), 60) == what + b"\n"

    attacked: list[float] = []
    quiet: list[float] = []
    try:
        await said(attacking)
        for _ in range(blocks):
            for _ in range(probes):
                attacked.append(await probe())
                after_attacked_probe()
            attacker.send_signal(signal.SIGUSR1)
            await said(b"paused")
            quiet += [await probe() for _ in range(probes)]
            attacker.send_signal(signal.SIGUSR2)
            await said(attacking)
    finally:
        attacker.terminate()
        report, _ = await attacker.communicate()
    return Alternation(attacked, quiet, json.loads(report))
