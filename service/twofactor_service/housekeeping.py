"""Background housekeeping of the attempt budget (store/attempts.py): attempts left open by a
process that died are closed, and failure counts with no attempt for a day
(`TWOFACTOR_LOCKOUT_FORGET_AFTER_SECONDS`) are forgotten, for accounts and unknown names alike,
so the counters of unknown names do not outlive those of accounts (which would tell them
apart) and their table stays small.

Every replica runs the loop; a transaction-level advisory lock lets one pass run at a time
(it is released with the transaction, so a lost connection or a failover never strands it).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from twofactor_service.config import LockoutPolicy
from twofactor_service.store import attempts

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 300.0
# An attempt still open after this long was never settled (its process died): far longer than
# any evaluation takes (argon2 waits in a short queue; statements time out after 30 s).
STALE_ATTEMPT_SECONDS = 300
# Any constant: the housekeeping pass, one replica at a time.
_ADVISORY_LOCK_KEY = 0x2FA_4B5E


async def forget_idle_counts(pool: asyncpg.Pool, policy: LockoutPolicy) -> tuple[int, int]:
    """One pass; (accounts reset, unknown-name rows deleted), (0, 0) when another replica
    holds the pass."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _ADVISORY_LOCK_KEY):
            return 0, 0
        return await attempts.forget_idle_counts(
            conn, policy.forget_after_seconds, STALE_ATTEMPT_SECONDS
        )


async def keep_house(
    pool: asyncpg.Pool, policy: LockoutPolicy, interval_seconds: float = INTERVAL_SECONDS
) -> None:
    """Runs a pass every `interval_seconds` until cancelled; an outage is logged and the
    next pass tries again."""
    while True:
        try:
            await forget_idle_counts(pool, policy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - try again next time, whatever went wrong
            log.warning("housekeeping pass failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval_seconds)
