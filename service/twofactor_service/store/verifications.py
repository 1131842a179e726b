"""VerifyCode's two statements, each for a whole batch of calls (group commit, verification.py).

1. `pay`: for every call, the account, its active key, and the attempt paid for (or refused
   while locked), in one statement: store/attempts.py's rule over an array of names.
2. `settle`: for every call, the time step used up when its code matched, the success's
   settlement, and the audit event of the attempt, in one statement: one round trip and one
   commit (one WAL flush) for the whole batch.

Lock order. Both statements lock the batch's account rows in id order before anything else,
and a key row only after its account's row: the order of every transaction that changes keys
(the administrator's reset takes the account, then its keys). So two replicas' batches, or a
batch and an administrator, never wait on each other in a cycle. A batch holds each account
once (the batcher keeps a second call for the same account for the next batch): one statement
cannot update one row twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twofactor_service.store import keys
from twofactor_service.store.audit import AuditEntry
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import StoredKey

# $1: username keys, $2: the codes' lengths, $3: the lockout schedule. An attempt is paid for
# only when the code has as many digits as the key's codes (a malformed call changes nothing).
_PAY = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::int[]) AS i(username_key, code_length)
),
target AS MATERIALIZED (
    SELECT a.id, a.locked_until, i.username_key, k.digits
    FROM input i
    JOIN accounts a ON a.username_key = i.username_key
    LEFT JOIN secret_keys k ON k.account_id = a.id AND k.state = 'ACTIVE'
    ORDER BY a.id
    FOR UPDATE OF a
),
paid AS (
    UPDATE accounts a
    SET attempts_open = a.attempts_open + 1,
        last_attempt_at = now(),
        locked_until = coalesce(
            now() + lockout_delay(a.failed_attempts + a.attempts_open + 1, $3::int[]),
            a.locked_until)
    FROM target t JOIN input i USING (username_key)
    WHERE a.id = t.id
      AND (t.locked_until IS NULL OR t.locked_until <= now())
      AND (t.digits IS NULL OR t.digits = i.code_length)
    RETURNING a.id
)
SELECT t.username_key, t.id AS target_id, a.username, (p.id IS NOT NULL) AS paid,
       greatest(0, extract(epoch FROM t.locked_until - now()))::float8 AS lock_remaining,
       {keys.columns("k", prefix="key_")}
FROM target t
JOIN accounts a ON a.id = t.id
LEFT JOIN paid p ON p.id = t.id
LEFT JOIN secret_keys k ON k.account_id = t.id AND k.state = 'ACTIVE'
"""


@dataclass(frozen=True)
class Paid:
    """One call's account after paying: `paid` False when nothing was paid (locked, or the
    code's length does not fit the key)."""

    account_id: int
    username: str
    paid: bool
    lock_remaining_seconds: float
    key: StoredKey | None


async def pay(
    conn: Connection, username_keys: Sequence[str], code_lengths: Sequence[int], schedule: list[int]
) -> dict[str, Paid]:
    """Pays for one attempt per name (all distinct); names without an account are missing."""
    rows = await conn.fetch(_PAY, username_keys, code_lengths, schedule)
    return {
        row["username_key"]: Paid(
            account_id=row["target_id"],
            username=row["username"],
            paid=row["paid"],
            lock_remaining_seconds=row["lock_remaining"] or 0.0,
            key=keys.from_row(row, prefix="key_") if row["key_id"] is not None else None,
        )
        for row in rows
    }


# $1..$4: per call, the account, whether an attempt was paid, the key and the matched step
# (NULL: no match); $5..$10: the audit event's fields, `reason` used when the call fails;
# $11: free failures. The audit events are made from the settled rows, after their row locks,
# so an account's events are in the order its attempts were settled (store/attempts.py).
_SETTLE = """
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::bool[], $3::bigint[], $4::bigint[],
                         $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
        WITH ORDINALITY
        AS i(account_id, paid, key_id, step, actor, target, operation, reason, request_id,
             peer, ord)
),
locked AS MATERIALIZED (
    SELECT a.id FROM accounts a JOIN input i ON i.account_id = a.id
    WHERE i.paid
    ORDER BY a.id
    FOR UPDATE OF a
),
consumed AS (
    UPDATE secret_keys k SET last_used_step = i.step
    FROM input i JOIN locked l ON l.id = i.account_id
    WHERE k.id = i.key_id AND k.account_id = i.account_id AND k.state = 'ACTIVE'
      AND k.last_used_step < i.step
    RETURNING i.ord
),
settled AS (
    UPDATE accounts a
    SET failed_attempts = CASE WHEN c.ord IS NULL THEN a.failed_attempts + 1 ELSE 0 END,
        attempts_open = greatest(a.attempts_open - 1, 0),
        locked_until = CASE WHEN c.ord IS NULL OR a.attempts_open - 1 >= $11
                            THEN a.locked_until END
    FROM input i JOIN locked l ON l.id = i.account_id LEFT JOIN consumed c USING (ord)
    WHERE a.id = i.account_id
    RETURNING i.ord, c.ord IS NOT NULL AS accepted
),
audited AS (
    INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id, peer)
    SELECT i.actor, i.target, i.operation,
           CASE WHEN s.accepted THEN 'SUCCESS' ELSE 'FAILURE' END,
           CASE WHEN s.accepted THEN '' ELSE i.reason END,
           i.request_id, i.peer
    FROM input i LEFT JOIN settled s USING (ord)
    ORDER BY i.ord
)
SELECT ord FROM settled WHERE accepted
"""


@dataclass(frozen=True)
class Attempt:
    """One call to settle: whether it paid, what its code matched, and its audit event
    (recorded as a success when the step is used up, else as a failure with `event.reason`)."""

    account_id: int
    paid: bool
    key_id: int | None
    step: int | None
    event: AuditEntry


async def settle(conn: Connection, batch: Sequence[Attempt], free_failures: int) -> list[bool]:
    """Settles every attempt of the batch (accounts distinct); True where the code was
    accepted (its step used up now, by this call and no other)."""
    columns: list[list[object]] = [[] for _ in range(10)]
    for attempt in batch:
        event = attempt.event
        values = (
            attempt.account_id,
            attempt.paid,
            attempt.key_id,
            attempt.step,
            event.actor,
            event.target,
            event.operation,
            event.reason,
            event.request_id,
            event.peer,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    rows = await conn.fetch(_SETTLE, *columns, free_failures)
    accepted = {row["ord"] for row in rows}
    return [n in accepted for n in range(1, len(batch) + 1)]
