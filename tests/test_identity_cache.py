"""Callers are resolved once and cached per process (transport/identities.py), with a bounded
staleness: a change is heard through PostgreSQL's LISTEN/NOTIFY at once on every replica, an
entry is never older than TWOFACTOR_IDENTITY_CACHE_SECONDS, and while the listening connection
is down nothing is served from the cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.replicas import Replica, start_replica, stop_replica, wait_serving
from tests.support import Actors, Person, right_message, scratch_database, wait_until
from twofactor_service import rules
from twofactor_service.rules import AccountKind, Actor
from twofactor_service.store import database
from twofactor_service.store.migrations import migrate
from twofactor_service.transport.identities import IdentityCache, listen

# The documented default bound; the replicas below keep entries for a minute, so a change seen
# within this bound was heard, not waited out.
DEFAULT_BOUND_SECONDS = 2


@pytest.fixture(scope="module")
async def slow_to_expire(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Replica, Replica]]:
    logs = tmp_path_factory.mktemp("identity")
    env = {"TWOFACTOR_IDENTITY_CACHE_SECONDS": "60"}
    pair = (
        start_replica(database_url, logs / "a.log", env=env),
        start_replica(database_url, logs / "b.log", env=env),
    )
    try:
        await asyncio.gather(*(wait_serving(r) for r in pair))
        yield pair
    finally:
        await asyncio.gather(*(stop_replica(r) for r in pair))


async def _status(replica: Replica, person: Person, username: str = "") -> grpc.StatusCode:
    try:
        await replica.stub.GetAccountStatus(
            pb.GetAccountStatusRequest(username=username), metadata=person.metadata(), timeout=5
        )
    except grpc.aio.AioRpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


async def test_a_session_ended_on_one_replica_is_refused_on_the_other_at_once(
    slow_to_expire: tuple[Replica, Replica], actors: Actors
) -> None:
    a, b = slow_to_expire
    bob = await actors.user()
    assert await _status(b, bob) == grpc.StatusCode.OK  # resolved, and cached, on b

    await a.stub.SignOut(pb.SignOutRequest(), metadata=bob.metadata())

    async def refused() -> bool:
        return await _status(b, bob) == grpc.StatusCode.UNAUTHENTICATED

    await wait_until(refused, within=DEFAULT_BOUND_SECONDS, what="b refuses the ended session")


async def test_a_right_revoked_on_one_replica_is_gone_on_the_other_at_once(
    slow_to_expire: tuple[Replica, Replica], actors: Actors
) -> None:
    a, b = slow_to_expire
    boss = await actors.admin()
    deputy = await actors.admin()
    other = await actors.create("other", kind=AccountKind.DOMAIN)
    assert await _status(b, deputy, other.username) == grpc.StatusCode.OK

    await a.stub.RevokeRight(
        pb.RevokeRightRequest(username=deputy.username, right=right_message(rules.ADMIN_RIGHT)),
        metadata=boss.metadata(),
    )

    async def refused() -> bool:
        return await _status(b, deputy, other.username) == grpc.StatusCode.PERMISSION_DENIED

    await wait_until(refused, within=DEFAULT_BOUND_SECONDS, what="b refuses the revoked right")


def _actor(account_id: int, username: str) -> Actor:
    return Actor(
        account_id=account_id,
        username=username,
        kind=AccountKind.INTERNAL,
        session_id=b"s",
        signed_in_with_two_factor=True,
        has_active_key=True,
        protected=False,
        rights=frozenset(),
    )


def test_a_read_begun_before_a_drop_does_not_store_what_it_saw() -> None:
    cache = IdentityCache(ttl_seconds=60)
    cache.listening = True
    epoch = cache.epoch  # a read of account 7 begins...
    cache.drop_account(7)  # ...its session ends meanwhile...
    cache.put(b"token", _actor(7, "bob"), epoch=epoch, expires_at=None)  # ...the read ends

    assert cache.get(b"token") is None


def test_entries_expire_after_the_bound_and_drop_by_name_in_any_case() -> None:
    now = [0.0]
    cache = IdentityCache(ttl_seconds=2, clock=lambda: now[0])
    cache.listening = True
    cache.put(b"t1", _actor(7, "Bob"), epoch=cache.epoch, expires_at=None)
    cache.put(b"t2", _actor(8, "carol"), epoch=cache.epoch, expires_at=None)
    assert cache.get(b"t1") is not None

    cache.drop_named("BOB")
    assert cache.get(b"t1") is None
    assert cache.get(b"t2") is not None
    now[0] = 2.5
    assert cache.get(b"t2") is None


async def test_while_the_listening_connection_is_down_the_cache_is_not_used(
    database_url: str,
) -> None:
    """The listener of a process of its own database loses its connection (an administrator
    ends it, as a restart or failover would): the cache empties and serves nothing until LISTEN
    is back, then works again."""
    async with scratch_database(database_url) as url:
        pool = await database.create_pool(url, 2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            cache = IdentityCache(ttl_seconds=60)
            listener = asyncio.create_task(listen(cache, pool))
            try:
                await _until(lambda: cache.listening, "listening")
                cache.put(b"token", _actor(7, "bob"), epoch=cache.epoch, expires_at=None)
                assert cache.get(b"token") is not None

                async with pool.acquire() as conn:
                    ended = await conn.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                    )
                assert ended == 1
                await _until(lambda: not cache.listening, "the lost connection noticed")
                assert cache.get(b"token") is None
                cache.put(b"token", _actor(7, "bob"), epoch=cache.epoch, expires_at=None)
                assert cache.get(b"token") is None  # bypassed: nothing is kept meanwhile

                await _until(lambda: cache.listening, "listening again")
                cache.put(b"token", _actor(7, "bob"), epoch=cache.epoch, expires_at=None)
                assert cache.get(b"token") is not None
            finally:
                listener.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await listener
        finally:
            await pool.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    async def holds() -> bool:
        return bool(condition())

    await wait_until(holds, within=10, what=what)
