"""The attempt budget (SPEC §4): an attempt is paid for before any secret is looked at.

The rule: for every account, however many calls arrive at once over however many replicas,
between two successes at most `free_failures` evaluations of a secret (a password, a code, a
step-up proof) may fail before the lockout starts; while the account is locked no secret is
evaluated and no attempt is admitted.

The design, in three steps:

1. **Pay.** One conditional UPDATE of the account row checks the lockout and, in the same
   atomic step, opens the attempt (`attempts_open + 1`). An open attempt counts as a failure
   until it is settled, so the schedule reads `failed_attempts + attempts_open`: the attempt
   that would be the `free_failures`-th failure starts the lockout as it is paid for.
   Concurrent payments serialise on the row lock, and each re-checks the lockout on the newest
   row (READ COMMITTED re-evaluates the WHERE clause after waiting), so a burst cannot overdraw
   the budget, on one replica or many. A refused payment (locked) evaluates nothing.
2. **Look.** The secret is evaluated with no database connection held (argon2 runs for tens
   of milliseconds).
3. **Settle**, in one statement with the attempt's audit event. A failure moves the attempt
   from open to failed (the count the schedule reads does not change). A success clears the
   failures; the attempts still open stay counted, and the lockout is lifted unless they alone
   make `free_failures`.

Since each attempt's audit event is written in the statement that settles it, after its row
lock, the audit log shows the attempts of an account in the order they were settled, and that
order keeps the rule: between two successes at most `free_failures` failures, and a success
only while fewer than `free_failures` failures precede it in its window (every attempt that is
open or failed since the last success is counted when the next one is admitted).

An attempt that is never settled (its process died) stays open, so counted as failed, until
the housekeeping closes attempts open for longer than any evaluation takes. Counts idle for
`forget_after_seconds` (a day by default) are forgotten, for accounts and unknown names alike.

**Unknown names** (at SignIn: names that are not INTERNAL accounts) are paid for in the same
way, with the same round trips, on counters kept per bucket of a keyed hash of the name
(migration 003), so an unknown name locks after the same failures, with the same delays, as an
account does, and the lockout does not tell which names exist. The table has at most
`unknown_name_buckets` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from twofactor_service.store.audit import AuditEntry
from twofactor_service.store.database import Connection

# $1: account id, $2: the lockout schedule (rules.lockout_schedule). Whether it was paid, and
# the lockout's remaining seconds. Writes nothing while locked: a write would make the refusal
# wait for a WAL flush, and take longer than an unknown name's.
_PAY_FOR_ACCOUNT = """
    WITH paid AS (
        UPDATE accounts
        SET attempts_open = attempts_open + 1,
            last_attempt_at = now(),
            locked_until = coalesce(
                now() + lockout_delay(failed_attempts + attempts_open + 1, $2::int[]),
                locked_until)
        WHERE id = $1 AND (locked_until IS NULL OR locked_until <= now())
        RETURNING id
    )
    SELECT NULL::integer AS bucket, EXISTS (SELECT FROM paid) AS paid,
           (SELECT extract(epoch FROM locked_until - now())::float8
            FROM accounts WHERE id = $1) AS lock_remaining
"""

# $1: the name's username key, $2: the schedule, $3: the number of buckets. The same answer,
# in one round trip, as _PAY_FOR_ACCOUNT. A bucket's first attempt inserts its row; of two
# first attempts at once one inserts and the other finds neither a row to update nor room to
# insert, and pays again (pay_for_unknown_name).
_PAY_FOR_UNKNOWN_NAME = """
    WITH name AS (SELECT unknown_name_bucket($1, $3) AS bucket),
    paid AS (
        UPDATE unknown_name_attempts u
        SET attempts_open = u.attempts_open + 1,
            last_attempt_at = now(),
            locked_until = coalesce(
                now() + lockout_delay(u.failed_attempts + u.attempts_open + 1, $2::int[]),
                u.locked_until)
        FROM name
        WHERE u.bucket = name.bucket AND (u.locked_until IS NULL OR u.locked_until <= now())
        RETURNING u.bucket
    ),
    first AS (
        INSERT INTO unknown_name_attempts (bucket, attempts_open, last_attempt_at, locked_until)
        SELECT bucket, 1, now(), now() + lockout_delay(1, $2::int[]) FROM name
        WHERE NOT EXISTS (SELECT FROM unknown_name_attempts u WHERE u.bucket = name.bucket)
        ON CONFLICT (bucket) DO NOTHING
        RETURNING bucket
    )
    SELECT (SELECT bucket FROM name) AS bucket,
           EXISTS (SELECT FROM paid) OR EXISTS (SELECT FROM first) AS paid,
           (SELECT extract(epoch FROM u.locked_until - now())::float8
            FROM unknown_name_attempts u JOIN name USING (bucket)) AS lock_remaining
"""

# The failure of an open attempt, and its audit event after it ($1: account id or bucket;
# $2..$7: actor, target, operation, reason, request id, peer).
_SETTLE_FAILURE = """
    WITH settled AS (
        UPDATE {table}
        SET failed_attempts = failed_attempts + 1, attempts_open = greatest(attempts_open - 1, 0)
        WHERE {key} = $1
        RETURNING 1
    )
    INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id, peer)
    SELECT $2, $3, $4, 'FAILURE', $5, $6, $7 FROM (SELECT count(*) FROM settled) AS after
"""
_SETTLE_ACCOUNT_FAILURE = _SETTLE_FAILURE.format(table="accounts", key="id")
_SETTLE_UNKNOWN_NAME_FAILURE = _SETTLE_FAILURE.format(table="unknown_name_attempts", key="bucket")

# $1: account id, $2: free failures.
_SETTLE_SUCCESS = """
    UPDATE accounts
    SET failed_attempts = 0,
        attempts_open = greatest(attempts_open - 1, 0),
        locked_until = CASE WHEN attempts_open - 1 >= $2 THEN locked_until END
    WHERE id = $1
"""


@dataclass(frozen=True)
class Ticket:
    """A paid attempt: on an account, or on the bucket of an unknown name."""

    account_id: int | None
    bucket: int | None = None


@dataclass(frozen=True)
class Refused:
    """The lockout is in force: nothing was paid and nothing may be evaluated."""

    retry_after_seconds: float


async def pay_for_account(
    conn: Connection, account_id: int, schedule: list[int]
) -> Ticket | Refused:
    return _paid(account_id, await conn.fetchrow(_PAY_FOR_ACCOUNT, account_id, schedule))


async def pay_for_unknown_name(
    conn: Connection, username_key: str, schedule: list[int], buckets: int
) -> Ticket | Refused:
    row = await conn.fetchrow(_PAY_FOR_UNKNOWN_NAME, username_key, schedule, buckets)
    if row is not None and not row["paid"] and row["lock_remaining"] is None:
        # Another first attempt on this bucket inserted its row a moment ago: pay on it.
        row = await conn.fetchrow(_PAY_FOR_UNKNOWN_NAME, username_key, schedule, buckets)
    return _paid(None, row)


def _paid(account_id: int | None, row: asyncpg.Record | None) -> Ticket | Refused:
    assert row is not None
    if not row["paid"]:
        # The remaining time was read as the statement began: a lockout that another call
        # started a moment later reads as over. Try again in a second, then.
        return Refused(max(row["lock_remaining"] or 0.0, 1.0))
    return Ticket(account_id, row["bucket"])


async def settle_failure(conn: Connection, ticket: Ticket, event: AuditEntry) -> None:
    """The attempt failed: counted, and recorded with `event` (its reason) in one statement."""
    if ticket.account_id is not None:
        statement, key = _SETTLE_ACCOUNT_FAILURE, ticket.account_id
    else:
        assert ticket.bucket is not None
        statement, key = _SETTLE_UNKNOWN_NAME_FAILURE, ticket.bucket
    await conn.execute(
        statement,
        key,
        event.actor,
        event.target,
        event.operation,
        event.reason,
        event.request_id,
        event.peer,
    )


async def settle_success(conn: Connection, ticket: Ticket, free_failures: int) -> None:
    """The attempt succeeded: the failures are cleared. Call in the transaction that grants the
    success, and write its audit event after this (in that transaction)."""
    assert ticket.account_id is not None, "an unknown name never succeeds"
    await conn.execute(_SETTLE_SUCCESS, ticket.account_id, free_failures)


async def forget_idle_counts(
    conn: Connection, idle_seconds: int, stale_seconds: int
) -> tuple[int, int]:
    """The housekeeping pass. Attempts open for `stale_seconds` were never settled (their
    process died): closed. Counts with no attempt for `idle_seconds` are forgotten, unless a
    lockout still runs. Returns (accounts reset, unknown-name rows deleted)."""
    for table in ("accounts", "unknown_name_attempts"):
        await conn.execute(
            f"UPDATE {table} SET attempts_open = 0"
            " WHERE attempts_open > 0 AND last_attempt_at < now() - make_interval(secs => $1)",
            stale_seconds,
        )
    reset = await conn.execute(
        """
        UPDATE accounts SET failed_attempts = 0, attempts_open = 0
        WHERE (failed_attempts > 0 OR attempts_open > 0)
          AND last_attempt_at < now() - make_interval(secs => $1)
          AND (locked_until IS NULL OR locked_until <= now())
        """,
        idle_seconds,
    )
    deleted = await conn.execute(
        """
        DELETE FROM unknown_name_attempts
        WHERE last_attempt_at < now() - make_interval(secs => $1)
          AND (locked_until IS NULL OR locked_until <= now())
        """,
        idle_seconds,
    )
    return int(reset.split()[-1]), int(deleted.split()[-1])
