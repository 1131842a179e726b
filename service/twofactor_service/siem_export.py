"""Audit export to a SIEM over syslog: every audit event, at least once, one replica at a time.

- **One exporter.** Every server runs the task; it opens a PostgreSQL connection of its own
  (never one of the pool's, which calls need) and takes a session-level advisory lock on it.
  The replica holding it exports; the others retry every second. A crashed replica, a cut
  connection or a failover ends the session and frees the lock, and whichever replica takes
  it next carries on from the cursor (as audit_chain's sealer is re-taken after a failover).
- **Order and cursor.** Events go out in the commit-safe (txid, sequence) order of followers
  and the sealer, so none can turn up behind one already sent. The cursor row (migration 006)
  records the last event the receiver took; after a restart, a receiver outage or a failover
  export resumes right after it.
- **What "took" means.** Syslog over TCP/TLS has no acknowledgement. A batch counts as sent
  once the receiver's TCP acknowledged every byte of it (siem_connection.send); it is
  *confirmed*, and the cursor moves past it, once the connection has then stayed up for
  `SETTLE_SECONDS`: a receiver that stops closes the connection, and what it had not read yet
  is sent again on the next connection. So an event is never lost for a receiver that
  stops, crashes or is cut off; the events of the last `SETTLE_SECONDS` plus one batch before a
  break, a crash of the exporter or a failover may arrive twice (docs/operations.md). A
  graceful stop over plain TCP confirms the rest by a half-close (`_hand_over`), so a rolling
  restart sends nothing twice.
- **Back-pressure.** The export runs in its own task off the call path: calls only insert audit
  rows, as before. A slow or absent receiver delays the export, never a call; every wait is
  bounded (connect, handshake, write and acknowledgement), and reconnecting backs off
  exponentially up to `BACKOFF_MAX_SECONDS`. The lag is a metric (events and seconds).
- **Wake-up.** The audit insert (the VerifyCode hot path) does not NOTIFY, so the exporter
  polls every `POLL_SECONDS` while idle, and goes on at once while batches are full.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import getpass
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twofactor_service import audit_chain as chain
from twofactor_service import background
from twofactor_service.config import SiemConfig
from twofactor_service.siem_connection import ReceiverConnection, ReceiverUnavailable
from twofactor_service.siem_messages import FORMATS, frame
from twofactor_service.store import audit_chain, database, siem_cursor
from twofactor_service.store.audit_chain import ChainRow, Cursor
from twofactor_service.transport.metrics import read_at_scrape

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
BATCH = 500
SETTLE_SECONDS = 1.0
LEADER_RETRY_SECONDS = 1.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 5.0
# A graceful stop waits this long for the receiver to confirm it read everything.
HANDOVER_SECONDS = 2.0
DATABASE_CONNECT_TIMEOUT_SECONDS = 5.0
DATABASE_COMMAND_TIMEOUT_SECONDS = 10.0
DATABASE_CLOSE_TIMEOUT_SECONDS = 2.0
LAG_QUERY_TIMEOUT_SECONDS = 2.0
SEAL_TIMEOUT_SECONDS = 2.0

EVENTS_SENT = Counter(
    "twofactor_siem_events_sent",
    "Audit events this process sent to the SIEM and the receiver's TCP acknowledged (an event "
    "sent again after a break counts again).",
    registry=None,
)
RECEIVER_FAILURES = Counter(
    "twofactor_siem_receiver_failures",
    "Connections to the SIEM's receiver that failed or broke (connect, TLS handshake, send).",
    registry=None,
)


@dataclass
class ExportStatus:
    """What this process's exporter is doing, for the metrics."""

    exporting: bool = False
    receiver_connected: bool = False


class Backoff:
    """Exponential, from BACKOFF_FIRST_SECONDS to BACKOFF_MAX_SECONDS, with jitter so replicas
    and restarts do not reconnect in step."""

    def __init__(self) -> None:
        self._next = BACKOFF_FIRST_SECONDS

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, BACKOFF_MAX_SECONDS)
        return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not a secret

    def reset(self) -> None:
        self._next = BACKOFF_FIRST_SECONDS


async def _connect_database(url: str) -> asyncpg.Connection:
    return await database.connect_in_turn(
        url,
        timeout=DATABASE_CONNECT_TIMEOUT_SECONDS,
        command_timeout=DATABASE_COMMAND_TIMEOUT_SECONDS,
        server_settings={"application_name": "twofactor-siem-export"},
    )


async def _close_database(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=DATABASE_CLOSE_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 - a dead or frozen server: just drop the socket
        conn.terminate()


async def _wait_for_any(events: list[asyncio.Event], seconds: float) -> None:
    """Until one of `events` is set, `seconds` at most."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def export_audit_events(
    settings: SiemConfig,
    database_url: str,
    pool: asyncpg.Pool,
    status: ExportStatus,
    stopping: asyncio.Event | None = None,
) -> None:
    """The server's exporter, until cancelled or `stopping` is set: waits for the exporter's
    lock, then exports."""
    if stopping is None:
        stopping = asyncio.Event()
    failing = False
    while not stopping.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await _connect_database(database_url)
            # Polling the lock: PostgreSQL tells nobody when an advisory lock is freed.
            while not await siem_cursor.try_lock_exporter(conn):
                await _wait_for_any([stopping], LEADER_RETRY_SECONDS)
                if stopping.is_set():
                    return
            status.exporting = True
            failing = False
            log.info(
                "exporting audit events to the SIEM",
                extra={"receiver": f"{settings.host}:{settings.port}"},
            )
            await _export(settings, conn, pool, status, stopping)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the database may be down: try again soon
            if not failing:
                log.warning(
                    "audit export to the SIEM paused: database unavailable",
                    extra={"error": type(exc).__name__},
                )
            failing = True
        finally:
            status.exporting = status.receiver_connected = False
            if conn is not None:
                await _close_database(conn)
        await _wait_for_any([stopping], LEADER_RETRY_SECONDS)


async def _next_batch(
    conn: asyncpg.Connection, pool: asyncpg.Pool, after: Cursor
) -> list[ChainRow]:
    rows = await audit_chain.sealable(conn, after, BATCH)
    if any(row.chain_hash is None for row in rows):
        # Seal first, so the events go out with their link in the hash chain (the SIEM's copy
        # then anchors the chain). The periodic sealer would do it within a second anyway;
        # when another replica is sealing right now, or sealing is refused, they go unsealed.
        try:
            async with asyncio.timeout(SEAL_TIMEOUT_SECONDS):  # the pool may be busy with calls
                sealed = await chain.seal(pool, wait=False, batch=BATCH)
        except Exception:  # noqa: BLE001 - the sealer reports its own problems
            sealed = 0
        if sealed:
            rows = await audit_chain.sealable(conn, after, BATCH)
    return rows


async def _export(
    settings: SiemConfig,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    status: ExportStatus,
    stopping: asyncio.Event,
) -> None:
    """Exports while holding the lock, until `stopping` (then it hands over); raises when the
    database fails."""
    format_message = FORMATS[settings.format]
    confirmed = await siem_cursor.position(conn)
    sent = confirmed
    # (when the receiver's TCP acknowledged it, the batch's last event), oldest first.
    unconfirmed: collections.deque[tuple[float, Cursor]] = collections.deque()
    receiver: ReceiverConnection | None = None
    backoff = Backoff()
    outage = False
    try:
        while True:
            if stopping.is_set():
                if receiver is not None and sent != confirmed:
                    await _hand_over(receiver, conn, sent)
                return
            if receiver is None:
                # Whatever was not confirmed goes again: the receiver may not have read it.
                sent = confirmed
                unconfirmed.clear()
                try:
                    receiver = await ReceiverConnection.open(settings)
                except ReceiverUnavailable as exc:
                    RECEIVER_FAILURES.inc()
                    if not outage:
                        log.warning(
                            "SIEM receiver unavailable; audit events wait in the database",
                            extra={"stage": exc.stage, "error": exc.detail},
                        )
                    outage = True
                    await _wait_for_any([stopping], backoff.next())
                    continue
                if outage:
                    log.info("SIEM receiver reachable again; resuming the audit export")
                outage = False
                status.receiver_connected = True
            rows = await _next_batch(conn, pool, sent)
            if rows:
                data = b"".join(
                    frame(format_message(row, settings.app_name, settings.hostname)) for row in rows
                )
                try:
                    await receiver.send(data)
                except ReceiverUnavailable as exc:
                    receiver, status.receiver_connected = None, False
                    RECEIVER_FAILURES.inc()
                    log.warning(
                        "SIEM receiver connection lost; unconfirmed events will be sent again",
                        extra={"stage": exc.stage, "error": exc.detail},
                    )
                    outage = True
                    await _wait_for_any([stopping], backoff.next())
                    continue
                backoff.reset()
                EVENTS_SENT.inc(len(rows))
                sent = rows[-1].cursor
                unconfirmed.append((time.monotonic(), sent))
            settled = time.monotonic() - SETTLE_SECONDS
            newest: Cursor | None = None
            while unconfirmed and unconfirmed[0][0] <= settled and not receiver.lost.is_set():
                newest = unconfirmed.popleft()[1]
            if newest is not None:
                await siem_cursor.advance(conn, newest)
                confirmed = newest
            if receiver.lost.is_set():
                # Closed by the receiver (or broken) while idle: nothing more is confirmed.
                await receiver.close()
                receiver, status.receiver_connected = None, False
                RECEIVER_FAILURES.inc()
                log.warning("SIEM receiver closed the connection; reconnecting")
                outage = True
                continue
            if len(rows) < BATCH:
                await _wait_for_any([receiver.lost, stopping], POLL_SECONDS)
    finally:
        if receiver is not None:
            await receiver.close()


async def _hand_over(receiver: ReceiverConnection, conn: asyncpg.Connection, sent: Cursor) -> None:
    """A graceful stop: when the receiver proves it read everything (siem_connection's
    hand_over), the cursor moves past all that was sent, so the next exporter (this replica
    restarted, or another) sends nothing twice. Otherwise the unconfirmed events go again."""
    if await receiver.hand_over(HANDOVER_SECONDS):
        await siem_cursor.advance(conn, sent)
        log.info("audit export handed over: the receiver confirmed every event sent")


class SiemExport:
    """The exporter of one server (server.py): its metrics collector exists from the start, so
    the metrics endpoint can serve it; `start` runs the task, `stop` ends it before the pool
    closes."""

    def __init__(self, settings: SiemConfig, database_url: str, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool = pool
        self.status = ExportStatus()
        self.collector = SiemCollector(pool, asyncio.get_running_loop(), self.status)
        self.task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self.task = asyncio.create_task(
            export_audit_events(
                self.settings, self.database_url, self.pool, self.status, self._stopping
            )
        )

    async def stop(self) -> None:
        """Ends the export: hands over (at most HANDOVER_SECONDS and a little), then closes the
        receiver connection and the database connection (which frees the exporter's lock for
        another replica at once)."""
        if self.task is None:
            return
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANDOVER_SECONDS + 1.0):
                await asyncio.shield(self.task)
        if self.task.done():
            return
        await background.end(self.task)


class SiemCollector(Collector):
    """The export's metrics, read when Prometheus scrapes: the lag from the shared cursor, so
    every replica reports it and it grows when no exporter runs at all."""

    def __init__(
        self, pool: asyncpg.Pool, loop: asyncio.AbstractEventLoop, status: ExportStatus
    ) -> None:
        self.pool = pool
        self.loop = loop
        self.status = status

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "twofactor_siem_exporting",
            "1 when this process is the replica exporting audit events to the SIEM.",
            value=1 if self.status.exporting else 0,
        )
        yield GaugeMetricFamily(
            "twofactor_siem_receiver_connected",
            "1 when this process's exporter is connected to the SIEM's receiver.",
            value=1 if self.status.receiver_connected else 0,
        )
        yield from EVENTS_SENT.collect()
        yield from RECEIVER_FAILURES.collect()
        lag = read_at_scrape(self.loop, self.pool, siem_cursor.lag, LAG_QUERY_TIMEOUT_SECONDS)
        if lag is not None:
            yield GaugeMetricFamily(
                "twofactor_siem_export_lag_events",
                "Audit events the SIEM's receiver has not confirmed yet (past the cursor).",
                value=lag[0],
            )
            yield GaugeMetricFamily(
                "twofactor_siem_export_lag_seconds",
                "Age of the oldest audit event the receiver has not confirmed yet; 0 when none.",
                value=lag[1],
            )


def _test_event() -> ChainRow:
    return ChainRow(
        txid=0,
        sequence=0,
        occurred_at=datetime.now(UTC),
        actor=f"cli:{getpass.getuser()}",
        target="",
        operation="SiemTest",
        outcome="SUCCESS",
        reason="",
        request_id=uuid.uuid4().hex,
        peer="cli",
        chain_position=None,
        chain_hash=None,
    )


async def siem_test_command(settings: SiemConfig) -> bool:
    """`twofactor siem-test`: sends one test event (operation SiemTest, sequence 0, not in the
    audit log) as configured, and prints each step; True when the receiver's TCP took it."""
    where = f"{settings.host}:{settings.port}"
    print(f"receiver: {where} over {settings.transport}, format {settings.format}")
    try:
        receiver = await ReceiverConnection.open(settings)
    except ReceiverUnavailable as exc:
        print(f"{exc.stage}: FAILED ({exc.detail})")
        return False
    print(f"connect to {where}: ok")
    if receiver.tls is not None:
        tls = receiver.tls
        print(f"TLS handshake: ok ({tls.version}, {tls.cipher}, receiver {tls.peer or '?'})")
    event = _test_event()
    message = FORMATS[settings.format](event, settings.app_name, settings.hostname)
    try:
        await receiver.send(frame(message))
    except ReceiverUnavailable as exc:
        print(f"{exc.stage}: FAILED ({exc.detail})")
        return False
    finally:
        await receiver.close()
    print(
        f"sent: 1 test event ({len(message)} bytes), acknowledged by the receiver's TCP; look "
        f"for operation SiemTest with request id {event.request_id} at the SIEM"
    )
    return True
