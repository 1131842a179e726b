"""The seed page ("Resetting and deleting a two-factor authentication secret key") from end to
end: an administrator resets alice's key, alice sets up a new one, the administrator deletes
it, alice is blocked, the administrator restores her access, and alice sets up a key again.
Each step is checked through the public API and in the audit log."""

from __future__ import annotations

from typing import TypeAlias

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, audit_events, error_reason

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

SUCCESS = enums_pb2.AUDIT_OUTCOME_SUCCESS
FAILURE = enums_pb2.AUDIT_OUTCOME_FAILURE


class AuditTrail:
    """The audit events on one account since the scenario began, oldest first."""

    def __init__(self, stub: Stub, reader: Person, target: str) -> None:
        self.stub = stub
        self.reader = reader
        self.target = target
        self.after = 0

    async def start(self) -> None:
        newest = await audit_events(self.stub, self.reader, target_username=self.target)
        self.after = newest[0].sequence if newest else 0

    async def new_events(self) -> list[tuple[str, str, int, str]]:
        """(actor, operation, outcome, reason) of the events since the last call."""
        events = await audit_events(self.stub, self.reader, target_username=self.target)
        fresh = [e for e in reversed(events) if e.sequence > self.after]
        if fresh:
            self.after = fresh[-1].sequence
        assert all(e.target == self.target and e.request_id for e in fresh)
        return [(e.actor, e.operation, e.outcome, e.reason) for e in fresh]


async def status_of(stub: Stub, admin: Person, alice: Person) -> pb.AccountStatus:
    response = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=alice.username), metadata=admin.metadata()
    )
    return response.status


async def sets_up_a_new_key_at_sign_in(stub: Stub, alice: Person) -> None:
    """Seed: "At the next sign-in, the user will be able to generate a new secret key."""
    response = await stub.SignIn(pb.SignInRequest(username=alice.username, password=alice.password))
    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    key = response.enrollment.pending_key
    assert key.secret_base32 != alice.secret
    assert alice.username in key.provisioning_uri
    assert key.qr_code_png.startswith(b"\x89PNG")
    alice.secret = key.secret_base32
    done = await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=response.enrollment.enrollment_ticket, code=alice.next_code()
        )
    )
    alice.token = done.session.token


async def test_reset_then_delete_then_restore_access(actors: Actors, stub: Stub) -> None:
    # "...only if you have configured two-factor authentication and you have the Modify object
    # ACLs right in the General features: User permissions functional area."
    admin = await actors.admin()
    alice = await actors.user()
    trail = AuditTrail(stub, admin, alice.username)
    await trail.start()
    first_secret = alice.secret

    # 1. Alice lost her device: the administrator resets her key. "The existing secret key is
    # deleted and the user account is added to the two-factor authentication allowlist."
    reset = await stub.ResetSecret(
        pb.ResetSecretRequest(username=alice.username), metadata=admin.metadata()
    )

    assert reset.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert reset.status.allowlisted
    assert not reset.status.HasField("key_create_time")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=alice.metadata())
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await trail.new_events() == [(admin.username, "ResetSecret", SUCCESS, "")]

    # 2. Alice signs in with her password and sets up a key on her new device.
    await sets_up_a_new_key_at_sign_in(stub, alice)

    own = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=alice.metadata())
    assert own.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not own.status.allowlisted
    with pytest.raises(grpc.aio.AioRpcError) as old_key:
        await stub.SignIn(
            pb.SignInRequest(
                username=alice.username, password=alice.password, code=alice.next_code(first_secret)
            )
        )
    assert error_reason(old_key.value) == "INVALID_CREDENTIALS"
    assert await trail.new_events() == [
        ("", "SignIn", SUCCESS, "ENROLLMENT_REQUIRED"),
        ("", "CompleteEnrollment", SUCCESS, "SESSION_OPENED"),
        ("", "SignIn", FAILURE, "INVALID_CREDENTIALS"),
    ]

    # 3. "You can delete a secret key to completely block a user from signing in."
    deleted = await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=alice.username), metadata=admin.metadata()
    )

    assert deleted.status.state == enums_pb2.TWO_FACTOR_STATE_BLOCKED
    assert not deleted.status.allowlisted
    assert await status_of(stub, admin, alice) == deleted.status
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=alice.metadata())
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await trail.new_events() == [(admin.username, "DeleteSecret", SUCCESS, "")]

    # 4. Alice cannot sign in: not with her password, not with her (deleted) key's code.
    for request in (
        pb.SignInRequest(username=alice.username, password=alice.password),
        pb.SignInRequest(username=alice.username, password=alice.password, code=alice.next_code()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as blocked:
            await stub.SignIn(request)
        assert blocked.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(blocked.value) == "TWO_FACTOR_KEY_DELETED"
        assert "allowlist" in (blocked.value.details() or "")
    assert await trail.new_events() == [("", "SignIn", FAILURE, "TWO_FACTOR_KEY_DELETED")] * 2

    # 5. "You can restore access by adding the user to the two-factor authentication allowlist."
    restored = await stub.AddToAllowlist(
        pb.AddToAllowlistRequest(username=alice.username), metadata=admin.metadata()
    )

    assert restored.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert await trail.new_events() == [(admin.username, "AddToAllowlist", SUCCESS, "")]

    # 6. "...at the next sign-in, the user will be able to generate a new secret key."
    await sets_up_a_new_key_at_sign_in(stub, alice)

    final = await status_of(stub, admin, alice)
    assert final.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert (final.allowlisted, final.excluded, final.has_pending_key) == (False, False, False)
    signed_in = await stub.SignIn(
        pb.SignInRequest(username=alice.username, password=alice.password, code=alice.next_code())
    )
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    assert await trail.new_events() == [
        ("", "SignIn", SUCCESS, "ENROLLMENT_REQUIRED"),
        ("", "CompleteEnrollment", SUCCESS, "SESSION_OPENED"),
        ("", "SignIn", SUCCESS, "SESSION_OPENED"),
    ]
