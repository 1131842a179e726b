"""No request to the console can stall sign-ins (SPEC §4, issue 16): the console's HTTP side runs
in a process of its own, which `twofactor serve` starts, restarts and stops.

One `twofactor serve`, its console attacked from another process (tests/hostile_console.py:
compressed bombs, slow bodies, idle connections, garbage, a SignIn flood), while VerifyCode is
timed over native gRPC in blocks that alternate between attack and quiet, as the sign-in flood
test does (test_password_checks.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.alternating import alternate, verify_code_probe
from tests.replicas import Replica, start_replica, stop_replica, wait_serving
from tests.support import Actors, wait_until
from twofactor_service.console.front_door import RefusalLog
from twofactor_service.store.database import Connection

# Many short blocks: whatever else runs on the machine changes over seconds, and weighs on both
# medians alike only if attacked and quiet blocks alternate faster than that.
PROBES = 15  # per block
BLOCKS = 16  # attacked and quiet blocks, alternating
# The shortest limits: the server ends as many slow bodies and idle connections as it can.
LIMITS = {
    "TWOFACTOR_CONSOLE_HEADER_TIMEOUT_SECONDS": "1",
    "TWOFACTOR_CONSOLE_BODY_TIMEOUT_SECONDS": "1",
    "TWOFACTOR_CONSOLE_IDLE_TIMEOUT_SECONDS": "1",
}
# The server's and its console's memory, together: what it may grow by under attack (argon2
# holds 64 MiB per password check for a moment, two at a time on two cores), and what it may
# keep once the attack is over.
PEAK_GROWTH_BYTES = 384 << 20
REST_GROWTH_BYTES = 32 << 20


def console_processes(serve: psutil.Process) -> list[psutil.Process]:
    """The console processes among `serve`'s descendants that are alive (not zombies)."""
    found = []
    for child in serve.children(recursive=True):
        try:
            if "twofactor_service.console.process" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone meanwhile, or a zombie not yet reaped
            continue
    return found


@pytest.fixture(scope="module")
async def served(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replica]:
    replica = start_replica(
        database_url, tmp_path_factory.mktemp("isolation") / "serve.log", env=LIMITS
    )
    try:
        await wait_serving(replica)
        yield replica
    finally:
        assert await stop_replica(replica) == 0, replica.log.read_text()


async def test_an_attacked_console_leaves_verify_code_health_and_memory_alone(
    served: Replica, actors: Actors, db: Connection
) -> None:
    probe = await verify_code_probe(served.stub, actors, db)

    # Every change of health the server reports while this runs.
    health: Any = health_pb2_grpc.HealthStub(served.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    statuses: list[int] = []

    async def follow_health() -> None:
        async for answer in watch:
            statuses.append(answer.status)

    async def health_known() -> bool:
        return bool(statuses)

    follower = asyncio.create_task(follow_health())
    await wait_until(health_known, within=10, what="the first health status")

    serve = psutil.Process(served.process.pid)

    def resident() -> int:
        """The server's and its console's resident memory, together."""
        return sum(p.memory_info().rss for p in (serve, *console_processes(serve)))

    console_address = served.console_url.removeprefix("http://").rstrip("/")
    peak = at_rest = resident()

    def note_peak() -> None:
        nonlocal peak
        peak = max(peak, resident())

    try:
        timed = await alternate(
            "tests.hostile_console",
            [console_address],
            b"attacking",
            probe,
            blocks=BLOCKS,
            probes=PROBES,
            after_attacked_probe=note_peak,
        )
    finally:
        watch.cancel()
        follower.cancel()
    answers = timed.report

    # The attack was one: each kind was answered by the front door as it should be.
    assert answers["bomb"].get("415", 0) > 0, answers
    # Slow bodies and idle connections were held open in every attacked block (the blocks are
    # shorter than the timeouts that end them: test_console_front_door.py shows those).
    assert answers["opened"]["slow-body"] >= BLOCKS, answers
    assert answers["opened"]["idle"] >= BLOCKS, answers
    assert answers["garbage"].get("400", 0) > 0, answers
    assert answers["sign-in"].get("200", 0) > 0, answers
    # Health never left SERVING.
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}, statuses
    quiet_median = statistics.median(timed.quiet)
    attacked_median = statistics.median(timed.attacked)
    assert attacked_median <= 2 * quiet_median, (
        f"quiet median {quiet_median * 1000:.1f} ms",
        f"attacked median {attacked_median * 1000:.1f} ms",
    )
    # Memory stayed bounded under attack (what a password check holds for a moment aside; a
    # single inflated bomb would be 1 GiB), and is back where it was once the attack ends.
    assert peak - at_rest <= PEAK_GROWTH_BYTES, (at_rest >> 20, peak >> 20)

    async def back_at_rest() -> bool:
        return resident() - at_rest <= REST_GROWTH_BYTES

    await wait_until(back_at_rest, within=30, what=f"memory back near {at_rest >> 20} MiB")
    # And the console took it without dying.
    assert len(console_processes(serve)) == 1


async def test_a_console_process_that_dies_is_started_again_on_the_same_port(
    served: Replica,
) -> None:
    serve = psutil.Process(served.process.pid)
    [console] = console_processes(serve)
    console.kill()

    async def another_one_serves() -> bool:
        running = [p for p in console_processes(serve) if p.pid != console.pid]
        if not running:
            return False
        try:
            _, writer = await asyncio.open_connection(*_host_port(served.console_url))
        except OSError:
            return False
        writer.close()
        return True

    await wait_until(another_one_serves, within=30, what="a new console process listening")
    assert served.process.poll() is None
    # It runs below the gRPC server's CPU priority: in SCHED_IDLE.
    [again] = console_processes(serve)
    assert os.sched_getscheduler(again.pid) == os.SCHED_IDLE
    assert os.sched_getscheduler(serve.pid) == os.SCHED_OTHER


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("ending", ["sigterm", "sigkill"])
async def test_no_console_process_outlives_its_server(
    database_url: str, tmp_path: Path, ending: str
) -> None:
    """SIGTERM of `serve --workers 2` stops every console process with it; a worker killed
    outright (no chance to stop anything) leaves no orphan either: its console notices."""
    replica = start_replica(database_url, tmp_path / "serve.log", "--workers", "2")
    try:
        await wait_serving(replica)
        serve = psutil.Process(replica.process.pid)

        async def two_consoles() -> bool:
            return len(console_processes(serve)) == 2

        await wait_until(two_consoles, within=30, what="a console process per worker")
        consoles = console_processes(serve)
        if ending == "sigterm":
            assert await stop_replica(replica) == 0, replica.log.read_text()
        else:
            worker = consoles[0].parent()
            assert worker is not None
            os.kill(worker.pid, signal.SIGKILL)
            # The supervisor stops the other worker and exits 1 (test_replicas.py).
            assert await asyncio.to_thread(replica.process.wait, 30) == 1
            await replica.channel.close()

        async def all_gone() -> bool:
            return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in consoles)

        await wait_until(all_gone, within=15, what="no console process left")
    finally:
        if replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait()


async def test_malformed_requests_log_one_warning_each_without_a_traceback_rate_limited(
    served: Replica,
) -> None:
    """As `twofactor serve` writes them on stderr: a burst of malformed requests gives at most
    RefusalLog.BURST lines (and one a second after), each a WARNING without a traceback; the
    lines left out are counted in the next one."""
    host, port = _host_port(served.console_url)
    offset = served.log.stat().st_size
    began = time.monotonic()
    for _ in range(3 * RefusalLog.BURST):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        assert b" 400 " in (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")[0]
        writer.close()
    seconds = time.monotonic() - began

    def refusals() -> list[dict[str, Any]]:
        with served.log.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode("utf-8", "replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("logger") == "twofactor_service.console"]

    async def counted_later() -> bool:
        # One more after the rate allows it: its line counts the ones left out.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return any("suppressed" in r for r in refusals())

    await wait_until(counted_later, within=15, what="a line counting the lines left out")
    lines = refusals()
    burst = [r for r in lines if "suppressed" not in r]
    assert 1 <= len(burst) <= RefusalLog.BURST + seconds * RefusalLog.PER_SECOND + 1, len(burst)
    assert all(r["level"] == "WARNING" for r in lines), lines
    assert all("traceback" not in r and "error" not in r for r in lines), lines
    assert {r["event"] for r in lines} == {"malformed HTTP request"}
    assert all(r["status"] == 400 for r in lines)
    assert sum(r.get("suppressed", 0) for r in lines) + len(lines) >= 3 * RefusalLog.BURST
