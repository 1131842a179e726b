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
import socket
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import asyncpg.transaction
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


# Every wait on the database is bounded, so that a call meets a dead, frozen or black-holed
# PostgreSQL with UNAVAILABLE (DATABASE_UNAVAILABLE, RetryInfo) well within a client's usual
# 10 s deadline (docs/high-availability.md, "Every database wait is bounded"):
#
# - connecting, per host of the URL (TCP handshake, TLS, startup, authentication, and the
#   fencing query below);
CONNECT_TIMEOUT_SECONDS = 2.0
# - a statement on a server that answers, but slowly (a lock wait, an overloaded server): the
#   server cancels it itself (57014, UNAVAILABLE) and the connection stays usable. A commit
#   waiting for the synchronous standby is not cut short by it: PostgreSQL disarms the timer
#   before committing, so it never turns into an OK the standby does not have;
STATEMENT_TIMEOUT = "3s"
# - a statement on a server that does not answer at all (frozen, black-holed): asyncpg's
#   command_timeout. The connection is then discarded rather than cancelled (a CancelRequest to
#   a frozen server waits as long), every connection to that host is closed, and the host goes
#   to the back of the URL's order for SUSPECT_SECONDS;
COMMAND_TIMEOUT_SECONDS = 4.0
# - the socket: keepalive probes on an idle connection and TCP_USER_TIMEOUT on unacknowledged
#   data, so the kernel gives up on a peer whose machine is gone or unreachable within a few
#   seconds even when no statement runs (Linux; elsewhere only the timeouts above apply). A
#   frozen process on a live machine still has its kernel answering: only the statement
#   timeouts catch that one.
KEEPALIVE_IDLE_SECONDS = 2
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 5000
# Work long by nature (migrations, which may also wait for another replica's migration) sets
# its own, larger bound (store/migrations.py).
LONG_STATEMENT_SECONDS = 600.0
SUSPECT_SECONDS = 30.0

# What a new connection reports before the pool hands it out: its cluster's system identifier
# and the timeline the server writes on (NULL on a standby). A promotion always starts a new
# timeline, so a server of the same cluster on a lower timeline than one this pool has already
# written to is an old primary that has not yet learnt it was replaced (a frozen node that was
# resumed): it is refused like an unreachable host. (A cluster made anew, say restored from a
# dump, has another system identifier and starts afresh.)
_TIMELINE = "('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int"
_FENCE_QUERY = (
    "SELECT (SELECT system_identifier FROM pg_control_system()) AS system,"
    f" CASE WHEN pg_is_in_recovery() THEN NULL ELSE {_TIMELINE} END AS timeline"
)


class StalePrimary(ConnectionError):
    """A server that accepts writes on an older timeline than the pool has already seen."""

    def __init__(self, host: str, timeline: int, newest: int) -> None:
        super().__init__(f"{host} writes on timeline {timeline}, an older one than {newest}")


class Guard:
    """What one pool has learnt about the servers behind its URL: which host last served as
    the writable primary (tried first), which hosts went silent lately (tried last), the newest
    timeline seen (older primaries are refused), and whether a call just met a silent server
    (the health watcher then reports NOT_SERVING at once and probes)."""

    def __init__(self) -> None:
        self.primary: str | None = None
        # System identifier -> the newest timeline a writable server of that cluster reported.
        self.timelines: dict[int, int] = {}
        self._suspects: dict[str, float] = {}
        self._trouble: asyncio.Event | None = None
        self.pool: asyncpg.Pool | None = None
        self.connections: weakref.WeakSet[BoundedConnection] = weakref.WeakSet()

    @property
    def trouble(self) -> asyncio.Event:
        if self._trouble is None:
            self._trouble = asyncio.Event()
        return self._trouble

    def order(self, hosts: list[tuple[str, int]]) -> list[tuple[str, int]]:
        now = time.monotonic()
        fresh = [h for h in hosts if self._suspects.get(_key(*h), 0.0) <= now]
        suspect = [h for h in hosts if h not in fresh]
        fresh.sort(key=lambda h: _key(*h) != self.primary)  # stable: the rest keep URL order
        return fresh + suspect

    def suspect(self, host: str) -> None:
        self._suspects[host] = time.monotonic() + SUSPECT_SECONDS
        if self.primary == host:
            self.primary = None

    def admit(self, host: str, system: int, timeline: int | None) -> None:
        if timeline is None:
            return
        newest = self.timelines.get(system, 0)
        if timeline < newest:
            self.suspect(host)
            raise StalePrimary(host, timeline, newest)
        self.timelines[system] = timeline
        self.primary = host
        self._suspects.pop(host, None)

    async def went_silent(self, host: str) -> None:
        """A statement got no answer within COMMAND_TIMEOUT_SECONDS from `host`."""
        log.warning("database server silent; its connections are dropped", extra={"host": host})
        self.suspect(host)
        self.trouble.set()
        await self.drop(host)

    async def drop(self, host: str | None = None) -> None:
        """Closes every connection of the pool to `host` (to any host when None) at once, those
        in use included (their statements fail, UNAVAILABLE), and expires the pool's others, so
        the next calls connect afresh through the URL."""
        for connection in list(self.connections):
            if host is None or connection.host == host:
                connection.terminate()
        if self.pool is not None:
            await self.pool.expire_connections()


def _key(host: str, port: int) -> str:
    return f"{host}:{port}"


class _Transaction(asyncpg.transaction.Transaction):
    """asyncpg's transaction, except that when its body failed and the connection is gone
    (discarded after a timeout, or a cancelled statement), the body's exception goes on: a
    ROLLBACK that cannot run must not replace it (a CancelledError turned into an
    InterfaceError would leave its task running)."""

    async def __aexit__(self, extype: Any, ex: Any, tb: Any) -> None:
        try:
            await super().__aexit__(extype, ex, tb)
        except asyncpg.InterfaceError:
            if extype is None:
                raise


class BoundedConnection(asyncpg.Connection):
    """A connection that is discarded, not cancelled, when a statement is cut short (by
    command_timeout or because its caller gave up), and that tells its pool's Guard when the
    server went silent."""

    guard: Guard | None = None
    host = ""

    def _cancel_current_command(self, waiter: Any, cancel_waiter: Any = None) -> None:
        # asyncpg would open a second connection to send a CancelRequest and wait for the
        # server's answer: to a frozen server, that waits as long as the statement did.
        # Closing the socket ends the statement too (the backend rolls back when it notices).
        self._loop.call_soon(self.terminate)  # type: ignore[attr-defined]

    async def _execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._execute(*args, **kwargs)  # type: ignore[misc]
        except TimeoutError:
            await self._silent()
            raise

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 - asyncpg's signature
        try:
            return await super().execute(query, *args, timeout=timeout)
        except TimeoutError:
            await self._silent()
            raise

    def transaction(
        self, *, isolation: Any = None, readonly: bool = False, deferrable: bool = False
    ) -> Any:
        self._check_open()  # type: ignore[attr-defined]
        return _Transaction(self, isolation, readonly, deferrable)

    async def close(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as asyncpg's
        # A graceful close waits for the server; a frozen one never answers (then: abort).
        await super().close(timeout=COMMAND_TIMEOUT_SECONDS if timeout is None else timeout)

    async def _silent(self) -> None:
        if self.guard is not None:
            await self.guard.went_silent(self.host)


class Pool(asyncpg.Pool):
    """asyncpg's pool, with the Guard its connections share."""

    __slots__ = ("guard",)
    guard: Guard


def guard_of(pool: asyncpg.Pool) -> Guard | None:
    return pool.guard if isinstance(pool, Pool) else None


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    guard = Guard()

    async def connect(dsn: str | None = None, **options: Any) -> asyncpg.Connection:
        return await connect_in_turn(dsn, guard=guard, **options)

    pool = Pool(
        url,
        min_size=1,
        max_size=size,
        max_queries=50000,
        connect=connect,
        connection_class=BoundedConnection,
        record_class=asyncpg.Record,
        init_size=None,
        loop=None,
        setup=None,
        init=None,
        # Per host of a multi-host URL, as libpq's connect_timeout.
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        # Statements are prepared once per connection and reused (asyncpg's statement cache).
        max_inactive_connection_lifetime=300,
        server_settings={
            "application_name": "twofactor-service",
            "statement_timeout": STATEMENT_TIMEOUT,
        },
        reset=_keep_session,
    )
    pool.guard = guard
    guard.pool = pool
    await pool
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


async def connect_in_turn(
    dsn: str | None = None, *, guard: Guard | None = None, **options: Any
) -> asyncpg.Connection:
    """The pool's connect. With a multi-host URL each host is tried in turn, as libpq does:
    asyncpg alone gives up on the whole list when a host fails after the TCP handshake (a FATAL
    57P01 from a node its keeper is restarting, a database that accepts no connections), though
    the next host may be a healthy primary. As in libpq, a failed authentication ends the
    search: it is a configuration error, not an outage.

    With a `guard` (the pool's), the host that last served as the writable primary is tried
    first and hosts that went silent lately last, and a server on an older timeline than the
    pool has seen is refused (StalePrimary)."""
    hosts = host_list(dsn) if dsn else []
    if len(hosts) < 2:
        connection: asyncpg.Connection = await asyncpg.connect(dsn, **options)
        host = _key(*hosts[0]) if hosts else "default"
        return await _admit(connection, host, guard)
    failure: Exception | None = None
    for host, port in guard.order(hosts) if guard is not None else hosts:
        try:
            # host/port override the URL's hosts; every other setting of the URL still holds,
            # target_session_attrs included.
            connection = await asyncpg.connect(dsn, host=host, port=port, **options)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError):
            raise
        except Exception as exc:  # noqa: BLE001 - the next host may serve; the last is raised
            failure = exc
            if guard is not None and isinstance(exc, TimeoutError):
                guard.suspect(_key(host, port))
            continue
        try:
            return await _admit(connection, _key(host, port), guard)
        except Exception as exc:  # noqa: BLE001 - as above
            failure = exc
    assert failure is not None
    raise failure


async def _admit(
    connection: asyncpg.Connection, host: str, guard: Guard | None
) -> asyncpg.Connection:
    """Bounds the new connection's socket, and with a guard fences it (see _FENCE_QUERY)."""
    _bound_socket(connection)
    if guard is None:
        return connection
    try:
        row = await connection.fetchrow(_FENCE_QUERY, timeout=CONNECT_TIMEOUT_SECONDS)
        assert row is not None
        guard.admit(host, row["system"], row["timeline"])
    except BaseException:
        connection.terminate()
        raise
    if isinstance(connection, BoundedConnection):
        connection.guard = guard
        connection.host = host
        guard.connections.add(connection)
    return connection


def _bound_socket(connection: asyncpg.Connection) -> None:
    """TCP keepalives and TCP_USER_TIMEOUT on the connection's socket (not on a unix socket)."""
    transport = getattr(connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


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
# database_dropped, 57P05 idle_session_timeout; and 57014 query_canceled: the server's own
# statement_timeout (STATEMENT_TIMEOUT), or an operator's pg_cancel_backend; either way a retry
# shortly may succeed (asyncpg's own command_timeout raises TimeoutError, below).
_UNAVAILABLE_SERVER_ERRORS: tuple[type[asyncpg.PostgresError], ...] = (
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.QueryCanceledError,
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


# How long the health watcher's probe may take: a writable primary answers in milliseconds.
PROBE_TIMEOUT_SECONDS = 1.0
# The cluster, and the timeline a writable server writes on (NULL when it cannot write).
_PROBE_QUERY = (
    "SELECT (SELECT system_identifier FROM pg_control_system()) AS system,"
    " CASE WHEN NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"
    f" THEN {_TIMELINE} END AS timeline"
)


async def writability(
    pool: asyncpg.Pool, within_seconds: float = PROBE_TIMEOUT_SECONDS
) -> Writability:
    """Whether a pooled connection can write now: what the health check reports. A standby
    answers `SELECT 1` happily; only a writable primary serves this service. Bounded: a probe
    that gets no answer in time (a frozen server, a pool whose connections all hang) is
    UNREACHABLE, and its connection is discarded. A server on an older timeline than the pool
    has seen (an old primary) counts as READ_ONLY."""
    guard = guard_of(pool)
    try:
        async with asyncio.timeout(within_seconds), pool.acquire() as conn:
            row = await conn.fetchrow(_PROBE_QUERY)
            host = str(getattr(conn, "host", ""))
    except Exception:  # noqa: BLE001 - any failure means "not serving"
        return Writability.UNREACHABLE
    if row is None or row["timeline"] is None:
        return Writability.READ_ONLY
    if guard is not None:
        try:
            guard.admit(host, row["system"], row["timeline"])
        except StalePrimary:
            return Writability.READ_ONLY
    return Writability.WRITABLE
