"""A VerifyCode attempt's write and its audit event as one statement.

On the hot path (O7) the consumed time step, or the counted failure, and the audit event of
the attempt would be two statements: two round trips and two commits, that is two WAL flushes.
Run together they cost one of each, and the event commits atomically with what it records.

Each statement is the store's own rule statement (keys.CONSUME_STEP, accounts.RECORD_FAILURE)
in a WITH clause, so the rules stay written once. Each still locks only the one row its rule
statement locks (the key row, or the account row), in the same order as before: no new lock
ordering against the administrative transactions, which lock the account, then the keys.
"""

from __future__ import annotations

from twofactor_service.store.accounts import RECORD_FAILURE
from twofactor_service.store.audit import AuditEntry
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import CONSUME_STEP

_AUDIT_COLUMNS = "actor, target, operation, outcome, reason, request_id, peer"


def _audit_values(entry: AuditEntry) -> tuple[str, str, str, str, str, str, str]:
    outcome = "SUCCESS" if entry.success else "FAILURE"
    return (
        entry.actor,
        entry.target,
        entry.operation,
        outcome,
        entry.reason,
        entry.request_id,
        entry.peer,
    )


async def consume_step(conn: Connection, key_id: int, step: int, entry: AuditEntry) -> bool:
    """keys.consume_step, and when the step was consumed, audit.append(entry), in one
    statement. False (nothing written) when the step was used before, by another call or a
    newer step, or a lockout began meanwhile: the caller then counts the failure."""
    consumed = await conn.fetchval(
        f"""
        WITH consumed AS ({CONSUME_STEP})
        INSERT INTO audit_events ({_AUDIT_COLUMNS})
        SELECT $3, $4, $5, $6, $7, $8, $9 FROM consumed
        RETURNING true
        """,
        key_id,
        step,
        *_audit_values(entry),
    )
    return bool(consumed)


async def record_failure(
    conn: Connection, account_id: int, schedule: list[int], entry: AuditEntry
) -> None:
    """accounts.record_failure and audit.append(entry), in one statement. The event is written
    even if the account row has gone meanwhile (a data-modifying WITH always runs in full)."""
    await conn.execute(
        f"""
        WITH counted AS ({RECORD_FAILURE})
        INSERT INTO audit_events ({_AUDIT_COLUMNS})
        VALUES ($3, $4, $5, $6, $7, $8, $9)
        """,
        account_id,
        schedule,
        *_audit_values(entry),
    )
