"""SPEC §4: every RPC by every kind of actor gives the documented status code and ErrorInfo
reason.

The RPCs come from the service descriptor, so a new RPC without a row in EXPECTED fails the
suite. Each case sends a request that is valid for the RPC (fresh accounts in the state the
RPC needs), so a refusal is about policy, never about input.

Each case is called over native gRPC and over gRPC-Web through the web console's bridge, and
both must give the documented answer: the console has no enforcement of its own.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import quote

import grpc
import pyotp
import pytest
from google.protobuf.message import Message
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    PASSWORD,
    VERIFY_RIGHT,
    VOUCH_RIGHT,
    Actors,
    Person,
    TestClock,
    error_reason,
    right_message,
)
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime

# The async stub type exists only in the generated .pyi.
Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

SERVICE = pb.DESCRIPTOR.services_by_name["TwoFactorService"]
RPCS = [method.name for method in SERVICE.methods]
# A call that neither answers nor fails within this fails the test.
CALL_TIMEOUT_SECONDS = 10.0


class Actor(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    USER_WITHOUT_2FA = "user-without-2fa"
    ADMIN = "admin"
    ADMIN_WITHOUT_2FA = "admin-without-2fa"
    # A protected administrator acting on protected targets (its own account included).
    ADMIN_PROTECTED_TARGET_NO_PROOF = "admin-protected-target-no-proof"
    ADMIN_PROTECTED_TARGET_WRONG_PROOF = "admin-protected-target-wrong-proof"
    ADMIN_PROTECTED_TARGET_GOOD_PROOF = "admin-protected-target-good-proof"
    VERIFYING_SERVICE = "service-with-verify-right"
    VOUCHING_SERVICE = "service-with-vouch-right"


PROTECTED_TARGET = {
    Actor.ADMIN_PROTECTED_TARGET_NO_PROOF,
    Actor.ADMIN_PROTECTED_TARGET_WRONG_PROOF,
    Actor.ADMIN_PROTECTED_TARGET_GOOD_PROOF,
}

Expected = tuple[grpc.StatusCode, str]
OK: Expected = (grpc.StatusCode.OK, "")
UNAUTHENTICATED: Expected = (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
MISSING_RIGHT: Expected = (grpc.StatusCode.PERMISSION_DENIED, "MISSING_RIGHT")
NO_2FA: Expected = (grpc.StatusCode.PERMISSION_DENIED, "TWO_FACTOR_NOT_CONFIGURED")
STEP_UP_REQUIRED: Expected = (grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
STEP_UP_FAILED: Expected = (grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")


def row(*expected: Expected) -> dict[Actor, Expected]:
    """One RPC's expectations, in the order the Actor enum lists the actors."""
    assert len(expected) == len(Actor)
    return dict(zip(Actor, expected, strict=True))


# Columns: anonymous, user, user w/o 2FA, admin, admin w/o 2FA, protected target without
# proof / wrong proof / good proof, verifying service, vouching service.
ANYONE = row(OK, OK, OK, OK, OK, OK, OK, OK, OK, OK)
SIGNED_IN = row(UNAUTHENTICATED, OK, OK, OK, OK, OK, OK, OK, OK, OK)
OWN_KEY = row(
    UNAUTHENTICATED, OK, NO_2FA, OK, NO_2FA, STEP_UP_REQUIRED, STEP_UP_FAILED, OK, NO_2FA, NO_2FA
)
ADMIN_CHANGE = row(
    UNAUTHENTICATED,
    MISSING_RIGHT,
    MISSING_RIGHT,
    OK,
    NO_2FA,
    STEP_UP_REQUIRED,
    STEP_UP_FAILED,
    OK,
    MISSING_RIGHT,
    MISSING_RIGHT,
)
ADMIN_READ = row(
    UNAUTHENTICATED,
    MISSING_RIGHT,
    MISSING_RIGHT,
    OK,
    NO_2FA,
    OK,
    OK,
    OK,
    MISSING_RIGHT,
    MISSING_RIGHT,
)

EXPECTED: dict[str, dict[Actor, Expected]] = {
    "SignIn": ANYONE,
    "SignInDomainAccount": row(UNAUTHENTICATED, *[MISSING_RIGHT] * 8, OK),
    "CompleteEnrollment": ANYONE,
    "SignOut": SIGNED_IN,
    "ChangePassword": SIGNED_IN,
    "BeginRegenerateSecret": OWN_KEY,
    "ConfirmRegenerateSecret": OWN_KEY,
    "GenerateRecoveryCodes": OWN_KEY,
    "ResetSecret": ADMIN_CHANGE,
    "DeleteSecret": ADMIN_CHANGE,
    "AddToAllowlist": ADMIN_CHANGE,
    "RemoveFromAllowlist": ADMIN_CHANGE,
    "ListAllowlist": ADMIN_READ,
    "AddToExclusionList": ADMIN_CHANGE,
    "RemoveFromExclusionList": ADMIN_CHANGE,
    "ListExclusionList": ADMIN_READ,
    "ListAccounts": ADMIN_READ,
    "VerifyCode": row(UNAUTHENTICATED, *[MISSING_RIGHT] * 7, OK, MISSING_RIGHT),
    # Another account's status (one's own is open to every signed-in account).
    "GetAccountStatus": ADMIN_READ,
    "ListAuditEvents": ADMIN_READ,
    "WatchAuditEvents": ADMIN_READ,
    "GetSettings": ADMIN_READ,
    "UpdateSettings": ADMIN_READ,
    "CreateAccount": ADMIN_READ,
    "SetAccountProtection": ADMIN_CHANGE,
    "GrantRight": ADMIN_CHANGE,
    "RevokeRight": ADMIN_CHANGE,
    # The accounts changed are named in the file; a protected one needs step-up.
    "ImportSecrets": ADMIN_CHANGE,
}


@dataclass
class Case:
    """What a request builder has at hand."""

    actors: Actors
    stub: Stub
    # An unprotected administrator that prepares targets; always sends step-up proof.
    helper: Person
    actor: Person
    kind: Actor

    @property
    def protected(self) -> bool:
        return self.kind in PROTECTED_TARGET

    async def target(self, role: str = "target", **options: Any) -> Person:
        return await self.actors.create(role, protected=self.protected, **options)

    async def enrolled_target(self) -> Person:
        return await self.actors.user(protected=self.protected)


async def sign_in_request(case: Case) -> Message:
    target = await case.target(excluded=True)
    return pb.SignInRequest(username=target.username, password=target.password)


async def sign_in_domain_account_request(case: Case) -> Message:
    target = await case.target(kind=AccountKind.DOMAIN)
    return pb.SignInDomainAccountRequest(username=target.username)


async def complete_enrollment_request(case: Case) -> Message:
    target = await case.target()
    started = await case.stub.SignIn(
        pb.SignInRequest(username=target.username, password=target.password)
    )
    return pb.CompleteEnrollmentRequest(
        enrollment_ticket=started.enrollment.enrollment_ticket,
        code=target.next_code(started.enrollment.pending_key.secret_base32),
    )


async def confirm_regenerate_request(case: Case) -> Message:
    if case.actor.token is None or case.actor.secret is None:
        return pb.ConfirmRegenerateSecretRequest(code="123456")  # refused before it is read
    proof = case.actor.step_up() if case.protected else case.actor.metadata()
    begun = await case.stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=proof)
    return pb.ConfirmRegenerateSecretRequest(
        code=case.actor.next_code(begun.pending_key.secret_base32)
    )


async def generate_recovery_codes_request(case: Case) -> Message:
    if case.actor.token is None or case.actor.secret is None:
        return pb.GenerateRecoveryCodesRequest(code="123456")  # refused before it is read
    # A fresh code of the actor's key (a step-up proof, sent too, uses a later step).
    return pb.GenerateRecoveryCodesRequest(code=case.actor.next_code())


async def add_to_allowlist_request(case: Case) -> Message:
    target = await case.target()
    await case.stub.RemoveFromAllowlist(
        pb.RemoveFromAllowlistRequest(username=target.username), metadata=case.helper.step_up()
    )
    return pb.AddToAllowlistRequest(username=target.username)


async def verify_code_request(case: Case) -> Message:
    target = await case.enrolled_target()
    return pb.VerifyCodeRequest(username=target.username, code=target.next_code())


async def watch_audit_events_request(case: Case) -> Message:
    newest = await case.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1), metadata=case.helper.metadata()
    )
    # One event after it, so an allowed watch has something to send at once.
    await case.target("watched")
    return pb.WatchAuditEventsRequest(after_sequence=newest.events[0].sequence)


async def update_settings_request(case: Case) -> Message:
    current = await case.stub.GetSettings(pb.GetSettingsRequest(), metadata=case.helper.metadata())
    return pb.UpdateSettingsRequest(issuer_name=current.settings.issuer_name)


async def create_account_request(case: Case) -> Message:
    return pb.CreateAccountRequest(
        username=case.actors.name("created"),
        kind=enums_pb2.ACCOUNT_KIND_INTERNAL,
        password="a long enough password",
        protected=case.protected,
    )


async def import_secrets_request(case: Case) -> Message:
    """A file giving a fresh account (protected in the protected-target cases) a key."""
    target = await case.target()
    uri = f"otpauth://totp/Matrix:{quote(target.username)}?secret={pyotp.random_base32(32)}"
    return pb.ImportSecretsRequest(format=enums_pb2.IMPORT_FORMAT_OTPAUTH, content=uri.encode())


def constant(message: Message) -> Callable[[Case], Awaitable[Message]]:
    async def build(case: Case) -> Message:
        return message

    return build


def naming(
    request_type: Callable[..., Message], target: str = "target", **fields: Any
) -> Callable[[Case], Awaitable[Message]]:
    """A request naming a fresh account (`target`: "target" for a new allowlisted account,
    "enrolled", "excluded", or "with-right" for one holding the verify right)."""

    async def build(case: Case) -> Message:
        if target == "enrolled":
            person = await case.enrolled_target()
        elif target == "excluded":
            person = await case.target(excluded=True)
        elif target == "with-right":
            person = await case.target(rights=(VERIFY_RIGHT,))
        else:
            person = await case.target()
        return request_type(username=person.username, **fields)

    return build


REQUESTS: dict[str, Callable[[Case], Awaitable[Message]]] = {
    "SignIn": sign_in_request,
    "SignInDomainAccount": sign_in_domain_account_request,
    "CompleteEnrollment": complete_enrollment_request,
    "SignOut": constant(pb.SignOutRequest()),
    "ChangePassword": constant(
        pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a new long password")
    ),
    "BeginRegenerateSecret": constant(pb.BeginRegenerateSecretRequest()),
    "ConfirmRegenerateSecret": confirm_regenerate_request,
    "GenerateRecoveryCodes": generate_recovery_codes_request,
    "ResetSecret": naming(pb.ResetSecretRequest, "enrolled"),
    "DeleteSecret": naming(pb.DeleteSecretRequest, "enrolled"),
    "AddToAllowlist": add_to_allowlist_request,
    "RemoveFromAllowlist": naming(pb.RemoveFromAllowlistRequest),
    "ListAllowlist": constant(pb.ListAllowlistRequest(page_size=1)),
    "AddToExclusionList": naming(pb.AddToExclusionListRequest),
    "RemoveFromExclusionList": naming(pb.RemoveFromExclusionListRequest, "excluded"),
    "ListExclusionList": constant(pb.ListExclusionListRequest(page_size=1)),
    "ListAccounts": constant(pb.ListAccountsRequest(page_size=1)),
    "VerifyCode": verify_code_request,
    "GetAccountStatus": naming(pb.GetAccountStatusRequest),
    "ListAuditEvents": constant(pb.ListAuditEventsRequest(page_size=1)),
    "WatchAuditEvents": watch_audit_events_request,
    "GetSettings": constant(pb.GetSettingsRequest()),
    "UpdateSettings": update_settings_request,
    "CreateAccount": create_account_request,
    "SetAccountProtection": naming(pb.SetAccountProtectionRequest, protected=True),
    "GrantRight": naming(pb.GrantRightRequest, right=right_message(VERIFY_RIGHT)),
    "RevokeRight": naming(pb.RevokeRightRequest, "with-right", right=right_message(VERIFY_RIGHT)),
    "ImportSecrets": import_secrets_request,
}


async def make_actor(actors: Actors, kind: Actor) -> Person:
    if kind is Actor.ANONYMOUS:
        return Person("anonymous", clock=actors.clock)
    if kind is Actor.USER:
        return await actors.user()
    if kind is Actor.USER_WITHOUT_2FA:
        return await actors.user_without_2fa()
    if kind is Actor.ADMIN:
        return await actors.admin()
    if kind is Actor.ADMIN_WITHOUT_2FA:
        return await actors.admin_without_2fa()
    if kind in PROTECTED_TARGET:
        return await actors.admin(protected=True)
    if kind is Actor.VERIFYING_SERVICE:
        return await actors.service(VERIFY_RIGHT)
    assert kind is Actor.VOUCHING_SERVICE
    return await actors.service(VOUCH_RIGHT)


def metadata_of(actor: Person, kind: Actor) -> tuple[tuple[str, str], ...]:
    """What the actor sends; computed right before the call, so a step-up code is current."""
    if kind is Actor.ANONYMOUS:
        return ()
    if kind is Actor.ADMIN_PROTECTED_TARGET_WRONG_PROOF:
        return actor.metadata(
            x_step_up_password="not the right password", x_step_up_code=actor.next_code()
        )
    if kind is Actor.ADMIN_PROTECTED_TARGET_GOOD_PROOF:
        return actor.step_up()
    return actor.metadata()


async def invoke(
    stub: Stub, rpc: str, request: Message, metadata: tuple[tuple[str, str], ...]
) -> Expected:
    """The call's status code and ErrorInfo reason; for a server stream, its first message's."""
    method = getattr(stub, rpc)
    try:
        if SERVICE.methods_by_name[rpc].server_streaming:
            call = method(request, metadata=metadata)
            try:
                first = await asyncio.wait_for(call.read(), CALL_TIMEOUT_SECONDS)
            finally:
                call.cancel()
            assert first is not grpc.aio.EOF, f"{rpc} ended without sending anything"
        else:
            await method(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as error:
        return error.code(), error_reason(error)
    return OK


def test_every_rpc_has_an_expectation_and_a_request() -> None:
    assert sorted(EXPECTED) == sorted(RPCS), "add a row to EXPECTED for each new RPC"
    assert sorted(REQUESTS) == sorted(RPCS), "add a request builder for each new RPC"
    assert all(set(expected) == set(Actor) for expected in EXPECTED.values())


@pytest.fixture(scope="module")
async def helper(stub: Stub, runtime: Runtime, clock: TestClock) -> Person:
    """An administrator that prepares targets for every case of this module."""
    return await Actors(stub, runtime, clock, prefix=f"matrix-{uuid.uuid4().hex[:8]}").admin()


# Every case runs over native gRPC and over gRPC-Web through the web console's bridge: one
# enforcement path, so the two must answer alike.
TRANSPORTS = ("grpc", "grpc-web")
# RPCs whose call changes the calling actor itself (its session, password or key): the second
# transport gets a fresh actor. Every other case reuses the actor, which halves the accounts
# (and the password hashing) the doubled matrix costs.
CHANGES_THE_ACTOR = {"SignOut", "ChangePassword", "ConfirmRegenerateSecret"}


@pytest.mark.parametrize("kind", list(Actor), ids=[k.value for k in Actor])
@pytest.mark.parametrize("rpc", RPCS)
async def test_rpc_gives_the_documented_status_to_each_actor(
    actors: Actors, stub: Stub, web_stub: Stub, helper: Person, rpc: str, kind: Actor
) -> None:
    assert rpc in EXPECTED, f"{rpc} has no row in EXPECTED"
    assert rpc in REQUESTS, f"{rpc} has no request builder"
    callers = {"grpc": stub, "grpc-web": web_stub}
    outcomes: dict[str, Expected] = {}
    actor = await make_actor(actors, kind)
    for transport in TRANSPORTS:
        if outcomes and rpc in CHANGES_THE_ACTOR:
            actor = await make_actor(actors, kind)
        # Targets are prepared natively and afresh; the call under test goes over the transport.
        request = await REQUESTS[rpc](Case(actors, stub, helper, actor, kind))
        outcomes[transport] = await invoke(
            callers[transport], rpc, request, metadata_of(actor, kind)
        )

    assert outcomes == dict.fromkeys(TRANSPORTS, EXPECTED[rpc][kind])
