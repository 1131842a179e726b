"""Checking a code against a stored key, with the replay rule and the failure counter.

A check's side effects (the consumed time step, the counted failure) are committed on their
own, before and outside the transaction of the change they guard, so a refused change still
counts the failure and a replayed code stays used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from twofactor_service import totp
from twofactor_service.errors import LockedOut
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, keys
from twofactor_service.store.keys import StoredKey

# Bound into every ciphertext's associated data with the account id.
SECRET_PURPOSE = "totp-secret"


async def check_code(runtime: Runtime, conn: asyncpg.Connection, key: StoredKey, code: str) -> bool:
    """True when `code` is valid now for `key` and its time step was not used before; that
    step is then used up (SPEC §4)."""
    if len(code) != key.parameters.digits:
        return False
    secret = runtime.key_ring.open(key.sealed, account_id=key.account_id, purpose=SECRET_PURPOSE)
    step = totp.matching_step(
        secret,
        key.parameters,
        code,
        now=runtime.clock(),
        window=runtime.config.totp.valid_window,
        after_step=key.last_used_step,
    )
    return step is not None and await keys.consume_step(conn, key.id, step)


def ensure_not_locked(locked_until: datetime | None, now: datetime) -> None:
    """During a lockout nothing is checked, not even a correct code (RFC 4226 §7.3)."""
    if locked_until is not None and locked_until > now:
        raise LockedOut((locked_until - now).total_seconds())


async def ensure_account_not_locked(conn: asyncpg.Connection, account_id: int) -> None:
    remaining = await accounts.lock_remaining_seconds(conn, account_id)
    if remaining > 0:
        raise LockedOut(remaining)


async def count_failure(runtime: Runtime, conn: asyncpg.Connection, account_id: int) -> None:
    await accounts.record_failure(conn, account_id, runtime.lockout_schedule)


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
