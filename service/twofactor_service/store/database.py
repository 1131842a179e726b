"""The connection pool, and the embedded PostgreSQL used when no database URL is configured."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# What store functions take: `pool.acquire()` hands out a PoolConnectionProxy, which asyncpg
# treats as a Connection (isinstance agrees) but whose type stubs keep it apart.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


def start_embedded(data_dir: Path) -> str:
    """Starts (or joins) a real PostgreSQL from the `pgserver` package in `data_dir/postgres`;
    the data survives restarts. Returns its connection URL (a unix socket)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver then
        # falls back to /tmp, which is fine.
        warnings.simplefilter("ignore")
        import pgserver  # imported here: only the embedded mode needs it

    pgdata = (data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    url: str = server.get_uri()
    return url


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=size,
        # Give up quickly when PostgreSQL is down, so calls fail fast with UNAVAILABLE.
        timeout=5,
        command_timeout=30,
        # Statements are prepared once per connection and reused (asyncpg's statement cache).
        max_inactive_connection_lifetime=300,
        server_settings={"application_name": "twofactor-service"},
        reset=_keep_session,
    )
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset on release (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL;`), a round trip on every release, two per VerifyCode.

    The service leaves no session state on a connection: no SET, no LISTEN, no open cursor,
    and the one session-level advisory lock (migrations) is released in a `finally`. An open
    transaction is still rolled back: asyncpg does that before calling this hook.
    """


async def ping(pool: asyncpg.Pool, within_seconds: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(within_seconds), pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure means "not serving"
        return False
    return True
