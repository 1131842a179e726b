"""SPEC §4: a database that answers but cannot write counts as an outage. During a failover the
server the service reaches may be a standby, or a promoted standby still held read-only by the
failover manager; the service must then answer UNAVAILABLE (DATABASE_UNAVAILABLE, with
RetryInfo), never INTERNAL and never a false OK, say NOT_SERVING, change nothing, and serve
again by itself once a writable server is there.

A read-only server is simulated on a database of the test's own with
`ALTER DATABASE ... SET default_transaction_read_only = on`, and the service's sessions are cut
(`pg_terminate_backend`), as a primary restarting as a standby would cut them. The multi-host
case (docs/high-availability.md) names a dead host first, as after a failover.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.support import (
    Actors,
    LocalService,
    Person,
    TestClock,
    error_reason,
    health_status,
    local_service,
    retry_delay_seconds,
    scratch_database,
    wait_until,
)
from tests.test_faults import OwnPostgres
from twofactor_service.policy import SERVICE
from twofactor_service.store import database

HEALTH_WITHIN_SECONDS = 15.0
SEALED_WITHIN_SECONDS = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def multi_host_url(url: str, dead_socket_dir: Path) -> str:
    """`url` with a host that accepts no connection named first, and
    target_session_attrs=read-write: the form an operator gives for a failover pair."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if "host" in query:  # a unix-socket directory (the embedded PostgreSQL)
        query["host"] = [f"{dead_socket_dir},{query['host'][0]}"]
        netloc = parts.netloc
    else:
        userinfo, _, hosts = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        netloc += f"127.0.0.1:{_free_port()},{hosts}"
    query["target_session_attrs"] = ["read-write"]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, doseq=True)))


async def _set_read_only(admin_url: str, name: str, read_only: bool) -> None:
    """Makes the database read-only for new sessions (or writable again). Going read-only also
    cuts the sessions open on it, as a primary restarting as a standby does; going back leaves
    them, so the service must notice the read-only ones it holds by itself."""
    conn = await asyncpg.connect(admin_url)
    try:
        if read_only:
            await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        else:
            await conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    finally:
        await conn.close()


@dataclass
class Scene:
    service: LocalService
    admin_url: str
    database_name: str
    # The scratch database's own URL, for reading what is stored while the service cannot.
    direct_url: str
    admin: Person
    verifier: Person
    user: Person
    reset_target: Person


@pytest.fixture(params=["single host", "multi-host, read-write"])
async def scene(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Scene]:
    """A server of the test's own on a database of its own, reached through a plain URL or a
    multi-host one whose first host is dead."""
    clock = TestClock()
    async with scratch_database(database_url) as url:
        with tempfile.TemporaryDirectory(prefix="twofactor-dead-host-") as dead:
            service_url = url if request.param == "single host" else multi_host_url(url, Path(dead))
            async with local_service(service_url, clock) as service:
                actors = Actors(service.stub, service.runtime, clock, prefix=uuid.uuid4().hex[:8])
                yield Scene(
                    service,
                    database_url,
                    _database_name(url),
                    url,
                    admin=await actors.admin(),
                    verifier=await actors.service(),
                    user=await actors.user(),
                    reset_target=await actors.user(),
                )


async def _health_is(scene: Scene, expected: int) -> bool:
    channel = scene.service.channel
    return all([await health_status(channel, name) == expected for name in ("", SERVICE.full_name)])


async def _failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value


async def _active_key_state(scene: Scene, person: Person) -> tuple[int, int] | None:
    """(id, last_used_step) of the account's active key, read directly."""
    conn = await asyncpg.connect(scene.direct_url)
    try:
        row = await conn.fetchrow(
            "SELECT k.id, k.last_used_step FROM secret_keys k JOIN accounts a"
            " ON a.id = k.account_id WHERE a.username = $1 AND k.state = 'ACTIVE'",
            person.username,
        )
    finally:
        await conn.close()
    return None if row is None else (row["id"], row["last_used_step"])


async def test_a_read_only_database_is_an_outage_until_it_can_write_again(scene: Scene) -> None:
    stub, user = scene.service.stub, scene.user
    await wait_until(
        lambda: _health_is(scene, SERVING), within=HEALTH_WITHIN_SECONDS, what="SERVING"
    )
    before = await _active_key_state(scene, user)
    target_before = await _active_key_state(scene, scene.reset_target)
    assert before is not None
    assert target_before is not None

    await _set_read_only(scene.admin_url, scene.database_name, read_only=True)

    await wait_until(
        lambda: _health_is(scene, NOT_SERVING), within=HEALTH_WITHIN_SECONDS, what="NOT_SERVING"
    )
    code = user.next_code()
    refused = [
        await _failure(
            stub.VerifyCode(
                pb.VerifyCodeRequest(username=user.username, code=code),
                metadata=scene.verifier.metadata(),
            )
        ),
        await _failure(
            stub.ResetSecret(
                pb.ResetSecretRequest(username=scene.reset_target.username),
                metadata=scene.admin.metadata(),
            )
        ),
        await _failure(
            stub.SignIn(pb.SignInRequest(username=user.username, password=user.password, code=code))
        ),
    ]
    for failure in refused:
        assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure
        assert error_reason(failure) == "DATABASE_UNAVAILABLE"
        delay = retry_delay_seconds(failure)
        assert delay is not None
        assert delay >= 1
    # Nothing changed: the code was not used up, the reset did not happen.
    assert await _active_key_state(scene, user) == before
    assert await _active_key_state(scene, scene.reset_target) == target_before

    await _set_read_only(scene.admin_url, scene.database_name, read_only=False)

    # Nobody restarts the service: it lets go of its read-only sessions and serves again.
    await wait_until(
        lambda: _health_is(scene, SERVING), within=HEALTH_WITHIN_SECONDS, what="SERVING again"
    )
    # The code refused while read-only was not used up: it is accepted now.
    verified = await stub.VerifyCode(
        pb.VerifyCodeRequest(username=user.username, code=code),
        metadata=scene.verifier.metadata(),
    )
    assert verified.result == enums_pb2.VERIFY_CODE_RESULT_OK
    reset = await stub.ResetSecret(
        pb.ResetSecretRequest(username=scene.reset_target.username),
        metadata=scene.admin.metadata(),
    )
    assert reset.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_health_watch_streams_not_serving_and_serving_again(scene: Scene) -> None:
    """Watch is what client-side health checking (gRFC A17) and load balancers stream."""
    # The generated health stub has no type hints for its methods.
    health: Any = health_pb2_grpc.HealthStub(scene.service.channel)
    updates = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE.full_name))

    async def until(expected: int) -> None:
        async with asyncio.timeout(HEALTH_WITHIN_SECONDS):
            async for update in updates:
                if update.status == expected:
                    return

    try:
        await until(SERVING)
        await _set_read_only(scene.admin_url, scene.database_name, read_only=True)
        await until(NOT_SERVING)
        await _set_read_only(scene.admin_url, scene.database_name, read_only=False)
        await until(SERVING)
    finally:
        updates.cancel()


async def test_background_sealing_resumes_after_the_database_was_read_only(scene: Scene) -> None:
    await _set_read_only(scene.admin_url, scene.database_name, read_only=True)
    await wait_until(
        lambda: _health_is(scene, NOT_SERVING), within=HEALTH_WITHIN_SECONDS, what="NOT_SERVING"
    )
    await _set_read_only(scene.admin_url, scene.database_name, read_only=False)
    await wait_until(
        lambda: _health_is(scene, SERVING), within=HEALTH_WITHIN_SECONDS, what="SERVING again"
    )
    request_id = uuid.uuid4().hex
    await scene.service.stub.VerifyCode(
        pb.VerifyCodeRequest(username=scene.user.username, code=scene.user.next_code()),
        metadata=(*scene.verifier.metadata(), ("x-request-id", request_id)),
    )

    async def sealed() -> bool:
        async with scene.service.runtime.pool.acquire() as conn:
            position = await conn.fetchval(
                "SELECT chain_position FROM audit_events WHERE request_id = $1", request_id
            )
        return position is not None

    # The sealer's lock is taken per turn, in the turn's transaction: nothing to re-acquire.
    await wait_until(sealed, within=SEALED_WITHIN_SECONDS, what="the new event sealed")


async def test_a_write_refused_by_a_read_only_server_counts_as_unavailable(
    database_url: str,
) -> None:
    async with scratch_database(database_url) as url:
        name = _database_name(url)
        await _set_read_only(database_url, name, read_only=True)
        conn = await asyncpg.connect(url)
        try:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as refused:
                await conn.execute("CREATE TABLE written (id integer)")
        finally:
            await conn.close()

    assert database.is_unavailable(refused.value)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), True),  # 25006
        (asyncpg.AdminShutdownError("terminating connection"), True),  # 57P01
        (asyncpg.CrashShutdownError("crash of another server process"), True),  # 57P02
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),  # 57P03
        (asyncpg.TooManyConnectionsError("too many clients"), True),  # 53300
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), True),  # 08003
        (asyncpg.exceptions.TargetServerAttributeNotMatched("no host is writable"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.UniqueViolationError("duplicate key"), False),  # bad input, not an outage
        (asyncpg.SerializationError("could not serialize"), False),  # a conflict: ABORTED
        (
            asyncpg.QueryCanceledError("statement timeout"),
            True,
        ),  # 57014: the server cancelled it; retry shortly
        (ValueError("a bug"), False),
    ],
)
def test_which_failures_mean_the_database_is_unavailable(
    error: BaseException, unavailable: bool
) -> None:
    assert database.is_unavailable(error) is unavailable


async def test_a_multi_host_url_steps_over_a_host_that_refuses_after_connecting(
    database_url: str,
) -> None:
    """A node its keeper is restarting can accept the TCP connection and then refuse the
    session (a FATAL after authentication); the next host must still be tried, as libpq does.
    Here the first host is a real PostgreSQL of its own whose database accepts no connections."""
    scratch = Path(tempfile.mkdtemp(prefix="twofactor-refusing-host-"))
    refusing = OwnPostgres(scratch / "pgdata")
    try:
        async with scratch_database(database_url) as url:
            name = _database_name(url)
            admin = await asyncpg.connect(refusing.url)
            try:
                await admin.execute(f'CREATE DATABASE "{name}" ALLOW_CONNECTIONS false')
            finally:
                await admin.close()
            # The refusing server first, then the suite's, as host and port lists.
            hosts = [(refusing.socket_dir, 5432), *database.host_list(url)]
            parts = urlsplit(url)
            query = parse_qs(parts.query)
            query["host"] = [",".join(h for h, _ in hosts)]
            query["port"] = [",".join(str(p) for _, p in hosts)]
            query["target_session_attrs"] = ["read-write"]
            userinfo = parts.netloc.rpartition("@")[0]
            both = urlunsplit(
                parts._replace(
                    netloc=f"{userinfo}@" if userinfo else "", query=urlencode(query, doseq=True)
                )
            )

            # asyncpg alone stops at the first host (why the pool connects through its own).
            with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
                await asyncpg.connect(both)
            pool = await database.create_pool(both, 2)
            try:
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT current_database()") == name
                assert await database.writability(pool) is database.Writability.WRITABLE
            finally:
                await pool.close()
    finally:
        refusing.close()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://u@db1:5433,db2/twofactor", [("db1", 5433), ("db2", 5432)]),
        ("postgresql://u:p@[::1]:6000,10.0.0.2:6001/x", [("::1", 6000), ("10.0.0.2", 6001)]),
        ("postgresql://u@/x?host=/run/a,/run/b&port=5433", [("/run/a", 5433), ("/run/b", 5433)]),
        ("postgresql://u@/x?host=%2Frun%2Fa&port=5434", [("/run/a", 5434)]),
        ("postgresql:///x", []),
    ],
)
def test_the_hosts_of_a_database_url_in_order(url: str, hosts: list[tuple[str, int]]) -> None:
    assert database.host_list(url) == hosts
