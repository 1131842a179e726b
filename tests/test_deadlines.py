"""Deadlines and limits: a call whose deadline passes while it waits on PostgreSQL ends with
DEADLINE_EXCEEDED and leaves nothing half done; a request over the size limit is refused with
RESOURCE_EXHAUSTED before any handler runs."""

from __future__ import annotations

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, wait_until
from twofactor_service.runtime import Runtime
from twofactor_service.store.database import Connection

SHORT_DEADLINE_SECONDS = 1.0


async def _backends_waiting_on_a_lock(db: Connection) -> int:
    """Other sessions of this database blocked on a lock (here: on the held account row)."""
    waiting: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND wait_event_type = 'Lock'"
    )
    return waiting


async def test_reset_past_its_deadline_while_the_account_is_locked_changes_nothing(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, db: Connection
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    # Someone else (another administrator's transaction, a slow migration) holds bob's row.
    async with db.transaction():
        await db.execute("SELECT id FROM accounts WHERE username = $1 FOR UPDATE", bob.username)
        call = stub.ResetSecret(
            pb.ResetSecretRequest(username=bob.username),
            metadata=admin.metadata(),
            timeout=SHORT_DEADLINE_SECONDS,
        )

        async def reset_is_waiting() -> bool:
            return await _backends_waiting_on_a_lock(db) > 0

        # The reset got past every check and waits in PostgreSQL, on bob's row.
        await wait_until(reset_is_waiting, within=5, what="the reset waits on the row lock")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The server gives up its wait too: nothing is left queued behind the lock that would
        # carry the reset out once the lock goes, after the client was told it failed.
        async def server_gave_up() -> bool:
            return await _backends_waiting_on_a_lock(db) == 0

        await wait_until(server_gave_up, within=5, what="the reset stops waiting on the row lock")

    # The lock is gone; bob's key, session and state are as before.
    status = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=bob.username), metadata=admin.metadata()
    )
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not status.status.allowlisted
    mine = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=bob.metadata())
    assert mine.status.username == bob.username
    signed_in = await stub.SignIn(
        pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code())
    )
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    events = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(target_username=bob.username, operation="ResetSecret"),
        metadata=admin.metadata(),
    )
    assert [e for e in events.events if e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS] == []

    # Nothing is stuck either: the same reset, unhindered, goes through.
    reset = await stub.ResetSecret(
        pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata(), timeout=5
    )
    assert reset.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_a_request_over_the_size_limit_is_resource_exhausted(
    stub: pb_grpc.TwoFactorServiceAsyncStub, runtime: Runtime
) -> None:
    limit = runtime.config.max_message_bytes

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username="x" * (limit + 1), password="pw"), timeout=5)

    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_request_just_under_the_size_limit_is_judged_on_its_fields(
    stub: pb_grpc.TwoFactorServiceAsyncStub, runtime: Runtime
) -> None:
    limit = runtime.config.max_message_bytes

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(pb.SignInRequest(username="x" * (limit - 100), password="pw"), timeout=5)

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith("username")


async def test_oversized_metadata_is_refused_without_reaching_the_service(
    stub: pb_grpc.TwoFactorServiceAsyncStub,
) -> None:
    token = "t" * (64 * 1024)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetAccountStatus(
            pb.GetAccountStatusRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )

    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
