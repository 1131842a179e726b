"""Numbered .sql migrations, applied in order under a PostgreSQL advisory lock, so replicas
starting together never race."""

from __future__ import annotations

import logging
from importlib import resources

from twofactor_service.store.database import Connection

log = logging.getLogger(__name__)

# Any constant works; this one spells "2fa-migrate" loosely, to stay out of others' way.
_ADVISORY_LOCK_KEY = 0x2FA_313A7E


def available_migrations() -> list[tuple[int, str, str]]:
    files = resources.files("twofactor_service").joinpath("migrations")
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: Connection) -> list[str]:
    """Applies the migrations this database lacks; returns their names."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in available_migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration", extra={"migration": name})
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    return applied_now
