"""Sessions: how they end. SignOut ends the calling session; ChangePassword ends the others;
resetting or deleting an account's key (and excluding it, or taking it off the exclusion list)
ends the account's sessions; a session past its lifetime or idle too long is refused.

A refused session always gets UNAUTHENTICATED and the same message, whatever ended it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, error_reason, wait_until
from twofactor_service.runtime import Runtime
from twofactor_service.store.database import Connection

ENDED = "the session token is unknown, expired or ended; sign in again"


async def another_session(actors: Actors, person: Person) -> Person:
    """The same account signed in a second time (another browser, say)."""
    return await actors.sign_in(dataclasses.replace(person))


async def is_live(stub: pb_grpc.TwoFactorServiceAsyncStub, person: Person) -> bool:
    """Whether the person's session is accepted; a refusal must be the one of an ended session."""
    try:
        await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=person.metadata())
    except grpc.aio.AioRpcError as error:
        refusal = error
    else:
        return True
    assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusal.details() == ENDED
    return False


def token_hash(person: Person) -> bytes:
    assert person.token is not None
    return hashlib.sha256(person.token.encode()).digest()


async def test_sign_out_ends_the_calling_session_only(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    elsewhere = await another_session(actors, bob)

    await stub.SignOut(pb.SignOutRequest(), metadata=bob.metadata())

    assert not await is_live(stub, bob)
    assert await is_live(stub, elsewhere)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignOut(pb.SignOutRequest(), metadata=bob.metadata())
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_change_password_ends_the_other_sessions_and_the_new_password_works(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    elsewhere = await another_session(actors, bob)
    new_password = "a new and longer passphrase"

    await stub.ChangePassword(
        pb.ChangePasswordRequest(current_password=bob.password, new_password=new_password),
        metadata=bob.metadata(),
    )

    assert await is_live(stub, bob)
    assert not await is_live(stub, elsewhere)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(
            pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code())
        )
    assert error_reason(failure.value) == "INVALID_CREDENTIALS"
    bob.password = new_password
    assert await is_live(stub, await another_session(actors, bob))


async def test_a_wrong_current_password_changes_nothing(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()
    elsewhere = await another_session(actors, bob)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ChangePassword(
            pb.ChangePasswordRequest(
                current_password="not the password", new_password="a new and longer passphrase"
            ),
            metadata=bob.metadata(),
        )

    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(failure.value) == "INVALID_CREDENTIALS"
    assert await is_live(stub, bob)
    assert await is_live(stub, elsewhere)
    assert await is_live(stub, await another_session(actors, bob))  # the old password still works


@pytest.mark.parametrize("operation", ["ResetSecret", "DeleteSecret", "AddToExclusionList"])
async def test_changing_an_accounts_two_factor_state_ends_its_sessions(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, operation: str
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    elsewhere = await another_session(actors, bob)
    bystander = await actors.user()
    request = getattr(pb, f"{operation}Request")(username=bob.username)

    await getattr(stub, operation)(request, metadata=admin.metadata())

    assert not await is_live(stub, bob)
    assert not await is_live(stub, elsewhere)
    assert await is_live(stub, admin)
    assert await is_live(stub, bystander)


async def test_taking_an_account_off_the_exclusion_list_ends_its_password_only_sessions(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    admin = await actors.admin()
    svc = await actors.user_without_2fa()

    await stub.RemoveFromExclusionList(
        pb.RemoveFromExclusionListRequest(username=svc.username), metadata=admin.metadata()
    )

    assert not await is_live(stub, svc)


async def refused_within_staleness(
    stub: pb_grpc.TwoFactorServiceAsyncStub, person: Person, runtime: Runtime
) -> None:
    """A change made in the database behind the service's back (as here) reaches the identity
    cache by notification: at once, and at worst after TWOFACTOR_IDENTITY_CACHE_SECONDS."""

    async def refused() -> bool:
        return not await is_live(stub, person)

    await wait_until(
        refused,
        within=runtime.config.identity_cache_seconds + 1,
        what=f"{person.username}'s session refused",
    )


async def test_a_session_past_its_lifetime_is_refused(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection, runtime: Runtime
) -> None:
    bob = await actors.user()
    assert await is_live(stub, bob)

    await db.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
        token_hash(bob),
    )

    await refused_within_staleness(stub, bob, runtime)


async def test_a_session_idle_too_long_is_refused(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection, runtime: Runtime
) -> None:
    bob = await actors.user()
    idle_limit = runtime.config.session_idle_seconds

    await db.execute(
        "UPDATE sessions SET last_seen_at = now() - make_interval(secs => $2)"
        " WHERE token_hash = $1",
        token_hash(bob),
        idle_limit + 1,
    )

    await refused_within_staleness(stub, bob, runtime)


async def test_using_a_session_keeps_it_from_going_idle(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection, runtime: Runtime
) -> None:
    bob = await actors.user()
    idle_limit = runtime.config.session_idle_seconds
    # Nearly idle for too long...
    await db.execute(
        "UPDATE sessions SET last_seen_at = now() - make_interval(secs => $2)"
        " WHERE token_hash = $1",
        token_hash(bob),
        idle_limit - 120,
    )

    # ...but used now: the idle clock starts again.
    assert await is_live(stub, bob)

    idle = await db.fetchval(
        "SELECT extract(epoch FROM now() - last_seen_at) FROM sessions WHERE token_hash = $1",
        token_hash(bob),
    )
    assert idle < 60


async def test_a_session_lasts_at_most_its_lifetime_and_only_its_hash_is_stored(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection, runtime: Runtime
) -> None:
    bob = await actors.user()
    before = time.time()
    response = await stub.SignIn(
        pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code())
    )
    after = time.time()
    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED

    ttl = runtime.config.session_ttl_seconds
    assert before + ttl - 1 <= response.session.expire_time.seconds <= after + ttl + 1
    token = response.session.token
    stored = await db.fetch("SELECT s::text AS row, token_hash FROM sessions s")
    assert all(token not in r["row"] for r in stored)
    assert hashlib.sha256(token.encode()).digest() in {r["token_hash"] for r in stored}
