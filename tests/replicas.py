"""`twofactor serve` replicas in processes of their own, on the test database: what an operator
runs behind a load balancer (SPEC §3). Tests that race two replicas use them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import TEST_ENCRYPTION_KEYS, health_status, wait_until

START_WITHIN_SECONDS = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    channel: grpc.aio.Channel
    stub: pb_grpc.TwoFactorServiceAsyncStub
    # The web console's http://host:port/
    console_url: str


def start_replica(
    database_url: str, log: Path, *serve_args: str, env: dict[str, str] | None = None
) -> Replica:
    """`twofactor serve` in a process of its own, configured as an operator would (`env`:
    more TWOFACTOR_* settings)."""
    address = f"127.0.0.1:{free_port()}"
    console = f"127.0.0.1:{free_port()}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("TWOFACTOR_", "OTEL_"))}
    environment |= {
        "TWOFACTOR_DATABASE_URL": database_url,
        "TWOFACTOR_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "TWOFACTOR_LISTEN_ADDRESS": address,
        # Never the default 8080, which a developer's `make run` may hold.
        "TWOFACTOR_CONSOLE_ADDRESS": console,
        "TWOFACTOR_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(  # noqa: S603 - our own command; the test chooses the args
            [sys.executable, "-m", "twofactor_service.cli", "serve", *serve_args],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.TwoFactorServiceStub(channel)
    return Replica(process, address, log, channel, stub, f"http://{console}/")


async def wait_serving(replica: Replica) -> None:
    async def serving() -> bool:
        if replica.process.poll() is not None:
            raise AssertionError(f"replica exited: {replica.log.read_text()}")
        return await health_status(replica.channel) == health_pb2.HealthCheckResponse.SERVING

    await wait_until(serving, within=START_WITHIN_SECONDS, what=f"{replica.address} SERVING")


async def stop_replica(replica: Replica) -> int:
    """SIGTERM, as an orchestrator stops a replica; returns its exit status."""
    await replica.channel.close()
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(replica.process.wait, 20)
    except subprocess.TimeoutExpired:
        replica.process.kill()
        await asyncio.to_thread(replica.process.wait)
        raise


@pytest.fixture(scope="module")
async def replicas(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two replicas on the suite's database, for the tests of one module."""
    logs = tmp_path_factory.mktemp("replicas")
    pair = (
        start_replica(database_url, logs / "a.log"),
        start_replica(database_url, logs / "b.log"),
    )
    try:
        await asyncio.gather(*(wait_serving(r) for r in pair))
        yield pair
    finally:
        exits = await asyncio.gather(*(stop_replica(r) for r in pair))
        # Graceful shutdown on SIGTERM ends with status 0.
        assert exits == [0, 0], [r.log.read_text() for r in pair]
