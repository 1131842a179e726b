"""SPEC §4: a PostgreSQL restart during load. While the database is down calls fail fast with
UNAVAILABLE and the health check says NOT_SERVING; when it is back the service recovers by
itself, and no change acknowledged before the outage is lost.

The test starts a PostgreSQL of its own (the suite's shared one must not be stopped), a
TwoFactorService on it, and drives a load of mixed calls through a real channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests import support
from tests.support import (
    PASSWORD,
    PERIOD,
    VERIFY_RIGHT,
    Actors,
    Person,
    error_reason,
    health_status,
    make_runtime,
    retry_delay_seconds,
    wait_until,
)
from twofactor_service.policy import SERVICE
from twofactor_service.server import start_server

# Every call carries a deadline: a call that hangs ends DEADLINE_EXCEEDED and fails the test.
CALL_DEADLINE_SECONDS = 5.0
# "Fail fast": far inside the deadline, not after a connection timeout.
FAIL_FAST_SECONDS = 2.0
HEALTH_WITHIN_SECONDS = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class OwnPostgres:
    """A real PostgreSQL (pgserver's binaries) on a unix socket, which the test stops and starts
    again with pg_ctl, as an operator would.

    Every PostgreSQL command runs in a child started without `user=` (so Python can vfork):
    forking this process, which runs gRPC threads, in order to switch users is not fork-safe.
    """

    def __init__(self, pgdata: Path) -> None:
        # initdb and the first start, by pgserver in a helper process; cleanup_mode=None, as
        # this class stops the server (pgserver would only know the first postmaster).
        script = (
            "import json, sys, warnings; warnings.simplefilter('ignore'); import pgserver;"
            "server = pgserver.get_server(sys.argv[1], cleanup_mode=None);"
            "print(json.dumps({'user': server.system_user, 'uri': server.get_uri(),"
            " 'socket_dir': str(server.get_postmaster_info().socket_dir),"
            " 'bin': str(pgserver._commands.POSTGRES_BIN_PATH)}))"
        )
        done = subprocess.run(  # noqa: S603 - the test's own interpreter and script
            [sys.executable, "-c", script, str(pgdata)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        started = json.loads(done.stdout.splitlines()[-1])
        self.pgdata = pgdata.resolve()
        self.url: str = started["uri"]
        self.socket_dir: str = started["socket_dir"]
        self.pg_ctl = str(Path(started["bin"]) / "pg_ctl")
        # As root, pgserver runs PostgreSQL as its own OS user; pg_ctl must run as that user.
        user = started["user"]
        self.as_user: list[str] = ["runuser", "-u", user, "--"] if user else []

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(  # noqa: S603 - pgserver's pg_ctl, arguments from this class
            [*self.as_user, self.pg_ctl, "-D", str(self.pgdata), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        """Fast shutdown: running transactions are rolled back, sessions are cut."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Starts it again on the same socket, the way pgserver first started it."""
        self._pg_ctl(
            "-w",
            "-o", '-h ""',
            "-o", f"-k {self.socket_dir}",
            "-l", str(self.pgdata / "log"),
            "start",
        )  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    # Not under pytest's tmp_path: a concurrent pytest run resets /tmp/pytest-of-<user> to
    # mode 0700, which would lock PostgreSQL's own OS user out of its data directory.
    scratch = Path(tempfile.mkdtemp(prefix="twofactor-faults-"))
    postgres = OwnPostgres(scratch / "pgdata")
    try:
        yield postgres
    finally:
        postgres.close()
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Service:
    stub: pb_grpc.TwoFactorServiceAsyncStub
    channel: grpc.aio.Channel
    actors: Actors
    clock: support.TestClock


@pytest.fixture
async def service(own_postgres: OwnPostgres) -> AsyncIterator[Service]:
    """A TwoFactorService (in this process, on an ephemeral port) on the test's own PostgreSQL."""
    clock = support.TestClock()
    runtime = await make_runtime(own_postgres.url, clock)
    running = await start_server(runtime.config, runtime.pool, runtime.key_ring, runtime=runtime)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.TwoFactorServiceStub(channel)
            yield Service(stub, channel, Actors(stub, runtime, clock, uuid.uuid4().hex[:8]), clock)
    finally:
        await running.stop(grace=1)
        runtime.pool.terminate()


@dataclass(frozen=True)
class Outcome:
    call: str
    code: grpc.StatusCode
    seconds: float
    reason: str = ""
    retry_delay: int | None = None


@dataclass
class Acknowledged:
    """Changes the service confirmed with OK: each must survive the outage."""

    sessions: list[tuple[Person, str]] = field(default_factory=list)
    created_accounts: list[str] = field(default_factory=list)
    reset_accounts: list[str] = field(default_factory=list)
    verify_count: dict[str, int] = field(default_factory=dict)


@dataclass
class MixedLoad:
    """Rounds of concurrent calls: in each round the clock moves one TOTP step, then every
    verifier's code is checked, every signer signs in, the administrator reads statuses,
    creates an account and resets a key. With the database up, every call succeeds."""

    stub: pb_grpc.TwoFactorServiceAsyncStub
    clock: support.TestClock
    admin: Person
    verifier: Person
    code_owners: list[Person]
    signers: list[Person]
    reset_targets: list[Person]
    prefix: str
    acknowledged: Acknowledged = field(default_factory=Acknowledged)
    rounds: int = 0

    async def _timed(self, call: str, rpc: Callable[[], Awaitable[Any]]) -> Outcome:
        started = time.monotonic()
        try:
            await rpc()
        except grpc.aio.AioRpcError as failure:
            return Outcome(
                call,
                failure.code(),
                time.monotonic() - started,
                error_reason(failure),
                retry_delay_seconds(failure),
            )
        return Outcome(call, grpc.StatusCode.OK, time.monotonic() - started)

    async def _verify(self, owner: Person) -> None:
        code = owner.code_now()
        response = await self.stub.VerifyCode(
            pb.VerifyCodeRequest(username=owner.username, code=code),
            metadata=self.verifier.metadata(),
            timeout=CALL_DEADLINE_SECONDS,
        )
        assert response.result == enums_pb2.VERIFY_CODE_RESULT_OK, (owner.username, response)
        self.acknowledged.verify_count[owner.username] = (
            self.acknowledged.verify_count.get(owner.username, 0) + 1
        )

    async def _sign_in(self, signer: Person) -> None:
        response = await self.stub.SignIn(
            pb.SignInRequest(
                username=signer.username, password=signer.password, code=signer.code_now()
            ),
            timeout=CALL_DEADLINE_SECONDS,
        )
        assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        self.acknowledged.sessions.append((signer, response.session.token))

    async def _read_status(self, person: Person) -> None:
        response = await self.stub.GetAccountStatus(
            pb.GetAccountStatusRequest(username=person.username),
            metadata=self.admin.metadata(),
            timeout=CALL_DEADLINE_SECONDS,
        )
        assert response.status.username == person.username

    async def _create_account(self, username: str) -> None:
        await self.stub.CreateAccount(
            pb.CreateAccountRequest(
                username=username, kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password=PASSWORD
            ),
            metadata=self.admin.metadata(),
            timeout=CALL_DEADLINE_SECONDS,
        )
        self.acknowledged.created_accounts.append(username)

    async def _reset(self, target: Person) -> None:
        response = await self.stub.ResetSecret(
            pb.ResetSecretRequest(username=target.username),
            metadata=self.admin.metadata(),
            timeout=CALL_DEADLINE_SECONDS,
        )
        assert response.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
        self.acknowledged.reset_accounts.append(target.username)

    async def round(self) -> list[Outcome]:
        self.rounds += 1
        # One step per round, and each account uses one code per round: no replays.
        self.clock.advance(PERIOD)
        calls: list[Awaitable[Outcome]] = []
        for owner in self.code_owners:
            calls.append(self._timed("VerifyCode", functools.partial(self._verify, owner)))
        for signer in self.signers:
            calls.append(self._timed("SignIn", functools.partial(self._sign_in, signer)))
        for person in (*self.code_owners, *self.signers):
            read = functools.partial(self._read_status, person)
            calls.append(self._timed("GetAccountStatus", read))
        name = f"created-{self.prefix}-{self.rounds}"
        calls.append(self._timed("CreateAccount", functools.partial(self._create_account, name)))
        target = self.reset_targets[self.rounds % len(self.reset_targets)]
        calls.append(self._timed("ResetSecret", functools.partial(self._reset, target)))
        return list(await asyncio.gather(*calls))


async def _mixed_load(service: Service) -> MixedLoad:
    actors = service.actors
    return MixedLoad(
        stub=service.stub,
        clock=service.clock,
        admin=await actors.admin(),
        verifier=await actors.service(VERIFY_RIGHT),
        code_owners=[await actors.user() for _ in range(3)],
        signers=[await actors.user() for _ in range(2)],
        reset_targets=[await actors.user() for _ in range(4)],
        prefix=actors.prefix,
    )


def _codes(outcomes: list[Outcome]) -> set[grpc.StatusCode]:
    return {o.code for o in outcomes}


async def test_postgres_restart_during_load(own_postgres: OwnPostgres, service: Service) -> None:
    channel = service.channel
    load = await _mixed_load(service)

    async def health_is(expected: int) -> bool:
        return all(
            [await health_status(channel, name) == expected for name in ("", SERVICE.full_name)]
        )

    # Before: the database is up and every call of the mix succeeds.
    await wait_until(lambda: health_is(SERVING), within=HEALTH_WITHIN_SECONDS, what="SERVING")
    for _ in range(2):
        before = await load.round()
        assert _codes(before) == {grpc.StatusCode.OK}, before

    # PostgreSQL stops (fast shutdown) while calls keep coming: each call either completes or
    # fails with UNAVAILABLE; none hangs, none is INTERNAL.
    stopping = asyncio.ensure_future(asyncio.to_thread(own_postgres.stop))
    during_stop: list[Outcome] = []
    for _ in range(200):  # bounded; a round takes milliseconds
        if stopping.done():
            break
        during_stop += await load.round()
    await stopping
    assert _codes(during_stop) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, [
        o for o in during_stop if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    ]

    # Down: the health check says so, and every call fails fast with UNAVAILABLE, telling the
    # client why and when to retry.
    await wait_until(
        lambda: health_is(NOT_SERVING), within=HEALTH_WITHIN_SECONDS, what="NOT_SERVING"
    )
    for _ in range(2):
        down = await load.round()
        assert _codes(down) == {grpc.StatusCode.UNAVAILABLE}, down
        assert {o.reason for o in down} == {"DATABASE_UNAVAILABLE"}
        assert all(o.retry_delay is not None and o.retry_delay >= 1 for o in down)
        slowest = max(down, key=lambda o: o.seconds)
        assert slowest.seconds < FAIL_FAST_SECONDS, slowest

    # Back: nobody restarts the service; it finds the database again by itself.
    await asyncio.to_thread(own_postgres.start)
    await wait_until(lambda: health_is(SERVING), within=HEALTH_WITHIN_SECONDS, what="SERVING again")
    for _ in range(2):
        after = await load.round()
        assert _codes(after) == {grpc.StatusCode.OK}, after

    # Nothing acknowledged was lost.
    ack = load.acknowledged
    stub = service.stub
    for person, token in ack.sessions:
        person.token = token
        mine = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=person.metadata())
        assert mine.status.username == person.username
    for username in ack.created_accounts:
        created = await stub.GetAccountStatus(
            pb.GetAccountStatusRequest(username=username), metadata=load.admin.metadata()
        )
        assert created.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    for username in set(ack.reset_accounts):
        reset = await stub.GetAccountStatus(
            pb.GetAccountStatusRequest(username=username), metadata=load.admin.metadata()
        )
        assert reset.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
        assert not reset.status.HasField("key_create_time")
    for owner in load.code_owners:
        events = await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(
                target_username=owner.username, operation="VerifyCode", page_size=1000
            ),
            metadata=load.admin.metadata(),
        )
        accepted = [e for e in events.events if e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS]
        assert len(accepted) >= ack.verify_count[owner.username]
