"""Checking secrets under the attempt budget (store/attempts.py): pay, then look.

Every check of a password, a code or a step-up proof starts with `pay`, which refuses at once
(LockedOut) while a lockout is in force, and otherwise opens the attempt, counted as failed
until it is settled: the check runs inside `settled`, which records a refusal as a failure
with its audit event, while a success is settled in the transaction that grants it. The side
effects of a code check (the consumed time step) are committed on their own, before and outside
the transaction of the change they guard, so a replayed code stays used.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from twofactor_service import totp
from twofactor_service.caller import Caller
from twofactor_service.errors import LockedOut, TwoFactorError
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, attempts, keys
from twofactor_service.store.attempts import Ticket
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import StoredKey

# Bound into every ciphertext's associated data with the account id.
SECRET_PURPOSE = "totp-secret"  # noqa: S105 - a label, not a secret


class CodeCheck(enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    # Right code, but its time step was used before (SPEC §4): worth telling apart in metrics.
    REPLAYED = "replayed"


async def pay(runtime: Runtime, conn: Connection, account_id: int) -> Ticket:
    """Pays for one attempt on the account; LockedOut, with nothing paid, while it is locked."""
    paid = await attempts.pay_for_account(conn, account_id, runtime.lockout_schedule)
    if isinstance(paid, attempts.Refused):
        raise LockedOut(paid.retry_after_seconds)
    return paid


async def pay_for_name(
    runtime: Runtime, conn: Connection, username: str, account_id: int | None
) -> Ticket:
    """Pays for a sign-in attempt on `username`: on its account when it has one, else on the
    counter of unknown names, which locks alike (the lockout must not tell them apart)."""
    if account_id is not None:
        return await pay(runtime, conn, account_id)
    paid = await attempts.pay_for_unknown_name(
        conn,
        accounts.username_key(username),
        runtime.lockout_schedule,
        runtime.config.lockout.unknown_name_buckets,
    )
    if isinstance(paid, attempts.Refused):
        raise LockedOut(paid.retry_after_seconds)
    return paid


class Attempt:
    """A paid attempt being evaluated; `settled` settles it (store/attempts.py)."""

    def __init__(self, runtime: Runtime, ticket: Ticket) -> None:
        self.runtime = runtime
        self.ticket = ticket
        self.succeeded = False

    async def succeed(self, conn: Connection) -> None:
        """Clears the failures: call in the transaction that grants the success, after its last
        check and before its audit event."""
        await attempts.settle_success(conn, self.ticket, self.runtime.config.lockout.free_failures)
        self.succeeded = True


@contextlib.asynccontextmanager
async def settled(
    runtime: Runtime, caller: Caller, name: str, ticket: Ticket
) -> AsyncIterator[Attempt]:
    """Evaluates a paid attempt in the block: the block calls `succeed` where the secret holds;
    a refusal it raises settles the attempt as failed, with the refusal's audit event (so the
    error is not audited again). An unexpected error leaves the attempt open (counted as failed)
    until the housekeeping closes it."""
    attempt = Attempt(runtime, ticket)
    try:
        yield attempt
    except TwoFactorError as error:
        if not attempt.succeeded:
            event = caller.audit(name, success=False, reason=error.audited_reason)
            async with runtime.pool.acquire() as conn:
                await attempts.settle_failure(conn, ticket, event)
            error.audited = False
        raise
    assert attempt.succeeded, "a paid attempt ended without success or refusal"


def match_code(runtime: Runtime, key: StoredKey, code: str) -> totp.StepMatch:
    """Which unused time step of `key` the code matches now; nothing is used up yet (the
    caller consumes the step: keys.consume_step)."""
    if len(code) != key.parameters.digits:
        return totp.StepMatch(None, replayed=False)
    secret = runtime.key_ring.open(key.sealed, account_id=key.account_id, purpose=SECRET_PURPOSE)
    return totp.matching_step(
        secret,
        key.parameters,
        code,
        now=runtime.clock(),
        window=runtime.config.totp.valid_window,
        after_step=key.last_used_step,
    )


async def check_code(runtime: Runtime, conn: Connection, key: StoredKey, code: str) -> bool:
    """True when `code` is valid now for `key` and its time step was not used before; that
    step is then used up (SPEC §4). False too when another call used the same step (or a
    newer one) a moment before, on any replica. Pay for the attempt first."""
    match = match_code(runtime, key, code)
    return match.step is not None and await keys.consume_step(conn, key.id, match.step)


@dataclass(frozen=True)
class PendingKeyView:
    """A pending key as shown once to its owner."""

    secret: totp.SecretKey
    parameters: totp.KeyParameters
    provisioning_uri: str
    qr_png: bytes
    qr_svg: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"PendingKeyView(expires_at={self.expires_at!r})"
