"""Assembles the gRPC server: the servicer behind its call pipeline, health checking,
reflection, TLS, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_service import background
from twofactor_service.audit_chain import seal_periodically
from twofactor_service.config import Config, ConfigError
from twofactor_service.console.supervisor import ConsoleEndpoint, start_console
from twofactor_service.encryption import KeyRing
from twofactor_service.housekeeping import keep_house
from twofactor_service.listen import AddressUnavailable, ensure_can_listen
from twofactor_service.policy import SERVICE, load_policies
from twofactor_service.runtime import Runtime
from twofactor_service.siem_export import SiemExport
from twofactor_service.store import database
from twofactor_service.transport import access_log, metrics
from twofactor_service.transport.identities import IdentityCache, listen
from twofactor_service.transport.metrics import MetricsEndpoint, serve_metrics
from twofactor_service.transport.pipeline import Pipeline, PipelineServer
from twofactor_service.transport.reflection import enable_reflection
from twofactor_service.transport.servicer import TwoFactorServicer

log = logging.getLogger(__name__)

HEALTH_INTERVAL_SECONDS = 1.0
LISTEN_VARIABLE = "TWOFACTOR_LISTEN_ADDRESS"


def _pem_certificates(data: bytes, variable: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"TWOFACTOR_{variable}: not a PEM certificate file") from None


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    tls = config.tls
    cert, key = tls.cert_file.read_bytes(), tls.key_file.read_bytes()
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    # gRPC reports unusable PEM only as "Failed to bind to address": check it here, so the
    # operator is told which file is wrong.
    chain = _pem_certificates(cert, "TLS_CERT_FILE")
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ConfigError("TWOFACTOR_TLS_KEY_FILE: not an unencrypted PEM private key") from None
    if chain[0].public_key() != private_key.public_key():
        raise ConfigError("TWOFACTOR_TLS_KEY_FILE is not the key of TWOFACTOR_TLS_CERT_FILE")
    if client_ca is not None:
        _pem_certificates(client_ca, "TLS_CLIENT_CA_FILE")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    watcher: asyncio.Task[None]
    # The Prometheus endpoint, when TWOFACTOR_METRICS_ADDRESS is set.
    metrics: MetricsEndpoint | None = field(default=None)
    # Links new audit events into the tamper-evident chain (audit_chain.py).
    sealer: asyncio.Task[None] | None = field(default=None)
    # Forgets idle failure counts (housekeeping.py).
    housekeeper: asyncio.Task[None] | None = field(default=None)
    # Hears which callers changed, for the identity cache (transport/identities.py).
    identity_listener: asyncio.Task[None] | None = field(default=None)
    # The web console's own process, when TWOFACTOR_CONSOLE_ADDRESS is set (the default).
    console: ConsoleEndpoint | None = field(default=None)
    # Audit export to a SIEM, when TWOFACTOR_SIEM_ADDRESS is set (siem_export.py).
    siem: SiemExport | None = field(default=None)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful: stop taking calls, let running ones finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        for task in (self.watcher, self.sealer, self.housekeeper, self.identity_listener):
            if task is not None:
                await background.end(task)
        if self.siem is not None:
            await self.siem.stop()
        if self.console is not None:
            # First: its calls (a followed audit log) end, then the server's grace applies.
            await self.console.stop()
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)


async def _watch_database(pool: asyncpg.Pool, servicer: health.aio.HealthServicer) -> None:
    """Reports SERVING only while the service can write: NOT_SERVING while PostgreSQL is
    unreachable, and also while it answers but cannot write (a standby, a read-only server, a
    failover in progress), since every RPC writes (SPEC §4).

    The probe is bounded (database.PROBE_TIMEOUT_SECONDS), so a frozen primary turns health
    NOT_SERVING within about 2 s; a call that met a silent server turns it at once. Connections
    that led there are let go: expired at the first failed probe, all closed at the second
    (or at once after a silent server), so the next ones go through the (multi-host) URL again
    and find the writable primary; none is ever used on an old primary."""
    guard = database.guard_of(pool)
    last: database.Writability | None = None
    failed_probes = 0

    async def report(state: database.Writability) -> None:
        nonlocal last
        if state is last:
            return
        ok = state is database.Writability.WRITABLE
        if last is None or ok != (last is database.Writability.WRITABLE):
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE.full_name):
                await servicer.set(name, status)
        if ok:
            log.info("database writable")
        else:
            log.warning("database not writable", extra={"database": state.value})
        last = state

    while True:
        if guard is not None and guard.trouble.is_set():
            guard.trouble.clear()
            await report(database.Writability.UNREACHABLE)
        state = await database.writability(pool)
        if state is database.Writability.WRITABLE:
            failed_probes = 0
        else:
            failed_probes += 1
            if guard is not None and failed_probes >= 2:
                await guard.drop()
            else:
                await pool.expire_connections()
        await report(state)
        if guard is None:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(guard.trouble.wait(), HEALTH_INTERVAL_SECONDS)


async def start_server(
    config: Config,
    pool: asyncpg.Pool,
    key_ring: KeyRing,
    *,
    runtime: Runtime | None = None,
    database_url: str | None = None,
) -> RunningServer:
    """`database_url` (default: the configured one) is where the SIEM export opens its own
    connection, outside the pool."""
    runtime = runtime or Runtime(config=config, pool=pool, key_ring=key_ring)
    url = database_url or config.database_url
    if config.siem is not None and url is None:
        raise ConfigError("the SIEM export needs the database URL")
    siem = SiemExport(config.siem, url, pool) if config.siem is not None and url else None
    # Every method's handler passes through the call pipeline, wrapped once as it is registered.
    reporters = [access_log.reporter]
    if config.metrics_address:
        reporters.insert(0, metrics.reporter)
    tracing = runtime.tracing
    if tracing is not None:
        reporters.append(tracing.reporter)
    identities = IdentityCache(config.identity_cache_seconds)
    pipeline = Pipeline(runtime, load_policies(), identities, reporters)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        # The call's span (tracing.py), around the pipeline; none without tracing.
        interceptors=tracing.server_interceptors() if tracing is not None else None,
    )
    registry: Any = PipelineServer(server, pipeline)  # as the generated functions take a server
    pb_grpc.add_TwoFactorServiceServicer_to_server(TwoFactorServicer(runtime), registry)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    enable_reflection(registry, (SERVICE.full_name, health.SERVICE_NAME))
    credentials = _credentials(config)
    ensure_can_listen(config.listen_address, LISTEN_VARIABLE, reuse_port=config.workers > 1)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen_address)
        else:
            port = server.add_secure_port(config.listen_address, credentials)
    except RuntimeError:  # taken between the check and the bind
        raise AddressUnavailable(
            config.listen_address, LISTEN_VARIABLE, "grpc could not bind it"
        ) from None
    # The console's bridge reaches this server over a unix socket in a folder only this
    # process's user can open; it needs no client certificate, even with mTLS on the port.
    socket_dir = (
        Path(tempfile.mkdtemp(prefix="twofactor-console-")) if config.console_address else None
    )
    if socket_dir is not None:
        server.add_insecure_port(f"unix:{socket_dir / 'grpc.sock'}")
    console: ConsoleEndpoint | None = None
    try:
        # The console's process first: health says SERVING as soon as the server starts, and
        # the console should be listening by then (its channel connects on its first call).
        if socket_dir is not None:
            console = await start_console(config, socket_dir)
        await server.start()
        address = config.metrics_address
        collectors = [siem.collector] if siem is not None else []
        endpoint = serve_metrics(address, pool, collectors) if address else None
    except BaseException:
        if console is not None:
            await console.stop()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        await server.stop(None)
        raise
    watcher = asyncio.create_task(_watch_database(pool, health_servicer))
    sealer = asyncio.create_task(seal_periodically(pool))
    housekeeper = asyncio.create_task(keep_house(pool, config.lockout))
    listener = asyncio.create_task(listen(identities, pool))
    if siem is not None:
        siem.start()
    return RunningServer(
        server,
        port,
        health_servicer,
        watcher,
        endpoint,
        sealer=sealer,
        housekeeper=housekeeper,
        identity_listener=listener,
        console=console,
        siem=siem,
    )
