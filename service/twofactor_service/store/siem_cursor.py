"""The SIEM export's cursor (migration 006) and the export lag it implies."""

from __future__ import annotations

from twofactor_service.store.audit_chain import Cursor
from twofactor_service.store.database import Connection

# Any constant: the exporter, one replica at a time (audit_chain's sealer uses 0x2FA_A5EA1).
EXPORTER_LOCK_KEY = 0x2FA_5E1E


async def try_lock_exporter(conn: Connection) -> bool:
    """Takes the exporter's session-level lock on `conn` (a connection of the exporter's own,
    never a pooled one): held until the connection closes, so a crashed or cut-off exporter
    lets go with its connection and another replica takes over."""
    taken: bool = await conn.fetchval("SELECT pg_try_advisory_lock($1)", EXPORTER_LOCK_KEY)
    return taken


async def position(conn: Connection) -> Cursor:
    row = await conn.fetchrow("SELECT last_txid::text AS txid, last_sequence FROM siem_cursor")
    if row is None:  # deleted by hand: start again from the beginning rather than stop
        return (0, 0)
    return (int(row["txid"]), row["last_sequence"])


async def advance(conn: Connection, to: Cursor) -> None:
    """Moves the cursor forward to `to`, never back."""
    await conn.execute(
        """
        INSERT INTO siem_cursor (last_txid, last_sequence) VALUES ($1::text::xid8, $2)
        ON CONFLICT (singleton) DO UPDATE
            SET last_txid = excluded.last_txid, last_sequence = excluded.last_sequence,
                updated_at = now()
            WHERE (siem_cursor.last_txid, siem_cursor.last_sequence)
                < (excluded.last_txid, excluded.last_sequence)
        """,
        str(to[0]),
        to[1],
    )


async def lag(conn: Connection) -> tuple[int, float]:
    """(events past the cursor, seconds since the oldest of them was written); (0, 0.0) when
    the receiver has everything."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS events,
               coalesce(extract(epoch FROM clock_timestamp() - min(e.occurred_at)), 0)::float8
                   AS seconds
        FROM audit_events e, siem_cursor c
        WHERE (e.txid, e.sequence) > (c.last_txid, c.last_sequence)
        """
    )
    assert row is not None
    return row["events"], row["seconds"]
