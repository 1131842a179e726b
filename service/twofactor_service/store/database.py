"""The connection pool, and the embedded PostgreSQL used when no database URL is configured.

High availability (docs/high-availability.md): the database URL may name several hosts,
`postgresql://h1:5432,h2:5432/twofactor?target_session_attrs=read-write`; asyncpg then connects
to the first one that accepts writes. Nothing here decides which server is the primary (the
failover manager does); the service only notices when it cannot write and lets go of the
connections that led it there:

- `is_unavailable` says which failures mean "no writable database right now" (the call answers
  UNAVAILABLE with DATABASE_UNAVAILABLE and RetryInfo, never INTERNAL);
- `writability` is what the health check asks; while the pooled connections reach a server that
  answers but cannot write (a standby, a read-only server) the watcher in server.py expires
  them, so the next calls connect afresh, through the URL, to whichever server is writable.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import warnings
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

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
        connect=connect_in_turn,
        # Give up quickly when PostgreSQL is down, so calls fail fast with UNAVAILABLE (per
        # host of a multi-host URL, as libpq's connect_timeout).
        timeout=5,
        command_timeout=30,
        # Statements are prepared once per connection and reused (asyncpg's statement cache).
        max_inactive_connection_lifetime=300,
        server_settings={"application_name": "twofactor-service"},
        reset=_keep_session,
    )
    return pool


def host_list(url: str) -> list[tuple[str, int]]:
    """The hosts of a PostgreSQL URL, in order: `host:port,...` after the `@`, or the `host`
    (and `port`) query parameters (unix-socket directories). Ports default to 5432."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    spec = parts.netloc.rpartition("@")[2] or query.get("host", [""])[0]
    if not spec:
        return []
    entries = spec.split(",")
    query_ports = [int(p) for p in query.get("port", [""])[0].split(",") if p]
    hosts = []
    for index, entry in enumerate(unquote(e) for e in entries):
        if entry.startswith("/"):
            host, port = entry, ""
        elif entry.startswith("["):  # [IPv6]:port
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = entry.partition(":")
        if not port and len(query_ports) == len(entries):
            port = str(query_ports[index])
        elif not port:
            port = str(query_ports[0]) if query_ports else "5432"
        hosts.append((host, int(port)))
    return hosts


async def connect_in_turn(dsn: str | None = None, **options: Any) -> asyncpg.Connection:
    """The pool's connect. With a multi-host URL each host is tried in turn, as libpq does:
    asyncpg alone gives up on the whole list when a host fails after the TCP handshake (a FATAL
    57P01 from a node its keeper is restarting, a database that accepts no connections), though
    the next host may be a healthy primary. As in libpq, a failed authentication ends the
    search: it is a configuration error, not an outage."""
    hosts = host_list(dsn) if dsn else []
    if len(hosts) < 2:
        return await asyncpg.connect(dsn, **options)
    failure: Exception | None = None
    for host, port in hosts:
        try:
            # host/port override the URL's hosts; every other setting of the URL still holds,
            # target_session_attrs included.
            connection: asyncpg.Connection = await asyncpg.connect(
                dsn, host=host, port=port, **options
            )
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError):
            raise
        except Exception as exc:  # noqa: BLE001 - the next host may serve; the last is raised
            failure = exc
        else:
            return connection
    assert failure is not None
    raise failure


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset on release (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL;`), a round trip on every release, two per VerifyCode.

    The service leaves no session state on a connection: no SET, no LISTEN, no open cursor,
    and the one session-level advisory lock (migrations) is released in a `finally`. An open
    transaction is still rolled back: asyncpg does that before calling this hook.
    """


# SQLSTATEs that mean "this server cannot take our writes now", not "this request is wrong":
# 25006 read_only_sql_transaction (a standby, or default_transaction_read_only during a
# failover: pg_auto_failover sets it on the standby it is promoting until the old primary is
# fenced), class 08 connection exceptions, class 53 insufficient resources (disk full, too many
# connections), and the 57P0x operator interventions: 57P01 admin_shutdown (also a terminated
# backend), 57P02 crash_shutdown, 57P03 cannot_connect_now (starting up, in recovery), 57P04
# database_dropped, 57P05 idle_session_timeout. Not 57014 query_canceled: a statement_timeout is
# not an outage (asyncpg's own command_timeout raises TimeoutError, below).
_UNAVAILABLE_SERVER_ERRORS: tuple[type[asyncpg.PostgresError], ...] = (
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.DatabaseDroppedError,
    asyncpg.IdleSessionTimeoutError,
)

# Failures on the client side of the connection.
_UNAVAILABLE_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    # A closed or lost connection (asyncpg's ConnectionDoesNotExistError is class 08 above).
    asyncpg.InterfaceError,
    # A shutdown's FATAL message can reach an idle pooled connection before its socket closes;
    # the next statement on it then fails with asyncpg's protocol-state error. Also
    # TargetServerAttributeNotMatched: no host of a multi-host URL accepts writes.
    asyncpg.InternalClientError,
    # Refused, reset, unreachable (OSError covers ConnectionError), and asyncpg's connect and
    # command timeouts.
    OSError,
    TimeoutError,
)


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` means the database cannot serve writes now (down, restarting, read-only,
    failing over), so the caller should retry shortly rather than hear INTERNAL."""
    return isinstance(exc, _UNAVAILABLE_SERVER_ERRORS + _UNAVAILABLE_CLIENT_ERRORS)


class Writability(enum.Enum):
    WRITABLE = "writable"
    # Connected, but the server is a standby or read-only.
    READ_ONLY = "read-only"
    UNREACHABLE = "unreachable"


async def writability(pool: asyncpg.Pool, within_seconds: float = 2.0) -> Writability:
    """Whether a pooled connection can write now: what the health check reports. A standby
    answers `SELECT 1` happily; only a writable primary serves this service."""
    try:
        async with asyncio.timeout(within_seconds), pool.acquire() as conn:
            writable: bool = await conn.fetchval(
                "SELECT NOT pg_is_in_recovery()"
                " AND current_setting('transaction_read_only') = 'off'"
            )
    except Exception:  # noqa: BLE001 - any failure means "not serving"
        return Writability.UNREACHABLE
    return Writability.WRITABLE if writable else Writability.READ_ONLY
