"""Numbered .sql migrations, applied in order under a PostgreSQL advisory lock, so replicas
starting together never race."""

from __future__ import annotations

import logging
from importlib import resources

from twofactor_service.store.database import LONG_STATEMENT_SECONDS, Connection

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
    # A migration may rewrite a big table, and waits for another replica's migration: bounded
    # by LONG_STATEMENT_SECONDS, not the calls' few seconds (the session's statement_timeout is
    # lifted for it, and RESET to the connection's own afterwards).
    long = LONG_STATEMENT_SECONDS
    await conn.execute("SET statement_timeout = 0")
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY, timeout=long)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())",
                timeout=long,
            )
            done = {
                r["version"]
                for r in await conn.fetch("SELECT version FROM schema_migrations", timeout=long)
            }
            for version, name, sql in available_migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql, timeout=long)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                log.info("applied migration", extra={"migration": name})
                applied_now.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    finally:
        await conn.execute("RESET statement_timeout")
    return applied_now
