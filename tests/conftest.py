"""Fixtures: a real PostgreSQL (embedded, or TWOFACTOR_TEST_DATABASE_URL), a real
TwoFactorService on an ephemeral port, a real channel, and the standard actors.

Each run gets a database of its own, so runs never see each other's data. Tests make accounts
with unique names, so they never depend on each other either.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.grpc_web import GrpcWebChannel
from tests.support import (
    Actors,
    TestClock,
    make_runtime,
    temporary_database,
)
from twofactor_service.logs import JsonFormatter
from twofactor_service.runtime import Runtime
from twofactor_service.server import RunningServer, start_server
from twofactor_service.store.database import Connection

# The `replicas` fixture: two `twofactor serve` processes on the suite's database.
pytest_plugins = ("tests.replicas",)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with temporary_database(
        os.environ.get("TWOFACTOR_TEST_DATABASE_URL"), tmp_path_factory.mktemp("pg")
    ) as url:
        yield url


@pytest.fixture(scope="session")
def clock() -> TestClock:
    return TestClock()


@pytest.fixture(scope="session")
async def runtime(database_url: str, clock: TestClock) -> AsyncIterator[Runtime]:
    runtime = await make_runtime(database_url, clock)
    yield runtime
    await runtime.pool.close()


@pytest.fixture(scope="session")
async def server(runtime: Runtime) -> AsyncIterator[RunningServer]:
    running = await start_server(runtime.config, runtime.pool, runtime.key_ring, runtime=runtime)
    yield running
    await running.stop(grace=1)


@pytest.fixture(scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.TwoFactorServiceAsyncStub:
    return pb_grpc.TwoFactorServiceStub(channel)


@pytest.fixture(scope="session")
async def web_stub(server: RunningServer) -> AsyncIterator[pb_grpc.TwoFactorServiceAsyncStub]:
    """The same service as `stub`, reached as a browser reaches it: gRPC-Web to the console."""
    assert server.console is not None
    channel = GrpcWebChannel(server.console.url)
    yield pb_grpc.TwoFactorServiceStub(channel)  # type: ignore[call-overload]
    await channel.close()


@pytest.fixture
def actors(stub: pb_grpc.TwoFactorServiceAsyncStub, runtime: Runtime, clock: TestClock) -> Actors:
    """Makes accounts in every standard role; names are unique to the test."""
    return Actors(stub, runtime, clock, prefix=uuid.uuid4().hex[:8])


@pytest.fixture
async def db(runtime: Runtime) -> AsyncIterator[Connection]:
    """A direct connection, for asserting what is stored (and that nothing changed)."""
    async with runtime.pool.acquire() as conn:
        yield conn


class Lines(logging.Handler):
    """Every record, formatted exactly as `twofactor serve` writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def write_line(self, line: str) -> None:
        """The access log's lines, built without a record (logs.write_line)."""
        self.lines.append(line)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    root = logging.getLogger()
    handler = Lines()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
