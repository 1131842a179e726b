"""Signing in (O6) in each of the four states, first-time enrollment, sign-out, password
change, and the step-up proof of account protection."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from twofactor_service import errors, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import (
    PendingKeyView,
    check_code,
    count_failure,
    ensure_account_not_locked,
)
from twofactor_service.passwords import hash_password_async, verify_password
from twofactor_service.rules import AccountKind, Actor, TwoFactorState
from twofactor_service.runtime import Runtime
from twofactor_service.secret_keys import make_pending_key
from twofactor_service.store import accounts, audit, keys, sessions
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.database import Connection

MAX_TICKET_LENGTH = 128


@dataclass(frozen=True)
class OpenedSession:
    token: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"OpenedSession(expires_at={self.expires_at!r})"


@dataclass(frozen=True)
class StartedEnrollment:
    ticket: str
    pending_key: PendingKeyView

    def __repr__(self) -> str:
        return "StartedEnrollment(<hidden>)"


SignInResult = OpenedSession | StartedEnrollment


async def _open_session(
    runtime: Runtime, conn: Connection, account_id: int, *, with_two_factor: bool
) -> OpenedSession:
    token, expires_at = await sessions.open_session(
        conn,
        account_id,
        signed_in_with_two_factor=with_two_factor,
        ttl_seconds=runtime.config.session_ttl_seconds,
    )
    return OpenedSession(token, expires_at)


async def _after_first_factor(
    runtime: Runtime, conn: Connection, caller: Caller, account: AccountRecord, code: str
) -> SignInResult:
    """The state machine of O6 once the first factor (password, or the directory's word) holds."""
    state = account.state
    if state is TwoFactorState.BLOCKED:
        raise errors.TwoFactorKeyDeleted()
    if state is TwoFactorState.ENROLLED:
        if not code:
            raise errors.CodeRequired()
        key = await keys.active(conn, account.id)
        if key is None or not await check_code(runtime, conn, key, code):
            await count_failure(runtime, conn, account.id)
            raise errors.InvalidCredentials()
    async with conn.transaction():
        await accounts.clear_failures(conn, account.id)
        if state is TwoFactorState.ALLOWLISTED:
            return await _start_enrollment(runtime, conn, caller, account)
        opened = await _open_session(
            runtime, conn, account.id, with_two_factor=state is TwoFactorState.ENROLLED
        )
        await audit.append(conn, caller.audit(account.username, reason="SESSION_OPENED"))
        return opened


async def _start_enrollment(
    runtime: Runtime, conn: Connection, caller: Caller, account: AccountRecord
) -> StartedEnrollment:
    """A pending key and the ticket that confirms it. Call inside a transaction."""
    key_id, view = await make_pending_key(runtime, conn, account.id, account.username)
    ticket = await sessions.open_ticket(
        conn, account.id, key_id, runtime.config.enrollment_ticket_ttl_seconds
    )
    await audit.append(conn, caller.audit(account.username, reason="ENROLLMENT_REQUIRED"))
    return StartedEnrollment(ticket, view)


async def begin_enrollment_at_terminal(
    runtime: Runtime, caller: Caller, username: str
) -> StartedEnrollment:
    """The operator's `twofactor enroll`: an allowlisted account's key is set up at the
    operator's terminal instead of at its first sign-in (no password is asked: the operator
    holds the database and the encryption keys anyway). The same rules as a sign-in: only an
    ALLOWLISTED account gets a pending key."""
    rules.validate_username(username)
    async with runtime.pool.acquire() as conn, conn.transaction():
        account = await accounts.lock(conn, username)
        if account is None:
            raise errors.AccountNotFound(username)
        refusals = {
            TwoFactorState.ENROLLED: (
                "ACCOUNT_HAS_KEY",
                "already has a secret key; reset it first (twofactor reset-key)",
            ),
            TwoFactorState.BLOCKED: (
                "NOT_ALLOWLISTED",
                "is not on the allowlist; add it first (twofactor allowlist add)",
            ),
            TwoFactorState.EXCLUDED: (
                "ACCOUNT_EXCLUDED",
                "is on the exclusion list and signs in without a key",
            ),
        }
        if account.state in refusals:
            reason, why = refusals[account.state]
            raise errors.RuleViolation(reason, f"account {account.username!r} {why}")
        return await _start_enrollment(runtime, conn, caller, account)


async def sign_in(
    runtime: Runtime, caller: Caller, username: str, password: str, code: str
) -> SignInResult:
    rules.validate_username(username)
    rules.validate_password(password)
    if code:
        rules.validate_code_shape(code)
    async with runtime.pool.acquire() as conn:
        account = await accounts.find(conn, username)
        if account is not None and account.kind is AccountKind.DOMAIN:
            account = None  # domain accounts sign in through SignInDomainAccount only
        if account is not None:
            await ensure_account_not_locked(conn, account.id)
        # Unknown accounts spend the same argon2 time and get the same answer.
        if not await verify_password(account.password_hash if account else None, password):
            if account is not None:
                await count_failure(runtime, conn, account.id)
            raise errors.InvalidCredentials()
        assert account is not None
        return await _after_first_factor(runtime, conn, caller, account, code)


async def sign_in_domain_account(
    runtime: Runtime, caller: Caller, username: str, code: str
) -> SignInResult:
    """O6 for DOMAIN accounts, vouched for by a service account after the directory checked
    the password: only the code is asked."""
    rules.validate_username(username)
    if code:
        rules.validate_code_shape(code)
    async with runtime.pool.acquire() as conn:
        account = await accounts.find(conn, username)
        if account is None:
            raise errors.AccountNotFound(username)
        if account.kind is not AccountKind.DOMAIN:
            raise errors.RuleViolation(
                "NOT_DOMAIN_ACCOUNT",
                f"account {account.username!r} is an internal account; it signs in with SignIn",
            )
        await ensure_account_not_locked(conn, account.id)
        return await _after_first_factor(runtime, conn, caller, account, code)


def _invalid_ticket() -> errors.RuleViolation:
    return errors.RuleViolation(
        "ENROLLMENT_TICKET_INVALID",
        "the enrollment ticket is unknown, expired or already used; sign in again",
    )


async def complete_enrollment(
    runtime: Runtime, caller: Caller, ticket: str, code: str
) -> OpenedSession:
    """A valid code of the pending key activates it, takes the account off the allowlist and
    opens a session."""
    opened = await _complete_enrollment(runtime, caller, ticket, code, open_session=True)
    assert opened is not None
    return opened


async def complete_enrollment_at_terminal(
    runtime: Runtime, caller: Caller, ticket: str, code: str
) -> None:
    """As complete_enrollment, for `twofactor enroll`: the key is activated, nobody signs in."""
    await _complete_enrollment(runtime, caller, ticket, code, open_session=False)


async def _complete_enrollment(
    runtime: Runtime, caller: Caller, ticket: str, code: str, *, open_session: bool
) -> OpenedSession | None:
    if not ticket:
        raise errors.InvalidArgument("enrollment_ticket", "is required")
    if len(ticket) > MAX_TICKET_LENGTH:
        raise errors.InvalidArgument(
            "enrollment_ticket", f"must be at most {MAX_TICKET_LENGTH} characters"
        )
    rules.validate_code_shape(code)
    async with runtime.pool.acquire() as conn:
        found = await sessions.take_ticket(conn, ticket)
        key = await keys.by_id(conn, found[1]) if found else None
        if found is None or key is None:
            raise _invalid_ticket()
        account_id = found[0]
        await ensure_account_not_locked(conn, account_id)
        if not await check_code(runtime, conn, key, code):
            await count_failure(runtime, conn, account_id)
            raise errors.RuleViolation(
                "CODE_INVALID",
                "the code does not match the new key; check the authenticator app's clock "
                "and try the next code",
            )
        async with conn.transaction():
            # The account row first, as a reset or delete takes it: racing them, one waits.
            await accounts.lock_by_id(conn, account_id)
            # The ticket is single-use: whoever deletes it first completes the enrollment.
            if await sessions.take_ticket(conn, ticket) is None:
                raise _invalid_ticket()
            await sessions.end_ticket(conn, ticket)
            if not await keys.activate_pending(conn, key.id):
                raise _invalid_ticket()
            account = await accounts.find_by_id(conn, account_id)
            await accounts.set_lists(conn, account_id, allowlisted=False, excluded=False)
            await accounts.clear_failures(conn, account_id)
            if not open_session:
                await audit.append(conn, caller.audit(account.username, reason="KEY_ACTIVATED"))
                return None
            opened = await _open_session(runtime, conn, account_id, with_two_factor=True)
            await audit.append(conn, caller.audit(account.username, reason="SESSION_OPENED"))
            return opened


async def sign_out(runtime: Runtime, caller: Caller) -> None:
    actor = caller.signed_in()
    async with runtime.pool.acquire() as conn, conn.transaction():
        await sessions.end(conn, actor.session_id)
        await audit.append(conn, caller.audit(actor.username))


async def change_password(
    runtime: Runtime, caller: Caller, current_password: str, new_password: str
) -> None:
    """Changes an INTERNAL account's password and ends its other sessions."""
    actor = caller.signed_in()
    rules.validate_password(current_password, "current_password")
    rules.validate_new_password(new_password, "new_password")
    if actor.kind is not AccountKind.INTERNAL:
        raise errors.RuleViolation(
            "NOT_INTERNAL_ACCOUNT", "a domain account's password is changed in its directory"
        )
    async with runtime.pool.acquire() as conn:
        account = await accounts.find_by_id(conn, actor.account_id)
        await ensure_account_not_locked(conn, account.id)
        if not await verify_password(account.password_hash, current_password):
            await count_failure(runtime, conn, account.id)
            raise errors.InvalidCredentials()
        new_hash = await hash_password_async(new_password)
        async with conn.transaction():
            await accounts.set_password_hash(conn, account.id, new_hash)
            await sessions.end_all(conn, account.id, except_hash=actor.session_id)
            await audit.append(conn, caller.audit(account.username))


async def verify_step_up(
    runtime: Runtime, actor: Actor, target: str, *, password: str | None, code: str | None
) -> None:
    """Account protection: a change to a protected account needs the actor's own credentials
    and a current code of the actor's own key. The code is used up; a failure counts toward the
    actor's lockout."""
    async with runtime.pool.acquire() as conn:
        target_account = await accounts.find(conn, target)
        if target_account is None or not target_account.protected:
            return  # an unknown target is reported by the operation itself
        needs_password = actor.kind is AccountKind.INTERNAL
        if not code or (needs_password and not password):
            raise errors.StepUpRequired(target_account.username)
        me = await accounts.find_by_id(conn, actor.account_id)
        await ensure_account_not_locked(conn, me.id)
        proven = code.isascii() and code.isdigit()
        if proven and needs_password:
            proven = await verify_password(me.password_hash, password or "")
        key = await keys.active(conn, me.id) if proven else None
        if key is None or not await check_code(runtime, conn, key, code):
            await count_failure(runtime, conn, me.id)
            raise errors.StepUpFailed()
        await accounts.clear_failures(conn, me.id)
