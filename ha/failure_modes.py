"""The failure modes of docs/high-availability.md's table that `make test-ha` does not run, on
the same pg_auto_failover cluster: the primary's postmaster killed (its keeper restarts it), the
primary made read-only for a while, and a replica on a single-host URL while its one host is
frozen (and failed over). Prints, for each, what the calls got and how long writes failed.

    .venv/bin/python -m ha.failure_modes

A replica on the multi-host URL writes all the time (`multi`), and for the freeze a second one
on the primary's URL alone (`single`). Each sends a SignIn (a session: one write) every 0.1 s
with a 10 s deadline. Everything
it starts is stopped by PID; a frozen node is resumed on any way out. HA_KEEP=1 keeps the
cluster's directory (logs) under /tmp.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import psutil
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from ha.cluster import Cluster, install_thaw_guards, running_cluster
from ha.service import service_env, start_replica, stop_replica, twofactor, wait_serving
from twofactor_service.encryption import new_key_line

PASSWORD = "failure modes password, never a real one"  # noqa: S105
DEADLINE_SECONDS = 10.0
READ_ONLY_SECONDS = 5.0
FROZEN_SECONDS = 15.0


@dataclass
class Call:
    started: float
    ended: float
    code: grpc.StatusCode


@dataclass
class Writer:
    name: str
    stub: pb_grpc.TwoFactorServiceAsyncStub
    calls: list[Call] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        request = pb.SignInRequest(username="modes-probe", password=PASSWORD)
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.stub.SignIn(request, timeout=DEADLINE_SECONDS)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            self.calls.append(Call(started, time.monotonic(), code))
            await asyncio.sleep(0.1)

    def summary(self, since: float, until: float) -> str:
        calls = [c for c in self.calls if since <= c.started < until]
        codes = collections.Counter(c.code.name for c in calls)
        failed = [c for c in calls if c.code != grpc.StatusCode.OK]
        back = next(
            (c.started for c in calls if c.code == grpc.StatusCode.OK and c.started > since), None
        )
        last_failure = max((c.ended for c in failed), default=None)
        longest = max((c.ended - c.started for c in calls), default=0.0)
        gap = (
            f"writes failed for {last_failure - since:.1f} s"
            if last_failure is not None
            else "no write failed"
        )
        first = f"first OK at +{back - since:.1f} s" if back is not None else "no OK"
        return f"{self.name}: {gap}; {first}; longest call {longest:.1f} s; " + ", ".join(
            f"{n} {k}" for k, n in codes.most_common()
        )


async def _alter(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _settle(cluster: Cluster) -> None:
    await cluster.wait_until(cluster.healthy, within=180, what="primary + secondary again")
    await asyncio.sleep(3)  # both replicas serving on the healthy cluster


async def run(base: Path) -> None:
    keys = new_key_line("modes")
    async with running_cluster(base) as cluster:
        multi_url = cluster.database_url
        settings = {"log_level": "WARNING", "console_address": ""}
        replicas = [start_replica("multi", base / "logs", multi_url, keys, **settings)]
        stop = asyncio.Event()
        channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
        try:
            await asyncio.gather(*(wait_serving(r) for r in replicas))
            env = service_env(multi_url, keys)
            code, output = await twofactor(
                env, "create-user", "modes-probe", "--exclude", "--password", PASSWORD
            )
            if code != 0:
                raise RuntimeError(output)
            writers = [
                Writer(r.name, pb_grpc.TwoFactorServiceStub(c))
                for r, c in zip(replicas, channels, strict=True)
            ]
            tasks = [asyncio.create_task(w.run(stop)) for w in writers]
            await asyncio.sleep(3)

            # 1. The primary's postmaster alone, SIGKILL: its keeper restarts PostgreSQL.
            primary = await cluster.primary()
            assert primary is not None
            postmaster = primary.postmaster_pid()
            assert postmaster is not None
            at = time.monotonic()
            psutil.Process(postmaster).send_signal(signal.SIGKILL)
            await asyncio.sleep(10)
            after = await cluster.primary()
            print(
                f"postmaster of {primary.name} killed (SIGKILL; its keeper restarts it); "
                + (
                    "no failover"
                    if after is primary
                    else "the keeper reported PostgreSQL down and the monitor failed over"
                )
                + ":"
            )
            for writer in writers:
                print("   ", writer.summary(at, time.monotonic()))
            await _settle(cluster)

            # 2. The primary read-only for a while (default_transaction_read_only).
            primary = await cluster.primary()
            assert primary is not None
            url = cluster.node_url(primary)
            at = time.monotonic()
            await _alter(url, "ALTER SYSTEM SET default_transaction_read_only = on")
            await asyncio.sleep(READ_ONLY_SECONDS)
            writable_again = time.monotonic()
            await _alter(url, "ALTER SYSTEM RESET default_transaction_read_only")
            await asyncio.sleep(5)
            print(
                f"primary read-only for {writable_again - at:.1f} s (ALTER SYSTEM "
                "default_transaction_read_only, reload), then writable again:"
            )
            for writer in writers:
                print("   ", writer.summary(at, time.monotonic()))
                back = next(
                    (
                        c.started
                        for c in writer.calls
                        if c.started > writable_again and c.code == grpc.StatusCode.OK
                    ),
                    None,
                )
                if back is not None:
                    print(f"      first OK {back - writable_again:.1f} s after writable again")
            await _settle(cluster)

            # 3. The node frozen: `single` has no other host; `multi` follows the failover.
            primary = await cluster.primary()
            assert primary is not None
            single = start_replica(
                "single", base / "logs", cluster.node_url(primary), keys, **settings
            )
            replicas.append(single)
            channels.append(grpc.aio.insecure_channel(single.address))
            await wait_serving(single)
            writers.append(Writer("single", pb_grpc.TwoFactorServiceStub(channels[-1])))
            tasks.append(asyncio.create_task(writers[-1].run(stop)))
            await asyncio.sleep(3)
            at = time.monotonic()
            frozen = cluster.freeze(primary)
            try:
                await asyncio.sleep(FROZEN_SECONDS)
            finally:
                cluster.thaw(frozen)
            await asyncio.sleep(5)
            print(f"{primary.name} frozen (SIGSTOP) for {FROZEN_SECONDS:.0f} s, then resumed:")
            for writer in writers:
                print("   ", writer.summary(at, time.monotonic()))
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            for channel in channels:
                await channel.close()
            for replica in replicas:
                await asyncio.to_thread(stop_replica, replica)


def main() -> int:
    install_thaw_guards()
    base = Path(tempfile.mkdtemp(prefix="twofactor-modes-"))
    try:
        asyncio.run(run(base))
    except Exception as exc:  # noqa: BLE001 - said, and the logs kept
        print(f"FAIL {type(exc).__name__}: {exc}\nlogs kept in {base}/logs")
        return 1
    if os.environ.get("HA_KEEP") == "1":
        print(f"logs kept in {base}/logs")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
