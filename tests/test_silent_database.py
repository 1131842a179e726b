"""A database that stops answering without closing anything: a frozen primary (SIGSTOP, a
paused VM), a black-holed network path. The connections stay open and nothing comes back.

Every wait on the database is bounded (store/database.py): a call answers UNAVAILABLE with
DATABASE_UNAVAILABLE and RetryInfo well before the client's 10 s deadline, never
DEADLINE_EXCEEDED; health turns NOT_SERVING within about 2 s; and when the database answers
again the service serves again by itself. A proxy in this test stands between the service and
the suite's PostgreSQL and stops forwarding, in both directions, while it is "frozen": it
still accepts connections and holds what it reads, as a frozen server's kernel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.support import (
    VERIFY_RIGHT,
    Actors,
    TestClock,
    error_reason,
    health_status,
    local_service,
    retry_delay_seconds,
    scratch_database,
    wait_until,
)
from twofactor_service.store import database

CLIENT_DEADLINE_SECONDS = 10.0
# The service's own bound on a call that meets a silent database (connect 2 s per host, or a
# statement 4 s; database.py), with room for this shared machine: far inside the deadline.
ANSWERED_WITHIN_SECONDS = 7.0
# The health watcher probes every second, each probe bounded to 1 s: NOT_SERVING within 2 s,
# plus the health Check call itself.
NOT_SERVING_WITHIN_SECONDS = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FreezingProxy:
    """TCP on 127.0.0.1 to the PostgreSQL of `upstream` (a unix socket directory or a host),
    forwarding while `flowing` is set and holding everything while it is cleared."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.flowing.wait()  # a frozen server's kernel accepts; nothing answers
            host, port = self.upstream
            if host.startswith("/"):
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            await self.flowing.wait()
            data = await source.read(65536)
            if not data:
                sink.close()
                return
            await self.flowing.wait()  # what was read just before the freeze is held too
            sink.write(data)
            await sink.drain()


def _through(url: str, port: int) -> str:
    """`url` with its host(s) replaced by 127.0.0.1:`port`."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    query.pop("host", None)
    query.pop("port", None)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, doseq=True)))


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    async with scratch_database(database_url) as url:
        freezing = FreezingProxy(database.host_list(url)[0])
        await freezing.start()
        try:
            yield freezing, _through(url, freezing.port)
        finally:
            await freezing.stop()


async def test_a_silent_database_answers_unavailable_in_time_and_health_follows(
    proxy: tuple[FreezingProxy, str],
) -> None:
    freezing, url = proxy
    clock = TestClock()
    async with local_service(url, clock) as service:
        actors = Actors(service.stub, service.runtime, clock, "silent")
        verifier = await actors.service(VERIFY_RIGHT)
        owner = await actors.user()

        async def verify() -> pb.VerifyCodeResponse:
            clock.advance(30)  # a fresh step for every attempt: never a replay
            response: pb.VerifyCodeResponse = await service.stub.VerifyCode(
                pb.VerifyCodeRequest(username=owner.username, code=owner.code_now()),
                metadata=verifier.metadata(),
                timeout=CLIENT_DEADLINE_SECONDS,
            )
            return response

        async def serving() -> bool:
            return await health_status(service.channel) == SERVING

        async def not_serving() -> bool:
            return await health_status(service.channel) == NOT_SERVING

        assert (await verify()).result == enums_pb2.VERIFY_CODE_RESULT_OK
        await wait_until(serving, within=5, what="health SERVING before the freeze")

        freezing.flowing.clear()
        frozen_at = time.monotonic()

        async def verify_while_frozen() -> tuple[grpc.aio.AioRpcError, float]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await verify()
            return failure.value, time.monotonic() - frozen_at

        call = asyncio.create_task(verify_while_frozen())
        await wait_until(
            not_serving,
            within=NOT_SERVING_WITHIN_SECONDS,
            what="health NOT_SERVING after the database went silent",
        )
        error, seconds = await call
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), seconds)
        assert error_reason(error) == "DATABASE_UNAVAILABLE"
        assert retry_delay_seconds(error) == 1
        assert seconds < ANSWERED_WITHIN_SECONDS, seconds

        # Later calls, on a pool that must connect again, are bounded the same way.
        later, seconds = await verify_while_frozen()
        assert later.code() == grpc.StatusCode.UNAVAILABLE, (later.code(), seconds)
        assert error_reason(later) == "DATABASE_UNAVAILABLE"
        assert await health_status(service.channel) == NOT_SERVING

        freezing.flowing.set()
        await wait_until(serving, within=15, what="health SERVING once the database answers")
        assert (await verify()).result == enums_pb2.VERIFY_CODE_RESULT_OK


async def test_a_server_on_an_older_timeline_is_refused(database_url: str) -> None:
    """An old primary that was resumed after a failover still accepts writes, on the timeline
    it had; the pool has written to the new primary, on a newer one. Here the pool is told it
    saw a newer timeline of the suite's PostgreSQL than the one it runs on."""
    async with scratch_database(database_url) as url:
        pool = await database.create_pool(url, 2)
        try:
            guard = database.guard_of(pool)
            assert guard is not None
            assert await database.writability(pool) is database.Writability.WRITABLE
            ((system, timeline),) = guard.timelines.items()
            guard.timelines[system] = timeline + 1
            await guard.drop()  # the pool's connections predate the "promotion"
            with pytest.raises(database.StalePrimary):
                async with pool.acquire():
                    pass
            assert await database.writability(pool) is not database.Writability.WRITABLE
            # The same server once the pool has seen no newer timeline (a new cluster, say).
            guard.timelines.clear()
            assert await database.writability(pool) is database.Writability.WRITABLE
        finally:
            pool.terminate()


def test_the_last_primary_is_tried_first_and_silent_hosts_last() -> None:
    guard = database.Guard()
    hosts = [("db1", 5432), ("db2", 5432), ("db3", 5432)]
    assert guard.order(hosts) == hosts
    guard.admit("db2:5432", 7, 3)
    assert guard.order(hosts) == [("db2", 5432), ("db1", 5432), ("db3", 5432)]
    guard.suspect("db2:5432")
    guard.suspect("db1:5432")
    assert guard.order(hosts) == [("db3", 5432), ("db1", 5432), ("db2", 5432)]
    with pytest.raises(database.StalePrimary):
        guard.admit("db1:5432", 7, 2)
    guard.admit("db3:5432", 8, 1)  # another cluster: its own timelines
    assert guard.timelines == {7: 3, 8: 1}
