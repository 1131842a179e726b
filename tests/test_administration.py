"""The administrative half: resetting and deleting another account's key (O3, O4), the 2FA
allowlist and the exclusion list (O5), account status (O8), the audit log (O9), and settings
and accounts (O10). Every change must show in the audit log; no secret may."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeAlias
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    VERIFY_RIGHT,
    Actors,
    Person,
    audit_events,
    audit_rows_containing,
    error_reason,
    right_message,
)
from twofactor_service import rules
from twofactor_service.rules import AccountKind
from twofactor_service.store.database import Connection

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

ADMIN_RIGHT = right_message(rules.ADMIN_RIGHT)
# Long enough to see the next event of a watched audit log; never reached when it works.
WATCH_TIMEOUT_SECONDS = 10.0


async def status_of(stub: Stub, reader: Person, username: str) -> pb.AccountStatus:
    response = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=username), metadata=reader.metadata()
    )
    return response.status


async def newest_event(stub: Stub, reader: Person, target: str, operation: str) -> pb.AuditEvent:
    events = await audit_events(stub, reader, target_username=target, operation=operation)
    assert events, f"no {operation} event on {target} in the audit log"
    return events[0]


async def assert_audited(
    stub: Stub, admin: Person, target: str, operation: str, *, reason: str = ""
) -> pb.AuditEvent:
    """The newest `operation` event on `target` is the admin's success."""
    event = await newest_event(stub, admin, target, operation)
    assert event.actor == admin.username
    assert event.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS
    assert event.request_id
    if reason:
        assert event.reason == reason
    return event


async def assert_refusal_audited(
    stub: Stub, admin: Person, target: str, operation: str, reason: str
) -> None:
    event = await newest_event(stub, admin, target, operation)
    assert (event.actor, event.outcome, event.reason) == (
        admin.username,
        enums_pb2.AUDIT_OUTCOME_FAILURE,
        reason,
    )


async def assert_session_ended(stub: Stub, person: Person) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=person.metadata())
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def sign_in_refused(stub: Stub, person: Person) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(
            pb.SignInRequest(username=person.username, password=person.password, code="123456")
        )
    return failure.value


# --- O3: resetting another account's key.


async def test_reset_puts_account_on_allowlist_and_ends_its_sessions(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    verifier = await actors.service()

    response = await stub.ResetSecret(
        pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
    )

    status = response.status
    assert status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert status.allowlisted
    assert not status.HasField("key_create_time")
    assert not status.has_pending_key
    assert status == await status_of(stub, admin, bob.username)
    await assert_session_ended(stub, bob)
    # The old key is gone: a backend checking its codes is told no.
    verified = await stub.VerifyCode(
        pb.VerifyCodeRequest(username=bob.username, code=bob.next_code()),
        metadata=verifier.metadata(),
    )
    assert verified.result == enums_pb2.VERIFY_CODE_RESULT_FAILED
    # Seed: "At the next sign-in, the user will be able to generate a new secret key."
    signed_in = await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password))
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED
    await assert_audited(stub, admin, bob.username, "ResetSecret")


async def test_reset_discards_a_pending_key_and_an_enrollment_in_progress(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    await stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=bob.metadata())
    await stub.ResetSecret(pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata())
    first = await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password))
    assert (await status_of(stub, admin, bob.username)).has_pending_key

    await stub.ResetSecret(pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata())

    assert not (await status_of(stub, admin, bob.username)).has_pending_key
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=first.enrollment.enrollment_ticket,
                code=bob.next_code(first.enrollment.pending_key.secret_base32),
            )
        )
    assert error_reason(failure.value) == "ENROLLMENT_TICKET_INVALID"


async def test_own_key_cannot_be_reset(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=admin.username.upper()), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "OWN_KEY_RESET"
    assert "BeginRegenerateSecret" in (failure.value.details() or "")
    own = await status_of(stub, admin, admin.username)
    assert own.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    await actors.sign_in(admin)
    await assert_refusal_audited(
        stub, admin, admin.username.upper(), "ResetSecret", "OWN_KEY_RESET"
    )


async def test_an_excluded_account_has_no_key_to_reset(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    svc = await actors.create("svc", excluded=True)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=svc.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "ACCOUNT_EXCLUDED"
    status = await status_of(stub, admin, svc.username)
    assert status.state == enums_pb2.TWO_FACTOR_STATE_EXCLUDED
    assert not status.allowlisted


async def test_resetting_a_protected_account_needs_the_admins_step_up(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    vip = await actors.user(protected=True)
    request = pb.ResetSecretRequest(username=vip.username)

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ResetSecret(request, metadata=admin.metadata())
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(missing.value) == "STEP_UP_REQUIRED"
    # The target's credentials are no proof: it is the actor's own that count.
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stub.ResetSecret(
            request,
            metadata=admin.metadata(
                x_step_up_password=vip.password, x_step_up_code=vip.next_code()
            ),
        )
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(wrong.value) == "STEP_UP_FAILED"
    assert (await status_of(stub, admin, vip.username)).state == enums_pb2.TWO_FACTOR_STATE_ENROLLED

    response = await stub.ResetSecret(request, metadata=admin.step_up())

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    await assert_session_ended(stub, vip)


# --- O4: deleting another account's key.


async def test_delete_blocks_the_account_until_it_is_allowlisted(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    response = await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=bob.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_BLOCKED
    assert not response.status.allowlisted
    assert not response.status.HasField("key_create_time")
    await assert_session_ended(stub, bob)
    refused = await sign_in_refused(stub, bob)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused) == "TWO_FACTOR_KEY_DELETED"
    await assert_audited(stub, admin, bob.username, "DeleteSecret")


async def test_deleting_the_key_of_an_allowlisted_account_takes_it_off_the_allowlist(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    newcomer = await actors.create("newcomer")

    response = await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=newcomer.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_BLOCKED
    assert error_reason(await sign_in_refused(stub, newcomer)) == "TWO_FACTOR_KEY_DELETED"


async def test_own_key_cannot_be_deleted(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.DeleteSecret(
            pb.DeleteSecretRequest(username=admin.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "OWN_KEY_DELETE"
    assert (
        await status_of(stub, admin, admin.username)
    ).state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    await assert_refusal_audited(stub, admin, admin.username, "DeleteSecret", "OWN_KEY_DELETE")


async def test_own_account_cannot_be_excluded(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.AddToExclusionList(
            pb.AddToExclusionListRequest(username=admin.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "OWN_ACCOUNT_EXCLUSION"
    assert (
        await status_of(stub, admin, admin.username)
    ).state == enums_pb2.TWO_FACTOR_STATE_ENROLLED


async def test_a_domain_accounts_key_cannot_be_deleted(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    dom = await actors.create("dom", kind=AccountKind.DOMAIN)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.DeleteSecret(
            pb.DeleteSecretRequest(username=dom.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "NOT_INTERNAL_ACCOUNT"
    status = await status_of(stub, admin, dom.username)
    assert status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


# --- O5: the 2FA allowlist.


async def test_allowlisting_a_blocked_account_restores_its_access(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=bob.username), metadata=admin.metadata()
    )

    response = await stub.AddToAllowlist(
        pb.AddToAllowlistRequest(username=bob.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert response.status.allowlisted
    await assert_audited(stub, admin, bob.username, "AddToAllowlist")
    await actors.enroll(bob)
    after = await status_of(stub, admin, bob.username)
    # It left the list by itself when it set up its key.
    assert after.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not after.allowlisted


async def test_an_account_with_a_key_cannot_be_allowlisted(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.AddToAllowlist(
            pb.AddToAllowlistRequest(username=bob.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "ACCOUNT_HAS_KEY"
    assert not (await status_of(stub, admin, bob.username)).allowlisted
    await assert_refusal_audited(stub, admin, bob.username, "AddToAllowlist", "ACCOUNT_HAS_KEY")


async def test_an_excluded_account_cannot_be_allowlisted(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    svc = await actors.create("svc", excluded=True)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.AddToAllowlist(
            pb.AddToAllowlistRequest(username=svc.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "ACCOUNT_EXCLUDED"
    status = await status_of(stub, admin, svc.username)
    assert (status.state, status.allowlisted) == (enums_pb2.TWO_FACTOR_STATE_EXCLUDED, False)


async def test_removing_from_the_allowlist_blocks_the_account(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    newcomer = await actors.create("newcomer")

    response = await stub.RemoveFromAllowlist(
        pb.RemoveFromAllowlistRequest(username=newcomer.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_BLOCKED
    assert error_reason(await sign_in_refused(stub, newcomer)) == "TWO_FACTOR_KEY_DELETED"
    await assert_audited(stub, admin, newcomer.username, "RemoveFromAllowlist")


async def test_removing_from_the_allowlist_cancels_an_enrollment_in_progress(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    newcomer = await actors.create("newcomer")
    started = await stub.SignIn(
        pb.SignInRequest(username=newcomer.username, password=newcomer.password)
    )

    await stub.RemoveFromAllowlist(
        pb.RemoveFromAllowlistRequest(username=newcomer.username), metadata=admin.metadata()
    )

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=started.enrollment.enrollment_ticket,
                code=newcomer.next_code(started.enrollment.pending_key.secret_base32),
            )
        )
    assert error_reason(failure.value) == "ENROLLMENT_TICKET_INVALID"
    assert (
        await status_of(stub, admin, newcomer.username)
    ).state == enums_pb2.TWO_FACTOR_STATE_BLOCKED


async def test_an_account_that_set_up_its_key_cannot_be_removed_from_the_allowlist(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.RemoveFromAllowlist(
            pb.RemoveFromAllowlistRequest(username=bob.username), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure.value) == "ACCOUNT_HAS_KEY"
    assert (await status_of(stub, admin, bob.username)).state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    await actors.sign_in(bob)


async def list_all(
    stub: Stub, admin: Person, exclusion: bool, page_size: int
) -> tuple[list[str], list[int]]:
    """Every username on the allowlist (or the exclusion list), page by page, and page sizes."""
    names: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page: pb.ListExclusionListResponse | pb.ListAllowlistResponse
        if exclusion:
            page = await stub.ListExclusionList(
                pb.ListExclusionListRequest(page_size=page_size, page_token=token),
                metadata=admin.metadata(),
            )
        else:
            page = await stub.ListAllowlist(
                pb.ListAllowlistRequest(page_size=page_size, page_token=token),
                metadata=admin.metadata(),
            )
        names += [a.username for a in page.accounts]
        sizes.append(len(page.accounts))
        if exclusion:
            assert all(a.state == enums_pb2.TWO_FACTOR_STATE_EXCLUDED for a in page.accounts)
        else:
            assert all(a.allowlisted for a in page.accounts)
        token = page.next_page_token
        if not token:
            return names, sizes


@pytest.mark.parametrize("exclusion", [False, True], ids=["allowlist", "exclusion-list"])
async def test_lists_page_through_every_member_once_in_username_order(
    actors: Actors, stub: Stub, exclusion: bool
) -> None:
    admin = await actors.admin()
    members = [(await actors.create("member", excluded=exclusion)).username for _ in range(5)]
    outsider = (await actors.user()).username

    names, sizes = await list_all(stub, admin, exclusion, page_size=2)

    assert len(names) == len(set(names)), "an account appeared on two pages"
    assert [n for n in names if n in members] == sorted(members, key=str.casefold)
    assert outsider not in names
    assert all(size <= 2 for size in sizes)
    assert sizes[-1] > 0 or len(sizes) == 1
    # The default page size is 100, and one page of 1000 holds what pages of 2 did.
    everything, _ = await list_all(stub, admin, exclusion, page_size=1000)
    assert everything == names


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [(-1, "", "page_size"), (1001, "", "page_size"), (10, "not a token!", "page_token")],
)
async def test_bad_list_paging_is_invalid_argument(
    actors: Actors, stub: Stub, page_size: int, page_token: str, field: str
) -> None:
    admin = await actors.admin()
    calls = (
        stub.ListAllowlist(
            pb.ListAllowlistRequest(page_size=page_size, page_token=page_token),
            metadata=admin.metadata(),
        ),
        stub.ListExclusionList(
            pb.ListExclusionListRequest(page_size=page_size, page_token=page_token),
            metadata=admin.metadata(),
        ),
        stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=page_size, page_token=page_token),
            metadata=admin.metadata(),
        ),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (failure.value.details() or "").startswith(field)


# --- O5: the exclusion list.


async def test_excluding_an_account_deletes_its_key_and_lets_it_sign_in_with_a_password(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    response = await stub.AddToExclusionList(
        pb.AddToExclusionListRequest(username=bob.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_EXCLUDED
    assert response.status.excluded
    assert not response.status.HasField("key_create_time")
    await assert_session_ended(stub, bob)
    signed_in = await stub.SignIn(pb.SignInRequest(username=bob.username, password=bob.password))
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    await assert_audited(stub, admin, bob.username, "AddToExclusionList")


async def test_excluding_an_allowlisted_account_takes_it_off_the_allowlist(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    newcomer = await actors.create("newcomer")

    response = await stub.AddToExclusionList(
        pb.AddToExclusionListRequest(username=newcomer.username), metadata=admin.metadata()
    )

    assert (response.status.excluded, response.status.allowlisted) == (True, False)


async def test_an_account_taken_off_the_exclusion_list_is_blocked(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    svc = await actors.user_without_2fa()

    response = await stub.RemoveFromExclusionList(
        pb.RemoveFromExclusionListRequest(username=svc.username), metadata=admin.metadata()
    )

    assert response.status.state == enums_pb2.TWO_FACTOR_STATE_BLOCKED
    assert (response.status.excluded, response.status.allowlisted) == (False, False)
    # Its session was opened with a password alone.
    await assert_session_ended(stub, svc)
    refused = await sign_in_refused(stub, svc)
    assert error_reason(refused) == "TWO_FACTOR_KEY_DELETED"
    await assert_audited(stub, admin, svc.username, "RemoveFromExclusionList")


async def test_removing_an_account_that_is_not_excluded_changes_nothing(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    newcomer = await actors.create("newcomer")
    bob = await actors.user()

    for person in (newcomer, bob):
        before = await status_of(stub, admin, person.username)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.RemoveFromExclusionList(
                pb.RemoveFromExclusionListRequest(username=person.username),
                metadata=admin.metadata(),
            )
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(failure.value) == "ACCOUNT_NOT_EXCLUDED"
        assert await status_of(stub, admin, person.username) == before
    # Bob's session is untouched.
    await status_of(stub, bob, bob.username)


# --- O10: accounts, protection, rights and settings.


async def test_create_account_starts_on_the_allowlist(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    admin = await actors.admin()
    name = actors.name("Dave")
    password = "a brand new password " + name

    response = await stub.CreateAccount(
        pb.CreateAccountRequest(
            username=name, kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password=password, protected=True
        ),
        metadata=admin.metadata(),
    )

    status = response.status
    assert (status.username, status.kind, status.state) == (
        name,
        enums_pb2.ACCOUNT_KIND_INTERNAL,
        enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED,
    )
    assert status.protected
    dave = Person(name, password=password, clock=actors.clock)
    await actors.enroll(dave)
    await assert_audited(stub, admin, name, "CreateAccount")
    assert await audit_rows_containing(db, [password]) == []


async def test_create_account_can_exclude_it_and_make_domain_accounts(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()

    svc = await stub.CreateAccount(
        pb.CreateAccountRequest(
            username=actors.name("svc"),
            kind=enums_pb2.ACCOUNT_KIND_INTERNAL,
            password="integration password",
            exclude_from_two_factor=True,
        ),
        metadata=admin.metadata(),
    )
    dom = await stub.CreateAccount(
        pb.CreateAccountRequest(username=actors.name("dom"), kind=enums_pb2.ACCOUNT_KIND_DOMAIN),
        metadata=admin.metadata(),
    )

    assert svc.status.state == enums_pb2.TWO_FACTOR_STATE_EXCLUDED
    assert (dom.status.kind, dom.status.state) == (
        enums_pb2.ACCOUNT_KIND_DOMAIN,
        enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED,
    )


async def test_usernames_are_unique_whatever_their_case(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    name = actors.name("Erin")
    request = pb.CreateAccountRequest(
        username=name, kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password="a long enough password"
    )
    await stub.CreateAccount(request, metadata=admin.metadata())

    request.username = name.upper()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateAccount(request, metadata=admin.metadata())

    assert failure.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(failure.value) == "ACCOUNT_EXISTS"
    assert (await status_of(stub, admin, name.upper())).username == name


@pytest.mark.parametrize(
    ("kind", "password", "field"),
    [
        (enums_pb2.ACCOUNT_KIND_UNSPECIFIED, "a long enough password", "kind"),
        (99, "a long enough password", "kind"),
        (enums_pb2.ACCOUNT_KIND_INTERNAL, "", "password"),
        (enums_pb2.ACCOUNT_KIND_INTERNAL, "too short", "password"),
        (enums_pb2.ACCOUNT_KIND_INTERNAL, "x" * 1025, "password"),
        (enums_pb2.ACCOUNT_KIND_DOMAIN, "a long enough password", "password"),
    ],
)
async def test_create_account_with_bad_kind_or_password_is_invalid_argument(
    actors: Actors, stub: Stub, kind: int, password: str, field: str
) -> None:
    admin = await actors.admin()
    name = actors.name("bad")

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateAccount(
            pb.CreateAccountRequest(username=name, kind=kind, password=password),  # type: ignore[arg-type]
            metadata=admin.metadata(),
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith(field)
    with pytest.raises(grpc.aio.AioRpcError) as lookup:
        await status_of(stub, admin, name)
    assert lookup.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("username", ["", "x" * 257, " padded", "tab\there"])
async def test_create_account_with_a_bad_username_is_invalid_argument(
    actors: Actors, stub: Stub, username: str
) -> None:
    admin = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateAccount(
            pb.CreateAccountRequest(
                username=username,
                kind=enums_pb2.ACCOUNT_KIND_INTERNAL,
                password="a long enough password",
            ),
            metadata=admin.metadata(),
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith("username")


async def test_protecting_an_account_makes_changes_to_it_need_step_up(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    response = await stub.SetAccountProtection(
        pb.SetAccountProtectionRequest(username=bob.username, protected=True),
        metadata=admin.metadata(),
    )

    assert response.status.protected
    await assert_audited(stub, admin, bob.username, "SetAccountProtection", reason="PROTECTED")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
        )
    assert error_reason(failure.value) == "STEP_UP_REQUIRED"
    # Lifting the protection is itself a change to a protected account.
    lift = pb.SetAccountProtectionRequest(username=bob.username, protected=False)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SetAccountProtection(lift, metadata=admin.metadata())
    assert error_reason(failure.value) == "STEP_UP_REQUIRED"
    lifted = await stub.SetAccountProtection(lift, metadata=admin.step_up())
    assert not lifted.status.protected
    await assert_audited(stub, admin, bob.username, "SetAccountProtection", reason="UNPROTECTED")
    await stub.ResetSecret(pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata())


async def test_granted_rights_take_effect_on_the_next_call_and_revoked_ones_too(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()

    granted = await stub.GrantRight(
        pb.GrantRightRequest(username=bob.username, right=ADMIN_RIGHT), metadata=admin.metadata()
    )

    assert ADMIN_RIGHT in granted.status.rights
    await stub.ListAllowlist(pb.ListAllowlistRequest(page_size=1), metadata=bob.metadata())
    right_name = f"{rules.ADMIN_RIGHT[0]}/{rules.ADMIN_RIGHT[1]}"
    await assert_audited(stub, admin, bob.username, "GrantRight", reason=right_name)

    revoked = await stub.RevokeRight(
        pb.RevokeRightRequest(username=bob.username, right=ADMIN_RIGHT), metadata=admin.metadata()
    )

    assert ADMIN_RIGHT not in revoked.status.rights
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ListAllowlist(pb.ListAllowlistRequest(page_size=1), metadata=bob.metadata())
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(failure.value) == "MISSING_RIGHT"
    await assert_audited(stub, admin, bob.username, "RevokeRight", reason=right_name)


@pytest.mark.parametrize(
    ("area", "permission", "field"),
    [
        ("", "MODIFY_OBJECT_ACLS", "right.functional_area"),
        ("General", "", "right.permission"),
        ("a" * 129, "X", "right.functional_area"),
        ("General", "bad\npermission", "right.permission"),
    ],
)
async def test_a_malformed_right_is_invalid_argument(
    actors: Actors, stub: Stub, area: str, permission: str, field: str
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    right = right_message((area, permission))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GrantRight(
            pb.GrantRightRequest(username=bob.username, right=right), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith(field)
    assert list((await status_of(stub, admin, bob.username)).rights) == []


async def test_settings_show_the_issuer_and_the_totp_parameters(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()

    settings = (await stub.GetSettings(pb.GetSettingsRequest(), metadata=admin.metadata())).settings

    assert settings.issuer_name
    assert (settings.totp_algorithm, settings.totp_digits) == ("SHA1", 6)
    assert (settings.totp_period_seconds, settings.totp_valid_window) == (30, 1)


async def test_a_new_issuer_name_applies_to_keys_made_afterwards(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    original = (await stub.GetSettings(pb.GetSettingsRequest(), metadata=admin.metadata())).settings
    issuer = f"Example Corp {actors.prefix}"
    try:
        updated = await stub.UpdateSettings(
            pb.UpdateSettingsRequest(issuer_name=issuer), metadata=admin.metadata()
        )

        assert updated.settings.issuer_name == issuer
        again = await stub.GetSettings(pb.GetSettingsRequest(), metadata=admin.metadata())
        assert again.settings.issuer_name == issuer
        # The key bob set up before keeps working, untouched.
        await actors.sign_in(bob)
        begun = await stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=bob.metadata()
        )
        uri = urlsplit(begun.pending_key.provisioning_uri)
        assert parse_qs(uri.query)["issuer"] == [issuer]
        assert uri.path.startswith("/" + issuer.replace(" ", "%20") + ":")
        event = await newest_event(stub, admin, "", "UpdateSettings")
        assert (event.actor, event.outcome) == (admin.username, enums_pb2.AUDIT_OUTCOME_SUCCESS)
    finally:
        await stub.UpdateSettings(
            pb.UpdateSettingsRequest(issuer_name=original.issuer_name), metadata=admin.metadata()
        )


@pytest.mark.parametrize("issuer", ["", "x" * 65, "Corp: Inc", "new\nline"])
async def test_a_bad_issuer_name_is_invalid_argument(
    actors: Actors, stub: Stub, issuer: str
) -> None:
    admin = await actors.admin()
    before = await stub.GetSettings(pb.GetSettingsRequest(), metadata=admin.metadata())

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.UpdateSettings(
            pb.UpdateSettingsRequest(issuer_name=issuer), metadata=admin.metadata()
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith("issuer_name")
    assert await stub.GetSettings(pb.GetSettingsRequest(), metadata=admin.metadata()) == before


# --- O8: account status.


async def test_a_plain_user_reads_its_own_status(actors: Actors, stub: Stub) -> None:
    bob = await actors.user()

    by_default = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=bob.metadata())
    by_name = await status_of(stub, bob, bob.username.upper())

    assert by_default.status == by_name
    assert by_name.username == bob.username
    assert by_name.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert by_name.HasField("key_create_time")


async def test_another_accounts_status_needs_the_administration_right(
    actors: Actors, stub: Stub
) -> None:
    bob = await actors.user()
    carol = await actors.user(protected=True)

    # Permission before existence: an unknown name is refused the same way.
    for name in (carol.username, "nobody-" + carol.username):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await status_of(stub, bob, name)
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(failure.value) == "MISSING_RIGHT"

    admin = await actors.admin()
    status = await status_of(stub, admin, carol.username)
    assert (status.username, status.protected, status.state) == (
        carol.username,
        True,
        enums_pb2.TWO_FACTOR_STATE_ENROLLED,
    )


TARGETED_CALLS = {
    "ResetSecret": lambda s, name, md: s.ResetSecret(
        pb.ResetSecretRequest(username=name), metadata=md
    ),
    "DeleteSecret": lambda s, name, md: s.DeleteSecret(
        pb.DeleteSecretRequest(username=name), metadata=md
    ),
    "AddToAllowlist": lambda s, name, md: s.AddToAllowlist(
        pb.AddToAllowlistRequest(username=name), metadata=md
    ),
    "RemoveFromAllowlist": lambda s, name, md: s.RemoveFromAllowlist(
        pb.RemoveFromAllowlistRequest(username=name), metadata=md
    ),
    "AddToExclusionList": lambda s, name, md: s.AddToExclusionList(
        pb.AddToExclusionListRequest(username=name), metadata=md
    ),
    "RemoveFromExclusionList": lambda s, name, md: s.RemoveFromExclusionList(
        pb.RemoveFromExclusionListRequest(username=name), metadata=md
    ),
    "SetAccountProtection": lambda s, name, md: s.SetAccountProtection(
        pb.SetAccountProtectionRequest(username=name, protected=True), metadata=md
    ),
    "GrantRight": lambda s, name, md: s.GrantRight(
        pb.GrantRightRequest(username=name, right=right_message(VERIFY_RIGHT)), metadata=md
    ),
    "RevokeRight": lambda s, name, md: s.RevokeRight(
        pb.RevokeRightRequest(username=name, right=right_message(VERIFY_RIGHT)), metadata=md
    ),
    "GetAccountStatus": lambda s, name, md: s.GetAccountStatus(
        pb.GetAccountStatusRequest(username=name), metadata=md
    ),
}


@pytest.mark.parametrize("operation", sorted(TARGETED_CALLS))
async def test_an_unknown_target_is_not_found(actors: Actors, stub: Stub, operation: str) -> None:
    admin = await actors.admin()
    nobody = actors.name("nobody")

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await TARGETED_CALLS[operation](stub, nobody, admin.metadata())

    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(failure.value) == "ACCOUNT_NOT_FOUND"
    assert nobody in (failure.value.details() or "")


# --- O9: the audit log.


async def test_audit_events_filter_by_target_actor_operation_and_time(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    other_admin = await actors.admin()
    bob = await actors.user()
    carol = await actors.user()
    await stub.ResetSecret(pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata())
    await stub.DeleteSecret(
        pb.DeleteSecretRequest(username=bob.username), metadata=other_admin.metadata()
    )
    await stub.AddToAllowlist(
        pb.AddToAllowlistRequest(username=bob.username), metadata=admin.metadata()
    )
    await stub.ResetSecret(
        pb.ResetSecretRequest(username=carol.username), metadata=admin.metadata()
    )

    on_bob = await audit_events(stub, admin, target_username=bob.username.upper())
    by_other = await audit_events(stub, admin, actor_username=other_admin.username)
    resets_of_bob = await audit_events(
        stub, admin, target_username=bob.username, operation="ResetSecret"
    )

    assert {e.target for e in on_bob} == {bob.username}
    changes = [e.operation for e in on_bob if e.actor in (admin.username, other_admin.username)]
    assert changes == ["AddToAllowlist", "DeleteSecret", "ResetSecret"]  # newest first
    # Bob's own sign-ins are there too (anonymous calls: no actor).
    assert [e.operation for e in on_bob if not e.actor][-1] == "SignIn"
    assert [(e.operation, e.target) for e in by_other if e.operation == "DeleteSecret"] == [
        ("DeleteSecret", bob.username)
    ]
    assert {e.actor for e in by_other} == {other_admin.username}
    assert [(e.actor, e.operation) for e in resets_of_bob] == [(admin.username, "ResetSecret")]
    sequences = [e.sequence for e in on_bob]
    assert sequences == sorted(sequences, reverse=True)

    delete_event = next(e for e in on_bob if e.operation == "DeleteSecret")
    since_delete = await audit_events(
        stub, admin, target_username=bob.username, start_time=delete_event.time
    )
    before_delete = await audit_events(
        stub, admin, target_username=bob.username, end_time=delete_event.time
    )
    assert [e.operation for e in since_delete] == ["AddToAllowlist", "DeleteSecret"]
    assert delete_event not in before_delete
    assert before_delete[0].operation == "ResetSecret"
    assert since_delete + before_delete == on_bob


async def test_audit_events_page_newest_first_without_gaps(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    for _ in range(3):
        await stub.SetAccountProtection(
            pb.SetAccountProtectionRequest(username=bob.username, protected=False),
            metadata=admin.metadata(),
        )
    everything = await audit_events(stub, admin, target_username=bob.username)

    paged: list[pb.AuditEvent] = []
    token = ""
    while True:
        page = await stub.ListAuditEvents(
            pb.ListAuditEventsRequest(target_username=bob.username, page_size=2, page_token=token),
            metadata=admin.metadata(),
        )
        assert len(page.events) <= 2
        paged += page.events
        token = page.next_page_token
        if not token:
            break

    assert paged == everything
    assert len(paged) >= 5  # SignIn (enrollment), SignIn (completion) and three changes


async def test_watching_the_audit_log_receives_a_new_event(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    newest = await stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1), metadata=admin.metadata()
    )
    after = newest.events[0].sequence
    watch = stub.WatchAuditEvents(
        pb.WatchAuditEventsRequest(after_sequence=after), metadata=admin.metadata()
    )
    try:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
        )

        async def the_reset() -> pb.AuditEvent:
            async for message in watch:
                assert message.event.sequence > after
                if (
                    message.event.target == bob.username
                    and message.event.operation == "ResetSecret"
                ):
                    return message.event
            raise AssertionError("the watch ended without the reset")

        event = await asyncio.wait_for(the_reset(), WATCH_TIMEOUT_SECONDS)
    finally:
        watch.cancel()

    assert (event.actor, event.outcome) == (admin.username, enums_pb2.AUDIT_OUTCOME_SUCCESS)
    assert event.time.ToDatetime() > newest.events[0].time.ToDatetime() - timedelta(seconds=1)


async def test_watching_after_an_unused_sequence_number_sends_only_later_events(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    admin = await actors.admin()
    bob = await actors.user()
    # A change that rolls back leaves its sequence number unused, as an ABORTED call does.
    rolled_back = db.transaction()
    await rolled_back.start()
    unused = await db.fetchval(
        "INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id, peer)"
        " VALUES ('', '', 'RolledBack', 'FAILURE', '', '', '') RETURNING sequence"
    )
    await rolled_back.rollback()
    assert isinstance(unused, int)
    watch = stub.WatchAuditEvents(
        pb.WatchAuditEventsRequest(after_sequence=unused), metadata=admin.metadata()
    )
    try:
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=bob.username), metadata=admin.metadata()
        )

        async def events_until_the_reset() -> list[pb.AuditEvent]:
            seen = []
            async for message in watch:
                seen.append(message.event)
                if (
                    message.event.operation == "ResetSecret"
                    and message.event.target == bob.username
                ):
                    return seen
            raise AssertionError("the watch ended without the reset")

        seen = await asyncio.wait_for(events_until_the_reset(), WATCH_TIMEOUT_SECONDS)
    finally:
        watch.cancel()

    assert [e.sequence for e in seen if e.sequence <= unused] == []


async def test_the_audit_log_holds_no_password_code_secret_or_token(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    admin = await actors.admin()
    verifier = await actors.service()
    name = actors.name("frank")
    password = f"franks own password {name}"
    await stub.CreateAccount(
        pb.CreateAccountRequest(
            username=name, kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password=password
        ),
        metadata=admin.metadata(),
    )
    frank = Person(name, password=password, clock=actors.clock)
    await actors.enroll(frank)
    codes: list[str] = []
    secrets = [frank.secret or ""]
    tokens = [frank.token or "", admin.token or "", verifier.token or ""]
    # Failed attempts of every kind, each with something secret in it.
    wrong_password = f"not franks password {name}"
    for request in (
        pb.SignInRequest(username=name, password=wrong_password, code=frank.next_code()),
        pb.SignInRequest(username=name, password=password, code="000000"),
    ):
        codes.append(request.code)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SignIn(request)
    code = frank.next_code()
    codes.append(code)
    signed_in = await stub.SignIn(pb.SignInRequest(username=name, password=password, code=code))
    tokens.append(signed_in.session.token)
    code = frank.next_code()
    codes.append(code)
    await stub.VerifyCode(
        pb.VerifyCodeRequest(username=name, code=code), metadata=verifier.metadata()
    )
    new_password = f"franks newer password {name}"
    await stub.ChangePassword(
        pb.ChangePasswordRequest(current_password=password, new_password=new_password),
        metadata=frank.metadata(),
    )
    frank.password = new_password
    begun = await stub.BeginRegenerateSecret(
        pb.BeginRegenerateSecretRequest(), metadata=frank.metadata()
    )
    secrets.append(begun.pending_key.secret_base32)
    code = frank.next_code(begun.pending_key.secret_base32)
    codes.append(code)
    await stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=code), metadata=frank.metadata()
    )
    await stub.SetAccountProtection(
        pb.SetAccountProtectionRequest(username=name, protected=True), metadata=admin.metadata()
    )
    step_up_code = admin.next_code()
    codes.append(step_up_code)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ResetSecret(
            pb.ResetSecretRequest(username=name),
            metadata=admin.metadata(x_step_up_password=wrong_password, x_step_up_code=step_up_code),
        )

    events = await audit_events(stub, admin, target_username=name)
    assert {"CreateAccount", "SignIn", "VerifyCode", "ChangePassword", "ResetSecret"} <= {
        e.operation for e in events
    }
    needles = [password, wrong_password, new_password, *secrets, *tokens]
    for event in events:
        text = str(event)
        assert not [n for n in needles if n in text], event
        assert not [c for c in codes if c in (event.actor + event.target + event.reason)], event
    assert await audit_rows_containing(db, needles) == []
