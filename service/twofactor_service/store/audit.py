"""The audit log: who did what to whom, when, and how it ended. Never a secret, code,
password or token: callers pass only names, operation names and ErrorInfo reasons."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from twofactor_service.store.database import Connection


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    target: str
    operation: str
    success: bool
    reason: str
    request_id: str
    peer: str


@dataclass(frozen=True)
class AuditRow:
    sequence: int
    occurred_at: datetime
    actor: str
    target: str
    operation: str
    outcome: str
    reason: str
    request_id: str
    peer: str


async def append(conn: Connection, entry: AuditEntry) -> None:
    await conn.execute(
        "INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id, peer)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        entry.actor,
        entry.target,
        entry.operation,
        "SUCCESS" if entry.success else "FAILURE",
        entry.reason,
        entry.request_id,
        entry.peer,
    )


async def append_many(conn: Connection, entries: list[AuditEntry]) -> None:
    """One event per entry, in order, in one round trip (an import's event per account)."""
    await conn.executemany(
        "INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id, peer)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [
            (
                entry.actor,
                entry.target,
                entry.operation,
                "SUCCESS" if entry.success else "FAILURE",
                entry.reason,
                entry.request_id,
                entry.peer,
            )
            for entry in entries
        ],
    )


_COLUMNS = "sequence, occurred_at, actor, target, operation, outcome, reason, request_id, peer"


@dataclass(frozen=True)
class AuditFilter:
    target: str = ""
    actor: str = ""
    operation: str = ""
    start: datetime | None = None
    end: datetime | None = None


async def page(
    conn: Connection, where: AuditFilter, *, before_sequence: int | None, limit: int
) -> list[AuditRow]:
    """Newest first, from just below `before_sequence`."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM audit_events
        WHERE ($1 = '' OR lower(target) = lower($1))
          AND ($2 = '' OR lower(actor) = lower($2))
          AND ($3 = '' OR operation = $3)
          AND ($4::timestamptz IS NULL OR occurred_at >= $4)
          AND ($5::timestamptz IS NULL OR occurred_at < $5)
          AND ($6::bigint IS NULL OR sequence < $6)
        ORDER BY sequence DESC
        LIMIT $7
        """,
        where.target,
        where.actor,
        where.operation,
        where.start,
        where.end,
        before_sequence,
        limit,
    )
    return [AuditRow(**dict(r)) for r in rows]


# A follower's position: (writing transaction id as text, sequence).
Cursor = tuple[str, int]


async def after(conn: Connection, cursor: Cursor, limit: int) -> tuple[list[AuditRow], Cursor]:
    """Events past `cursor` whose transaction, and every older one, has ended.

    Sequence numbers are taken before commit, so a lower sequence can commit after a higher one;
    ordering by the writing transaction and reading only below the oldest transaction still
    running means no event is ever skipped.
    """
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS}, txid::text AS txid FROM audit_events
        WHERE (txid, sequence) > ($1::text::xid8, $2)
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
        -- The column, not the text alias of the same name: as text, "1000" sorts before "999".
        ORDER BY audit_events.txid, sequence
        LIMIT $3
        """,
        cursor[0],
        cursor[1],
        limit,
    )
    if rows:
        cursor = (rows[-1]["txid"], rows[-1]["sequence"])
    return [AuditRow(**{k: v for k, v in r.items() if k != "txid"}) for r in rows], cursor


async def cursor_at(conn: Connection, sequence: int) -> Cursor:
    """The position just after event `sequence`, or after the newest event when 0.

    A number no event holds (a rolled-back change leaves a gap) positions after the nearest
    event before it: starting from the beginning would replay the whole log."""
    if sequence == 0:
        row = await conn.fetchrow(
            "SELECT txid::text AS txid, sequence FROM audit_events"
            " ORDER BY audit_events.txid DESC, sequence DESC LIMIT 1"
        )
    else:
        row = await conn.fetchrow(
            "SELECT txid::text AS txid, sequence FROM audit_events"
            " WHERE sequence <= $1 ORDER BY sequence DESC LIMIT 1",
            sequence,
        )
    return (row["txid"], row["sequence"]) if row else ("0", 0)
