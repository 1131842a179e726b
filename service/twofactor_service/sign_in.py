"""Signing in (O6) in each of the four states, first-time enrollment, sign-out, password
change, and the step-up proof of account protection."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from twofactor_service import errors, recovery_codes, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import (
    Attempt,
    PendingKeyView,
    check_code,
    match_code,
    pay,
    pay_for_name,
    settled,
)
from twofactor_service.rules import AccountKind, TwoFactorState
from twofactor_service.runtime import Runtime
from twofactor_service.secret_keys import make_pending_key
from twofactor_service.store import accounts, audit, keys, sessions
from twofactor_service.store import recovery_codes as stored_recovery_codes
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import StoredKey
from twofactor_service.store.recovery_codes import StoredRecoveryCode

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


@dataclass(frozen=True)
class SecondFactor:
    """What a sign-in carries for the second factor: a TOTP code, or a recovery code
    (normalised, recovery_codes.normalise), or neither."""

    code: str = ""
    recovery_code: str = ""

    def __repr__(self) -> str:
        return "SecondFactor(<hidden>)"


def second_factor(code: str, recovery_code: str) -> SecondFactor:
    """Checks the shapes before anything is read, so bad input answers alike for every name."""
    if code and recovery_code:
        raise errors.InvalidArgument("recovery_code", "send either code or recovery_code, not both")
    if code:
        rules.validate_code_shape(code)
    if recovery_code:
        return SecondFactor(recovery_code=recovery_codes.normalise(recovery_code))
    return SecondFactor(code=code)


async def _after_first_factor(
    runtime: Runtime,
    caller: Caller,
    attempt: Attempt,
    account: AccountRecord,
    key: StoredKey | None,
    unused_recovery_codes: tuple[StoredRecoveryCode, ...],
    factor: SecondFactor,
) -> SignInResult:
    """The state machine of O6 once the first factor (password, or the directory's word) holds.
    `key` is the active key and `unused_recovery_codes` the recovery codes, as read with the
    account."""
    state = account.state
    if state is TwoFactorState.BLOCKED:
        raise errors.TwoFactorKeyDeleted()
    # (key id, time step) the code matched, to use up; or the recovery code's id.
    matched: tuple[int, int] | None = None
    recovery_code_id: int | None = None
    if state is TwoFactorState.ENROLLED:
        if factor.recovery_code:
            # Found in memory, like a wrong TOTP code: no round trip tells a right password.
            recovery_code_id = recovery_codes.matching_code(
                unused_recovery_codes, factor.recovery_code
            )
            if recovery_code_id is None:
                raise errors.InvalidCredentials(audit_reason="RECOVERY_CODE_INVALID")
        else:
            if not factor.code:
                raise errors.CodeRequired()
            # A wrong code is known without a round trip: it costs what a wrong password costs.
            step = match_code(runtime, key, factor.code).step if key is not None else None
            if key is None or step is None:
                raise errors.InvalidCredentials()
            matched = (key.id, step)
    async with runtime.pool.acquire() as conn:
        if matched is not None and not await keys.consume_step(conn, *matched):
            raise errors.InvalidCredentials()  # used a moment ago, on any replica
        # Used up on its own, before the session, as a time step is: once, on any replica.
        if recovery_code_id is not None and not await stored_recovery_codes.use(
            conn, recovery_code_id
        ):
            raise errors.InvalidCredentials(audit_reason="RECOVERY_CODE_INVALID")
        async with conn.transaction():
            # Settling takes the account row first, as a reset or delete does.
            await attempt.succeed(conn)
            if state is TwoFactorState.ALLOWLISTED:
                return await _start_enrollment(runtime, conn, caller, account)
            opened = await _open_session(
                runtime, conn, account.id, with_two_factor=state is TwoFactorState.ENROLLED
            )
            reason = "RECOVERY_CODE_USED" if recovery_code_id is not None else "SESSION_OPENED"
            await audit.append(conn, caller.audit(account.username, reason=reason))
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
    runtime: Runtime,
    caller: Caller,
    username: str,
    password: str,
    code: str,
    recovery_code: str = "",
) -> SignInResult:
    rules.validate_username(username)
    rules.validate_password(password)
    factor = second_factor(code, recovery_code)
    checks = runtime.password_checks
    async with checks.slot(through_console=caller.through_console):
        async with runtime.pool.acquire() as conn:
            found = await accounts.find_with_active_key(conn, username)
            if found is not None and found[0].kind is AccountKind.DOMAIN:
                found = None  # domain accounts sign in through SignInDomainAccount only
            # Unknown names pay on a counter of their own that locks alike, spend the same
            # argon2 time, take the same round trips and get the same answers.
            ticket = await pay_for_name(runtime, conn, username, found[0].id if found else None)
        # No connection is held while argon2 runs.
        right = await checks.verify(found[0].password_hash if found else None, password)
    async with settled(runtime, caller, username, ticket) as attempt:
        if not right:
            raise errors.InvalidCredentials()
        assert found is not None
        return await _after_first_factor(runtime, caller, attempt, *found, factor)


async def sign_in_domain_account(
    runtime: Runtime, caller: Caller, username: str, code: str, recovery_code: str = ""
) -> SignInResult:
    """O6 for DOMAIN accounts, vouched for by a service account after the directory checked
    the password: only the code (or a recovery code) is asked."""
    rules.validate_username(username)
    factor = second_factor(code, recovery_code)
    async with runtime.pool.acquire() as conn:
        found = await accounts.find_with_active_key(conn, username)
        if found is None:
            raise errors.AccountNotFound(username)
        account, key, unused = found
        if account.kind is not AccountKind.DOMAIN:
            raise errors.RuleViolation(
                "NOT_DOMAIN_ACCOUNT",
                f"account {account.username!r} is an internal account; it signs in with SignIn",
            )
        ticket = await pay(runtime, conn, account.id)
    async with settled(runtime, caller, account.username, ticket) as attempt:
        return await _after_first_factor(runtime, caller, attempt, account, key, unused, factor)


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
        owner = await accounts.find_by_id(conn, found[0])
        paid = await pay(runtime, conn, owner.id)
    async with (
        settled(runtime, caller, owner.username, paid) as attempt,
        runtime.pool.acquire() as conn,
    ):
        if not await check_code(runtime, conn, key, code):
            raise errors.RuleViolation(
                "CODE_INVALID",
                "the code does not match the new key; check the authenticator app's clock "
                "and try the next code",
            )
        async with conn.transaction():
            # The account row first, as a reset or delete takes it: racing them, one waits.
            await accounts.lock_by_id(conn, owner.id)
            # The ticket is single-use: whoever deletes it first completes the enrollment.
            if await sessions.take_ticket(conn, ticket) is None:
                raise _invalid_ticket()
            await sessions.end_ticket(conn, ticket)
            if not await keys.activate_pending(conn, key.id):
                raise _invalid_ticket()
            await accounts.set_lists(conn, owner.id, allowlisted=False, excluded=False)
            await attempt.succeed(conn)
            if not open_session:
                await audit.append(conn, caller.audit(owner.username, reason="KEY_ACTIVATED"))
                return None
            opened = await _open_session(runtime, conn, owner.id, with_two_factor=True)
            await audit.append(conn, caller.audit(owner.username, reason="SESSION_OPENED"))
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
    checks = runtime.password_checks
    async with checks.slot(through_console=caller.through_console):
        async with runtime.pool.acquire() as conn:
            account = await accounts.find_by_id(conn, actor.account_id)
            ticket = await pay(runtime, conn, account.id)
        right = await checks.verify(account.password_hash, current_password)
    async with settled(runtime, caller, account.username, ticket) as attempt:
        if not right:
            raise errors.InvalidCredentials()
        new_hash = await checks.hash(new_password)
        async with runtime.pool.acquire() as conn, conn.transaction():
            await attempt.succeed(conn)
            await accounts.set_password_hash(conn, account.id, new_hash)
            await sessions.end_all(conn, account.id, except_hash=actor.session_id)
            await audit.append(conn, caller.audit(account.username))


async def verify_step_up(
    runtime: Runtime,
    caller: Caller,
    target: str,
    *,
    password: str | None,
    code: str | None,
) -> bool:
    """Account protection: a change to a protected account needs the actor's own credentials
    and a current code of the actor's own key. The proof is paid for on the actor's account
    before it is looked at, and its code is used up. A failed proof is recorded against the
    call's target, as the refused call itself would be. True when a proof was asked and held;
    False when the target is not protected (nothing was asked)."""
    actor = caller.signed_in()
    async with runtime.pool.acquire() as conn:
        target_account = await accounts.find(conn, target)
    if target_account is None or not target_account.protected:
        return False  # an unknown target is reported by the operation itself
    needs_password = actor.kind is AccountKind.INTERNAL
    if not code or (needs_password and not password):
        raise errors.StepUpRequired(target_account.username)
    checks = runtime.password_checks
    async with checks.slot(through_console=caller.through_console):
        async with runtime.pool.acquire() as conn:
            me = await accounts.find_by_id(conn, actor.account_id)
            ticket = await pay(runtime, conn, me.id)
        proven = code.isascii() and code.isdigit()
        if proven and needs_password:
            proven = await checks.verify(me.password_hash, password or "")
    async with (
        settled(runtime, caller, target_account.username, ticket) as attempt,
        runtime.pool.acquire() as conn,
    ):
        key = await keys.active(conn, me.id) if proven else None
        if key is None or not await check_code(runtime, conn, key, code):
            raise errors.StepUpFailed()
        await attempt.succeed(conn)
    return True
