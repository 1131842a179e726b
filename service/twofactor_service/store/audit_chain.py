"""The audit log's hash chain: the sealed events' links and the chain head (migration 002)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from twofactor_service.store.database import Connection

# Any constant works; this one spells "2fa-audit-seal" loosely (migrations use 0x2FA_313A7E).
_SEALER_LOCK_KEY = 0x2FA_A5EA1

# A position in (txid, sequence) order: the writing transaction's id and the event's sequence.
Cursor = tuple[int, int]


@dataclass(frozen=True)
class ChainHead:
    last: Cursor
    position: int
    chain_hash: bytes


@dataclass(frozen=True)
class ChainRow:
    """An event as the chain sees it: every stored field, and its link once sealed."""

    txid: int
    sequence: int
    occurred_at: datetime
    actor: str
    target: str
    operation: str
    outcome: str
    reason: str
    request_id: str
    peer: str
    chain_position: int | None
    chain_hash: bytes | None

    @property
    def cursor(self) -> Cursor:
        return (self.txid, self.sequence)


# ORDER BY names the table's column: a bare `txid` would be this text alias, and as text
# "1000" sorts before "999".
_COLUMNS = (
    "txid::text AS txid, sequence, occurred_at, actor, target, operation, outcome, reason,"
    " request_id, peer, chain_position, chain_hash"
)


def _row(record: asyncpg.Record) -> ChainRow:
    return ChainRow(**{**dict(record), "txid": int(record["txid"])})


async def lock_sealer(conn: Connection, *, wait: bool) -> bool:
    """Takes the sealer's lock for the rest of the transaction: one replica seals at a time.
    Without `wait`, False when another one holds it."""
    if wait:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SEALER_LOCK_KEY)
        return True
    taken: bool = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _SEALER_LOCK_KEY)
    return taken


async def head(conn: Connection) -> ChainHead | None:
    row = await conn.fetchrow(
        "SELECT last_txid::text AS last_txid, last_sequence, chain_position, chain_hash"
        " FROM audit_chain_head"
    )
    if row is None:
        return None
    return ChainHead(
        (int(row["last_txid"]), row["last_sequence"]), row["chain_position"], row["chain_hash"]
    )


async def sealable(conn: Connection, after: Cursor, limit: int) -> list[ChainRow]:
    """Events past `after` whose transaction, and every older one, has ended: no event can
    appear before them any more, so they can be linked in for good (store.audit.after)."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM audit_events
        WHERE (txid, sequence) > ($1::text::xid8, $2)
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY audit_events.txid, audit_events.sequence
        LIMIT $3
        """,
        str(after[0]),
        after[1],
        limit,
    )
    return [_row(r) for r in rows]


async def seal(conn: Connection, links: list[tuple[int, int, bytes]], new_head: ChainHead) -> None:
    """Stores each (sequence, position, hash) link and moves the head, in the caller's
    transaction."""
    await conn.execute(
        """
        UPDATE audit_events e SET chain_position = l.position, chain_hash = l.hash
        FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) AS l(sequence, position, hash)
        WHERE e.sequence = l.sequence
        """,
        [s for s, _, _ in links],
        [p for _, p, _ in links],
        [h for _, _, h in links],
    )
    await conn.execute(
        "UPDATE audit_chain_head SET last_txid = $1::text::xid8, last_sequence = $2,"
        " chain_position = $3, chain_hash = $4, sealed_at = now()",
        str(new_head.last[0]),
        new_head.last[1],
        new_head.position,
        new_head.chain_hash,
    )


async def chain_rows(conn: Connection, after: Cursor, up_to: Cursor, limit: int) -> list[ChainRow]:
    """Every event in (txid, sequence) order after `after` up to and including `up_to` (the
    head): sealed or not, so an event slipped into the sealed part is seen too."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM audit_events
        WHERE (txid, sequence) > ($1::text::xid8, $2)
          AND (txid, sequence) <= ($3::text::xid8, $4)
        ORDER BY audit_events.txid, audit_events.sequence
        LIMIT $5
        """,
        str(after[0]),
        after[1],
        str(up_to[0]),
        up_to[1],
        limit,
    )
    return [_row(r) for r in rows]


async def count_after(conn: Connection, after: Cursor) -> int:
    """Events past `after`: not sealed yet."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM audit_events WHERE (txid, sequence) > ($1::text::xid8, $2)",
        str(after[0]),
        after[1],
    )
    return count


async def first_sealed_after(conn: Connection, after: Cursor) -> int | None:
    """The sequence of an event past `after` (the head) that has a link already: only a head
    that was moved back leaves one."""
    sequence: int | None = await conn.fetchval(
        "SELECT min(sequence) FROM audit_events"
        " WHERE (txid, sequence) > ($1::text::xid8, $2) AND chain_hash IS NOT NULL",
        str(after[0]),
        after[1],
    )
    return sequence
