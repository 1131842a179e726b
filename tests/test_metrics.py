"""Prometheus metrics: a server with TWOFACTOR_METRICS_ADDRESS serves them over HTTP; calls,
VerifyCode outcomes, lockouts and the connection pool show in a real scrape."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
import uuid
from collections.abc import AsyncIterator

import grpc
import pyotp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import PERIOD, Actors, Person, TestClock, wait_until
from tests.test_wire import GARBAGE, raw_call
from twofactor_service.config import ConfigError
from twofactor_service.runtime import Runtime
from twofactor_service.server import RunningServer, start_server
from twofactor_service.store import accounts
from twofactor_service.store.database import Connection
from twofactor_service.transport.metrics import worker_address

SERVICE = "twofactor.v1.TwoFactorService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def metered(runtime: Runtime) -> AsyncIterator[RunningServer]:
    """A second server on the suite's database, with metrics on an ephemeral port."""
    config = dataclasses.replace(runtime.config, metrics_address="127.0.0.1:0")
    running = await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)
    yield running
    await running.stop(grace=1)


@pytest.fixture
async def metered_actors(
    metered: RunningServer, runtime: Runtime, clock: TestClock
) -> AsyncIterator[Actors]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        yield Actors(pb_grpc.TwoFactorServiceStub(channel), runtime, clock, uuid.uuid4().hex[:8])


async def scrape(server: RunningServer) -> Samples:
    assert server.metrics is not None
    url = f"http://127.0.0.1:{server.metrics.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body.decode("utf-8")

    # Off the event loop: a scrape counts lockouts with a query that runs on this loop.
    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str) -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_service=SERVICE,
        grpc_method=method,
        grpc_type="unary",
        grpc_code=code,
    )


def verify_outcome(samples: Samples, outcome: str) -> float:
    return value(samples, "twofactor_verify_code_outcomes_total", outcome=outcome)


def wrong_code(person: Person) -> str:
    """A code that matches no time step the server accepts now (±1 step)."""
    assert person.secret is not None
    now = person.clock.now()
    valid = {pyotp.TOTP(person.secret).at(now + k * PERIOD) for k in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


async def test_calls_and_verify_outcomes_are_counted(
    metered: RunningServer, metered_actors: Actors, runtime: Runtime
) -> None:
    stub = metered_actors.stub
    before = await scrape(metered)

    # A sign-in with enrollment (SignIn + CompleteEnrollment), and a service account's sign-in.
    bob = await metered_actors.user()
    verifier = await metered_actors.service()
    code = bob.next_code()
    results = []
    for attempt in (code, code, wrong_code(bob)):  # valid, replayed, wrong
        response = await stub.VerifyCode(
            pb.VerifyCodeRequest(username=bob.username, code=attempt),
            metadata=verifier.metadata(),
        )
        results.append(response.result)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SignIn(pb.SignInRequest(username=bob.username, password="not the password"))

    after = await scrape(metered)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert results == [
        enums_pb2.VERIFY_CODE_RESULT_OK,
        enums_pb2.VERIFY_CODE_RESULT_FAILED,
        enums_pb2.VERIFY_CODE_RESULT_FAILED,
    ]
    moved = {
        ("SignIn", "OK"): 2,
        ("CompleteEnrollment", "OK"): 1,
        ("VerifyCode", "OK"): 3,
        # The error step's abort, as the client saw it.
        ("SignIn", "UNAUTHENTICATED"): 1,
    }
    for (method, status), count in moved.items():
        assert handled(after, method, status) - handled(before, method, status) == count, method
    histogram_count = {
        "grpc_service": SERVICE,
        "grpc_method": "VerifyCode",
        "grpc_type": "unary",
        "grpc_code": "OK",
    }
    assert (
        value(after, "grpc_server_handling_seconds_count", **histogram_count)
        - value(before, "grpc_server_handling_seconds_count", **histogram_count)
        == 3
    )
    for outcome, count in {"valid": 1, "replayed": 1, "invalid": 1, "locked": 0}.items():
        assert verify_outcome(after, outcome) - verify_outcome(before, outcome) == count, outcome


async def test_locked_verification_and_active_lockouts_are_reported(
    metered: RunningServer, metered_actors: Actors, runtime: Runtime, db: Connection
) -> None:
    stub = metered_actors.stub
    bob = await metered_actors.user()
    verifier = await metered_actors.service()
    before = await scrape(metered)

    # The configured number of free failures locks the account; the next call is not checked.
    free = runtime.config.lockout.free_failures
    results = []
    for _ in range(free + 1):
        response = await stub.VerifyCode(
            pb.VerifyCodeRequest(username=bob.username, code=wrong_code(bob)),
            metadata=verifier.metadata(),
        )
        results.append(response.result)
    assert results == [enums_pb2.VERIFY_CODE_RESULT_FAILED] * free + [
        enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
    ]

    # Other tests' lockouts can only expire meanwhile, so the scrape lies between two counts.
    counted_before = await accounts.count_locked_out(db)
    after = await scrape(metered)
    counted_after = await accounts.count_locked_out(db)

    assert verify_outcome(after, "invalid") - verify_outcome(before, "invalid") == free
    assert verify_outcome(after, "locked") - verify_outcome(before, "locked") == 1
    assert counted_after >= 1
    assert counted_after <= value(after, "twofactor_active_lockouts") <= counted_before
    assert value(after, "twofactor_database_up") == 1


async def test_pool_usage_is_reported(metered: RunningServer, runtime: Runtime) -> None:
    samples = await scrape(metered)

    size = value(samples, "twofactor_database_pool_connections")
    idle = value(samples, "twofactor_database_pool_idle_connections")
    assert value(samples, "twofactor_database_pool_max_connections") == runtime.pool.get_max_size()
    assert 0 <= idle <= size <= runtime.pool.get_max_size()
    assert size >= 1
    # The process collector is there too (resident memory, open file descriptors).
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_requests_refused_by_authentication_are_counted_with_their_status(
    metered: RunningServer, metered_actors: Actors
) -> None:
    before = await scrape(metered)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await metered_actors.stub.VerifyCode(pb.VerifyCodeRequest(username="x", code="123456"))

    after = await scrape(metered)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        handled(after, "VerifyCode", "UNAUTHENTICATED")
        - handled(before, "VerifyCode", "UNAUTHENTICATED")
        == 1
    )
    # Refused before the code was looked at: no VerifyCode outcome.
    for outcome in ("valid", "invalid", "replayed", "locked"):
        assert verify_outcome(after, outcome) == verify_outcome(before, outcome)


def test_metrics_are_off_without_an_address(server: RunningServer) -> None:
    assert server.metrics is None


@pytest.mark.parametrize(
    ("base", "index", "expected"),
    [
        ("0.0.0.0:9464", 0, "0.0.0.0:9464"),
        ("0.0.0.0:9464", 3, "0.0.0.0:9467"),
        ("[::]:9464", 1, "[::]:9465"),
        ("127.0.0.1:0", 2, "127.0.0.1:0"),
    ],
)
def test_each_worker_serves_metrics_on_its_own_port(base: str, index: int, expected: str) -> None:
    assert worker_address(base, index) == expected


@pytest.mark.parametrize("address", ["9464", "host:", "host:port", "host:70000"])
def test_a_malformed_metrics_address_is_a_configuration_error(address: str) -> None:
    with pytest.raises(ConfigError, match="TWOFACTOR_METRICS_ADDRESS"):
        worker_address(address, 0)


async def test_bytes_that_are_not_the_request_are_counted_like_any_refusal(
    metered: RunningServer,
) -> None:
    before = handled(await scrape(metered), "VerifyCode", "INVALID_ARGUMENT")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{metered.port}") as channel:
        for body in GARBAGE:
            with pytest.raises(grpc.aio.AioRpcError):
                await raw_call(channel, "VerifyCode", body, streaming=False)

    async def counted() -> bool:
        # The count is taken as the call ends on the server, just after the client has its answer.
        after = handled(await scrape(metered), "VerifyCode", "INVALID_ARGUMENT")
        assert after <= before + len(GARBAGE)
        return after == before + len(GARBAGE)

    await wait_until(counted, within=5, what="every garbage call counted as INVALID_ARGUMENT")
