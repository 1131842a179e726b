"""Assembles the gRPC server: the servicer behind its interceptors, health checking,
reflection, TLS, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_service.config import Config
from twofactor_service.encryption import KeyRing
from twofactor_service.policy import SERVICE, load_policies
from twofactor_service.runtime import Runtime
from twofactor_service.store import database
from twofactor_service.transport.interceptors import interceptors
from twofactor_service.transport.servicer import TwoFactorServicer

log = logging.getLogger(__name__)

HEALTH_INTERVAL_SECONDS = 1.0


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    tls = config.tls
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    watcher: asyncio.Task[None]

    async def stop(self, grace: float | None = 5.0) -> None:
        """Graceful: stop taking calls, let running ones finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        self.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.watcher
        await self.server.stop(grace)


async def _watch_database(pool: asyncpg.Pool, servicer: health.aio.HealthServicer) -> None:
    """Reports NOT_SERVING while PostgreSQL is unreachable; the pool reconnects by itself."""
    serving: bool | None = None
    while True:
        ok = await database.ping(pool)
        if ok != serving:
            serving = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE.full_name):
                await servicer.set(name, status)
            (log.info if ok else log.warning)("database reachable" if ok else "database unreachable")
        await asyncio.sleep(HEALTH_INTERVAL_SECONDS)


async def start_server(
    config: Config, pool: asyncpg.Pool, key_ring: KeyRing, *, runtime: Runtime | None = None
) -> RunningServer:
    runtime = runtime or Runtime(config=config, pool=pool, key_ring=key_ring)
    server = grpc.aio.server(
        interceptors=interceptors(runtime, load_policies()),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    pb_grpc.add_TwoFactorServiceServicer_to_server(TwoFactorServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = _credentials(config)
    if credentials is None:
        port = server.add_insecure_port(config.listen_address)
    else:
        port = server.add_secure_port(config.listen_address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen_address}")
    await server.start()
    watcher = asyncio.create_task(_watch_database(pool, health_servicer))
    return RunningServer(server, port, health_servicer, watcher)
