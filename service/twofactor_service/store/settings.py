"""Server settings kept in the database: the issuer name of new keys."""

from __future__ import annotations

from twofactor_service.store.database import Connection


async def issuer_name(conn: Connection, default: str) -> str:
    value: str | None = await conn.fetchval("SELECT issuer_name FROM settings")
    return value if value is not None else default


async def set_issuer_name(conn: Connection, issuer: str) -> None:
    await conn.execute(
        "INSERT INTO settings (issuer_name) VALUES ($1)"
        " ON CONFLICT (singleton) DO UPDATE SET issuer_name = EXCLUDED.issuer_name",
        issuer,
    )
