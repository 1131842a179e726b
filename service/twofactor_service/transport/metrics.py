"""Prometheus metrics, served over HTTP on TWOFACTOR_METRICS_ADDRESS (off when unset).

- `grpc_server_handled_total` and `grpc_server_handling_seconds`, by service, method, call type
  and final status code (the go-grpc-prometheus names, so stock gRPC dashboards work). They are
  reported by the outermost step of the call pipeline, so they count the status the client
  gets, including the refusals of the error step.
- `twofactor_verify_code_outcomes_total` by outcome: valid, invalid, replayed, locked (O7).
- `twofactor_verify_batch_size`: how many VerifyCode calls shared each pair of round trips
  (verification.py's group commit).
- `twofactor_active_lockouts`, `twofactor_database_up` and the connection pool gauges, read at
  scrape time: the pool's counters from memory, the lockouts with one count query.

`serve --workers N` runs N processes, each with its own counters and pool. Each serves its own
endpoint: worker i (counting from 0) listens on the base port + i, and Prometheus scrapes every
one of them (sum over `instance` for the service's totals). Prometheus' multiprocess mode was
not used: it needs a shared directory wiped at every start, and per-process gauges such as the
pool's cannot be combined truthfully there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import asyncpg
import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twofactor_service.code_checks import CodeCheck
from twofactor_service.config import ConfigError
from twofactor_service.store import accounts
from twofactor_service.store.database import Connection
from twofactor_service.transport.pipeline import Context, Report

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sign-ins spend argon2 time (a few hundred ms); VerifyCode takes a few ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A scrape waits this long for the lockout count before reporting the database as down.
QUERY_TIMEOUT_SECONDS = 2.0

_RPC_LABELS = ("grpc_service", "grpc_method", "grpc_type", "grpc_code")

# Module-level, as prometheus_client intends: one set of counters per process. They are not in
# the default registry; each endpoint's registry holds them (tests run several servers).
RPC_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by final status code.",
    _RPC_LABELS,
    registry=None,
)
RPC_DURATION = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end, by final status code.",
    _RPC_LABELS,
    buckets=LATENCY_BUCKETS,
    registry=None,
)
VERIFY_OUTCOMES = Counter(
    "twofactor_verify_code_outcomes",
    "VerifyCode answers: valid; invalid (wrong code, or no active key); replayed (the code's "
    "time step was used before); locked (not checked: too many failed attempts).",
    ("outcome",),
    registry=None,
)
VERIFY_BATCH_SIZE = Histogram(
    "twofactor_verify_batch_size",
    "VerifyCode calls settled together in one batch (one payment and one settlement statement).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=None,
)
# Each outcome's child, made at import: present at 0 from the start, so rate() sees the first,
# and not looked up by label on every call.
_VERIFY_OUTCOME_CHILDREN: dict[CodeCheck | None, Any] = {
    check: VERIFY_OUTCOMES.labels("locked" if check is None else check.value)
    for check in (*CodeCheck, None)
}


def count_verify_outcome(check: CodeCheck | None) -> None:
    """`check` is None when the account was locked and the code not looked at."""
    _VERIFY_OUTCOME_CHILDREN[check].inc()


def observe_verify_batch(size: int) -> None:
    VERIFY_BATCH_SIZE.observe(size)


def reporter(method: str, kind: str) -> Report:
    """The two RPC metrics of one method's calls, counted as each call ends with the status the
    client gets. The children of a method's labels are looked up once per status code."""
    service, _, name = method.lstrip("/").rpartition("/")
    children: dict[grpc.StatusCode, tuple[Any, Any]] = {}

    def report(context: Context, code: grpc.StatusCode, seconds: float, reason: str) -> None:
        counted = children.get(code)
        if counted is None:
            labels = (service, name, kind, code.name)
            counted = children[code] = (RPC_HANDLED.labels(*labels), RPC_DURATION.labels(*labels))
        counted[0].inc()
        counted[1].observe(seconds)

    return report


def read_at_scrape(
    loop: asyncio.AbstractEventLoop,
    pool: asyncpg.Pool,
    read: Callable[[Connection], Awaitable[T]],
    seconds: float,
) -> T | None:
    """What `read` finds on a pooled connection, for a scrape: it runs on the server's event
    loop, where the pool lives (scrapes are served on the HTTP server's thread), within
    `seconds`. None when it failed or took longer (the database is not reachable now), or
    the loop is closed (the server is stopping)."""

    async def run() -> T:
        async with asyncio.timeout(seconds), pool.acquire() as conn:
            return await read(conn)

    try:
        future = asyncio.run_coroutine_threadsafe(run(), loop)
    except RuntimeError:  # the loop is closed
        return None
    try:
        return future.result(timeout=seconds + 1)
    except Exception:  # noqa: BLE001 - any failure means "not known now"
        future.cancel()
        return None


class DatabaseCollector(Collector):
    """The pool's gauges and the active lockouts, read when Prometheus scrapes.

    Scrapes are served on the HTTP server's thread; the count query runs on the server's event
    loop, where the pool lives."""

    def __init__(self, pool: asyncpg.Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "twofactor_database_pool_connections",
            "PostgreSQL connections the pool holds open, busy or idle.",
            value=self.pool.get_size(),
        )
        yield GaugeMetricFamily(
            "twofactor_database_pool_idle_connections",
            "Open PostgreSQL connections not in use by a call.",
            value=self.pool.get_idle_size(),
        )
        yield GaugeMetricFamily(
            "twofactor_database_pool_max_connections",
            "The pool's limit (TWOFACTOR_DATABASE_POOL_SIZE).",
            value=self.pool.get_max_size(),
        )
        locked = read_at_scrape(
            self.loop, self.pool, accounts.count_locked_out, QUERY_TIMEOUT_SECONDS
        )
        yield GaugeMetricFamily(
            "twofactor_database_up",
            "1 when this scrape's query reached PostgreSQL, else 0.",
            value=0 if locked is None else 1,
        )
        if locked is not None:
            yield GaugeMetricFamily(
                "twofactor_active_lockouts",
                "Accounts whose code checks are locked now after consecutive failures.",
                value=locked,
            )


def split_address(address: str, variable: str = "TWOFACTOR_METRICS_ADDRESS") -> tuple[str, int]:
    """'host:port' ('[::1]:9464' for IPv6; an empty host means every interface)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{variable} must be host:port, got {address!r}")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"  # noqa: S104 - as configured
    return host, int(port_text)


def worker_address(address: str, index: int) -> str:
    """The metrics address of worker `index` (from 0) of `serve --workers N`: base port +
    index; port 0 stays 0 (each worker picks a free port)."""
    host, port = split_address(address)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + index if port else 0}"


@dataclass
class MetricsEndpoint:
    http: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.http.server_port

    def stop(self) -> None:
        """Blocks until the HTTP thread ends (up to its half-second poll): run it off the loop."""
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


def serve_metrics(
    address: str, pool: asyncpg.Pool, collectors: Iterable[Collector] = ()
) -> MetricsEndpoint:
    """Starts the HTTP endpoint (any path answers, /metrics by convention) on its own thread,
    with `collectors` besides the service's own (the SIEM export's). Call from the event loop
    that owns `pool`."""
    host, port = split_address(address)
    registry = CollectorRegistry()
    for collector in (RPC_HANDLED, RPC_DURATION, VERIFY_OUTCOMES, VERIFY_BATCH_SIZE):
        registry.register(collector)
    registry.register(DatabaseCollector(pool, asyncio.get_running_loop()))
    for extra in collectors:
        registry.register(extra)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    try:
        http, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"TWOFACTOR_METRICS_ADDRESS: cannot listen on {address}: {exc.strerror}"
        ) from None
    log.info("serving metrics", extra={"address": address, "port": http.server_port})
    return MetricsEndpoint(http, thread)
