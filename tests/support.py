"""Test helpers: a controllable clock, a throw-away database, and accounts in every role,
made and signed in through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pyotp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from twofactor.v1 import enums_pb2, options_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_service import administration, rules
from twofactor_service.caller import Caller
from twofactor_service.config import MIN_HASH_MEMORY_KIB, MIN_HASH_PASSES, Config
from twofactor_service.encryption import KeyRing, new_key_line, parse_keys
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.server import RunningServer, start_server
from twofactor_service.store import database
from twofactor_service.store.migrations import migrate

PASSWORD = "correct horse battery staple"
VERIFY_RIGHT = ("Two-factor authentication service", "VERIFY_CODES")
VOUCH_RIGHT = ("Two-factor authentication service", "VOUCH_DOMAIN_SIGN_IN")
PERIOD = 30


class TestClock:
    """Real time plus an offset that tests move forward to get fresh TOTP time steps (the
    server under test reads the same clock), instead of waiting 30 s for one."""

    __test__ = False  # not a test class, though its name starts with "Test"

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextlib.contextmanager
def temporary_database(server_url: str | None, scratch: Path) -> Iterator[str]:
    """A fresh database for this run: on `server_url`'s server when given, else on an embedded
    PostgreSQL started in `scratch`. Dropped afterwards."""
    if server_url is None:
        server_url = database.start_embedded(scratch)
    name = f"twofactor_test_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(server_url)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    import asyncio

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_config(**overrides: object) -> Config:
    """The suite's servers, with the cheapest password hashes the service accepts (OWASP's
    minimum) for the thousands of accounts it makes. The tests of floods run `twofactor serve`
    with the default cost: their guesses of unknown names are checked against its dummy hash."""
    base = Config(
        database_url="postgresql://unused",
        listen_address="127.0.0.1:0",
        console_address="127.0.0.1:0",
        password_hash_memory_kib=MIN_HASH_MEMORY_KIB,
        password_hash_passes=MIN_HASH_PASSES,
    )
    return Config(**{**base.__dict__, **overrides})


# One key ring per test run, so servers the suite starts as subprocesses (replicas) can be
# given the same one (TWOFACTOR_ENCRYPTION_KEYS) and read each other's secrets.
TEST_ENCRYPTION_KEYS = new_key_line("test1")


async def make_runtime(url: str, clock: TestClock, **overrides: object) -> Runtime:
    overrides.setdefault("encryption_keys", TEST_ENCRYPTION_KEYS)
    config = test_config(database_url=url, **overrides)
    pool = await database.create_pool(url, 20)
    async with pool.acquire() as conn:
        await migrate(conn)
    key_ring = KeyRing(parse_keys(str(config.encryption_keys), "test"))
    return Runtime(config=config, pool=pool, key_ring=key_ring, clock=clock.now)


def _as_call(error: grpc.aio.AioRpcError) -> grpc.Call:
    # An AioRpcError has the code, details and trailers that from_call reads; the type stubs
    # accept only a grpc.Call.
    return cast(grpc.Call, error)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call ('' when there is none)."""
    status = rpc_status.from_call(_as_call(error))
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def retry_delay_seconds(error: grpc.aio.AioRpcError) -> int | None:
    status = rpc_status.from_call(_as_call(error))
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds
    return None


@dataclass
class Person:
    """An account as its owner knows it: name, password, authenticator secret, session."""

    username: str
    password: str = PASSWORD
    secret: str | None = None
    token: str | None = None
    clock: TestClock = field(default_factory=TestClock)

    def next_code(self, secret: str | None = None) -> str:
        """A code of a time step nobody used yet: the shared clock moves one step first."""
        self.clock.advance(PERIOD)
        return self.code_now(secret)

    def code_now(self, secret: str | None = None) -> str:
        key = secret or self.secret
        assert key is not None, f"{self.username} has no key"
        return pyotp.TOTP(key).at(self.clock.now())

    def metadata(self, **extra: str) -> tuple[tuple[str, str], ...]:
        assert self.token is not None, f"{self.username} is not signed in"
        pairs = [("authorization", f"Bearer {self.token}")]
        pairs += [(k.replace("_", "-"), v) for k, v in extra.items()]
        return tuple(pairs)

    def step_up(self, code: str | None = None) -> tuple[tuple[str, str], ...]:
        """Session metadata plus account-protection proof (password and a fresh code)."""
        return self.metadata(
            x_step_up_password=self.password, x_step_up_code=code or self.next_code()
        )


class Actors:
    """Accounts in the standard roles. Accounts are created directly (as the CLI does); every
    sign-in and enrollment goes through the gRPC API."""

    def __init__(
        self,
        stub: pb_grpc.TwoFactorServiceAsyncStub,
        runtime: Runtime,
        clock: TestClock,
        prefix: str,
    ) -> None:
        self.stub = stub
        self.runtime = runtime
        self.clock = clock
        self.prefix = prefix
        self._count = 0

    def name(self, role: str) -> str:
        self._count += 1
        return f"{role}-{self.prefix}-{self._count}"

    async def create(
        self,
        role: str,
        *,
        kind: AccountKind = AccountKind.INTERNAL,
        protected: bool = False,
        excluded: bool = False,
        rights: tuple[rules.Right, ...] = (),
    ) -> Person:
        person = Person(self.name(role), clock=self.clock)
        caller = Caller(None, "cli:test", "CreateAccount", uuid.uuid4().hex, "test")
        await administration.create_account(
            self.runtime,
            caller,
            username=person.username,
            kind=kind,
            password=person.password if kind is AccountKind.INTERNAL else "",
            protected=protected,
            excluded=excluded,
        )
        for right in rights:
            await administration.change_right(
                self.runtime, caller, person.username, right, grant=True
            )
        return person

    async def enroll(self, person: Person) -> Person:
        """Signs an allowlisted account in and sets up its key, as its owner would."""
        response = await self.stub.SignIn(
            pb.SignInRequest(username=person.username, password=person.password)
        )
        assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
        person.secret = response.enrollment.pending_key.secret_base32
        done = await self.stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=response.enrollment.enrollment_ticket, code=person.next_code()
            )
        )
        person.token = done.session.token
        return person

    async def sign_in(self, person: Person) -> Person:
        request = pb.SignInRequest(username=person.username, password=person.password)
        if person.secret:
            request.code = person.next_code()
        response = await self.stub.SignIn(request)
        assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        person.token = response.session.token
        return person

    # --- The standard actors of SPEC §4.

    async def user(self, *, protected: bool = False) -> Person:
        """A plain user with an active key, signed in with it."""
        return await self.enroll(await self.create("user", protected=protected))

    async def admin(self, *, protected: bool = False) -> Person:
        """An administrator: MODIFY_OBJECT_ACLS, an active key, signed in with it."""
        return await self.enroll(
            await self.create("admin", protected=protected, rights=(rules.ADMIN_RIGHT,))
        )

    async def admin_without_2fa(self) -> Person:
        """Holds MODIFY_OBJECT_ACLS but is excluded from 2FA: signed in with a password alone."""
        return await self.sign_in(
            await self.create("admin-no2fa", excluded=True, rights=(rules.ADMIN_RIGHT,))
        )

    async def user_without_2fa(self) -> Person:
        return await self.sign_in(await self.create("user-no2fa", excluded=True))

    async def service(self, *rights: rules.Right) -> Person:
        """A service account (excluded from 2FA) holding `rights` (default: verify codes)."""
        return await self.sign_in(
            await self.create("service", excluded=True, rights=rights or (VERIFY_RIGHT,))
        )


def right_message(right: rules.Right) -> options_pb2.Right:
    return options_pb2.Right(functional_area=right[0], permission=right[1])


# --- Waiting on observable state (reliability tests): poll with a bounded deadline, never a
# fixed sleep standing in for synchronisation.

POLL_INTERVAL_SECONDS = 0.05


async def wait_until(condition: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Polls `condition` until it holds; fails the test naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int | None:
    """grpc.health.v1 Check's answer (a HealthCheckResponse status), None when unreachable."""
    # The generated health stub has no type hints for its methods.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
    except grpc.aio.AioRpcError:
        return None
    status: int = response.status
    return status


# --- Reading the audit log (administration tests): every change must be there, and nothing
# secret may be.


async def audit_events(
    stub: pb_grpc.TwoFactorServiceAsyncStub, reader: Person, **filters: Any
) -> list[pb.AuditEvent]:
    """Every event matching `filters` (ListAuditEventsRequest fields), newest first, through
    the public API, all pages. `reader` needs the administration right."""
    events: list[pb.AuditEvent] = []
    token = ""
    while True:
        page = await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1000, page_token=token, **filters),
            metadata=reader.metadata(),
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


async def audit_rows_containing(conn: database.Connection, needles: list[str]) -> list[str]:
    """The stored audit rows (as text) in which any of `needles` appears, in any column."""
    rows = await conn.fetch(
        "SELECT e::text AS row FROM audit_events e WHERE EXISTS ("
        " SELECT 1 FROM unnest($1::text[]) AS n(needle) WHERE n.needle <> ''"
        " AND strpos(concat_ws(chr(31), e.actor, e.target, e.operation, e.reason,"
        " e.request_id, e.peer), n.needle) > 0)",
        needles,
    )
    return [r["row"] for r in rows]


# --- A service of a test's own (key rotation, audit chain): tests that change what every other
# test relies on (the key ring of the stored secrets, the integrity of the audit log) get a
# fresh database and servers on it, with the key ring they ask for.


@contextlib.asynccontextmanager
async def scratch_database(url: str) -> AsyncIterator[str]:
    """A new database on the server of `url`, dropped afterwards."""
    name = f"twofactor_scratch_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class LocalService:
    """A TwoFactorService in this process on a database of the test's choosing."""

    runtime: Runtime
    server: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.TwoFactorServiceAsyncStub


@contextlib.asynccontextmanager
async def local_service(
    url: str, clock: TestClock, **overrides: object
) -> AsyncIterator[LocalService]:
    """A server on `url` (migrated), e.g. with `encryption_keys=` a ring of the test's own."""
    runtime = await make_runtime(url, clock, **overrides)
    try:
        server = await start_server(runtime.config, runtime.pool, runtime.key_ring, runtime=runtime)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                yield LocalService(runtime, server, channel, pb_grpc.TwoFactorServiceStub(channel))
        finally:
            await server.stop(grace=1)
    finally:
        await runtime.pool.close()


# --- Reading the access log (captured by the `log_lines` fixture).


def access_lines(lines: list[str], method: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in lines]
    return [
        e
        for e in entries
        if e["logger"] == "twofactor_service.access"
        and e["method"] == f"/twofactor.v1.TwoFactorService/{method}"
    ]
