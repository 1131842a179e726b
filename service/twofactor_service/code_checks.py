"""Checking a code against a stored key, with the replay rule and the failure counter.

A check's side effects (the consumed time step, the counted failure) are committed on their
own, before and outside the transaction of the change they guard, so a refused change still
counts the failure and a replayed code stays used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from twofactor_service import totp
from twofactor_service.errors import LockedOut
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, keys
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import StoredKey

# Bound into every ciphertext's associated data with the account id.
SECRET_PURPOSE = "totp-secret"  # noqa: S105 - a label, not a secret


class CodeCheck(enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    # Right code, but its time step was used before (SPEC §4): worth telling apart in metrics.
    REPLAYED = "replayed"


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
    newer one) a moment before, on any replica."""
    match = match_code(runtime, key, code)
    return match.step is not None and await keys.consume_step(conn, key.id, match.step)


async def ensure_account_not_locked(conn: Connection, account_id: int) -> None:
    remaining = await accounts.lock_remaining_seconds(conn, account_id)
    if remaining > 0:
        raise LockedOut(remaining)


async def count_failure(runtime: Runtime, conn: Connection, account_id: int) -> None:
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
