"""`make test-ha`: PostgreSQL failovers under load, and what survives them (SPEC §4,
docs/high-availability.md).

1. A pg_auto_failover cluster on local ports (ha/cluster.py): a monitor, a primary and its
   synchronous standby; two `twofactor serve` replicas on the multi-host URL.
2. Mixed load from one client on both replicas (ha/load.py), every answer recorded.
3. The primary's machine "dies" (SIGKILL to its pg_autoctl and its PostgreSQL); the monitor
   promotes the standby; the load keeps going. Checked: no acknowledged change missing on the
   new primary (SQL), no time step accepted twice, a code accepted before is refused after,
   failure counts and lockouts kept, only UNAVAILABLE (DATABASE_UNAVAILABLE, RetryInfo) while
   there is no writable primary, health NOT_SERVING then SERVING, `twofactor verify-audit`
   passes. Prints `failover: unavailable for X s, throughput back to Y% of before within Z s`.
4. The old primary rejoins as standby; the same in the other direction.

Two modes, each on a cluster of its own (HA_MODE=kill, freeze, or both, the default):
- kill: the primary's machine dies (SIGKILL), as above;
- freeze: the primary's machine is paused: SIGSTOP to its pg_autoctl, its postmaster and
  every backend, SIGCONT after 25 s. Its connections stay open and nothing answers. Checked
  as well: no DEADLINE_EXCEEDED, no answer that contradicts an acknowledged change (accounts
  created on the new primary are never NOT_FOUND after the old one resumes), health
  NOT_SERVING within about 2 s and for as long as writes fail, and the resumed old primary
  acknowledges nothing (sessions opened on it before the freeze try to commit right after it
  resumes; none succeeds, and none of their rows is on the new primary).
Both modes: the first acknowledged write at most 10 s after the kill or the freeze.

Exits 0 only when every check holds. Everything it started is stopped by PID, and a frozen
node is resumed on any way out (try/finally, atexit, SIGTERM/SIGINT/SIGHUP).
Knobs: HA_KEEP=1 keeps the cluster's directory (logs) under /tmp; HA_LOAD_RATE=N offers N
operations/s (default 40; 0: as fast as the replicas answer); HA_MODE (above).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from ha import checks
from ha.checks import Failover
from ha.cluster import (
    FREEZE_SECONDS,
    Cluster,
    ClusterError,
    Node,
    install_thaw_guards,
    running_cluster,
)
from ha.load import (
    PASSWORD,
    CodeAccount,
    CycleAccount,
    Load,
    code_at,
    secret_from_base32,
    step_now,
)
from ha.service import (
    VERIFY_RIGHT,
    Replica,
    secret_of,
    seed_enrolled_accounts,
    service_env,
    start_replica,
    stop_replica,
    twofactor,
    wait_serving,
)
from twofactor_service.encryption import new_key_line

# Targets: the first acknowledged write at most 10 s after the kill or the freeze (issue 17),
# both replicas acknowledging again within 30 s (issue 11), with pg_auto_failover's documented
# tuning (ha/cluster.py), and 90% of the throughput before within 5 s once a writable primary
# is back.
MAX_GAP_SECONDS = 10.0
MAX_UNAVAILABLE_SECONDS = 30.0
# Health turns NOT_SERVING within 2 s of writes starting to fail (the replica's watcher probes
# every second, each probe bounded to 1 s), seen by a poll every 0.2 s.
HEALTH_NOT_SERVING_WITHIN_SECONDS = 2.5
# The freeze mode's probes: sessions on the old primary that try to commit once it resumes,
# and accounts created on the new primary that must never be NOT_FOUND after it.
FENCE_SESSIONS = 4
FENCE_WAIT_SECONDS = 8.0
FRESH_ACCOUNTS = 4
STALE_READ_SECONDS = 6.0
MODES = ("kill", "freeze")
RECOVERY_SHARE = 0.90
RECOVERY_WITHIN_SECONDS = 5.0
# Throughput is measured over this long before each kill; the load runs this long after the
# primary is back before the checks.
BASELINE_SECONDS = 10.0
OBSERVE_SECONDS = 10.0
WITHIN_SECONDS = 600.0
# Each takes at most two valid codes per 30 s (the ±1 window), and calls that fail during a
# failover use steps up too: enough that the load is never short of them.
SEEDED_ACCOUNTS = 20_000
CYCLE_ACCOUNTS = 8
REPLAY_PROBES = 10
FAILOVERS = 2
# The load offered, in operations per second over both replicas (HA_LOAD_RATE; 0: as fast as
# they answer). Well below what this shared 2-core machine serves even when busy (60-130 calls/s
# saturated), so the throughput measured is the service's, not what the neighbours leave.
LOAD_RATE = float(os.environ.get("HA_LOAD_RATE", "40"))
LOCKED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


class Report:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    def check(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed.append(name)
            self.say(f"FAIL {name}")
            for problem in problems[:10]:
                print(f"         - {problem}", flush=True)
            if len(problems) > 10:
                print(f"         - ... and {len(problems) - 10} more", flush=True)
        else:
            self.say(f"ok   {name}")


@dataclass
class Setup:
    stubs: dict[str, pb_grpc.TwoFactorServiceAsyncStub]
    channels: list[grpc.aio.Channel]
    verifier_token: str
    admin_token: str
    cycle_accounts: list[CycleAccount]


async def bootstrap(
    env: dict[str, str], url: str, keys: str, replicas: list[Replica], report: Report
) -> Setup:
    """The accounts: an administrator and a verifying service account (command line, then
    sign-in through the API), thousands of enrolled accounts (SQL), and the cycled ones (the
    administrator's CreateAccount)."""
    for args in (
        ["create-user", "ha-admin", "--admin", "--password", PASSWORD],
        [
            "create-user",
            "ha-verifier",
            "--exclude",
            "--right",
            *VERIFY_RIGHT,
            "--password",
            PASSWORD,
        ],
    ):
        code, output = await twofactor(env, *args)
        if code != 0:
            raise RuntimeError(f"twofactor {args[0]} {args[1]} failed: {output}")
    names = [f"ha-user-{i:05d}" for i in range(SEEDED_ACCOUNTS)]
    names += [f"ha-probe-{r}-{kind}" for r in range(FAILOVERS) for kind in ("counter", "lockout")]
    names += [f"ha-probe-{r}-replay-{i}" for r in range(FAILOVERS) for i in range(REPLAY_PROBES)]
    started = time.monotonic()
    await seed_enrolled_accounts(url, keys, names, PASSWORD)
    report.say(f"seeded {len(names)} enrolled accounts in {time.monotonic() - started:.1f} s")

    channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
    stubs = {
        r.name: pb_grpc.TwoFactorServiceStub(c) for r, c in zip(replicas, channels, strict=True)
    }
    stub = stubs[replicas[0].name]
    verifier = await stub.SignIn(pb.SignInRequest(username="ha-verifier", password=PASSWORD))
    admin = await stub.SignIn(pb.SignInRequest(username="ha-admin", password=PASSWORD))
    secret = secret_from_base32(admin.enrollment.pending_key.secret_base32)
    enrolled = await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=admin.enrollment.enrollment_ticket, code=code_at(secret, step_now())
        )
    )
    metadata = (("authorization", f"Bearer {enrolled.session.token}"),)
    cycle_accounts = []
    for i in range(CYCLE_ACCOUNTS):
        created = await stub.CreateAccount(
            pb.CreateAccountRequest(
                username=f"ha-cycle-{i}", kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password=PASSWORD
            ),
            metadata=metadata,
        )
        cycle_accounts.append(CycleAccount(f"ha-cycle-{i}", PASSWORD, created.status.state))
    return Setup(stubs, channels, verifier.session.token, enrolled.session.token, cycle_accounts)


async def watch_health(
    replicas: list[Replica], samples: list[tuple[float, str, int]], stop: asyncio.Event
) -> None:
    """grpc.health.v1 of every replica, every 0.2 s, as a load balancer would poll it."""
    channels = {r.name: grpc.aio.insecure_channel(r.address) for r in replicas}
    # The generated health stub has no type hints for its methods.
    stubs: dict[str, Any] = {name: health_pb2_grpc.HealthStub(c) for name, c in channels.items()}
    try:
        while not stop.is_set():
            for name, stub in stubs.items():
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    status = answer.status
                except grpc.aio.AioRpcError:
                    status = -1
                samples.append((time.monotonic(), name, status))
            await asyncio.sleep(0.2)
    finally:
        for channel in channels.values():
            await channel.close()


async def wait_writable(cluster: Cluster, within: float) -> float:
    """When a data node takes writes again (each polled every 0.1 s, with a timeout of its
    own: a frozen node must not hold up the others, as it would in one multi-host connect)."""
    deadline = time.monotonic() + within

    async def writable(node: Node) -> bool:
        try:
            conn = await asyncpg.connect(
                cluster.node_url(node) + "?target_session_attrs=read-write", timeout=1
            )
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # TargetServerAttributeNotMatched: a standby
            TimeoutError,
        ):
            return False
        conn.terminate()
        return True

    async def poll(node: Node) -> float:
        while time.monotonic() < deadline:
            if await writable(node):
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise ClusterError(f"no writable primary within {within:.0f} s")

    pollers = [asyncio.create_task(poll(n)) for n in cluster.nodes]
    try:
        for first in asyncio.as_completed(pollers):
            with contextlib.suppress(ClusterError):
                return await first
    finally:
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
    raise ClusterError(f"no writable primary within {within:.0f} s")


class Probes:
    """Deterministic probes of one failover, on accounts the load never touches: a failure
    count, a lockout and accepted codes, each acknowledged before the kill and checked after."""

    def __init__(self, load: Load, round_number: int, replicas: list[str]) -> None:
        self.load = load
        self.replicas = replicas

        def account(kind: str) -> CodeAccount:
            name = f"ha-probe-{round_number}-{kind}"
            return CodeAccount(name, secret_of(name))

        self.counter = account("counter")
        self.lockout = account("lockout")
        self.replays = [account(f"replay-{i}") for i in range(REPLAY_PROBES)]
        self.accepted: list[tuple[CodeAccount, int, float]] = []
        self.problems: list[str] = []

    async def _status(self, replica: str, account: CodeAccount) -> pb.AccountStatus | None:
        stub = self.load.stubs[replica]
        request = pb.GetAccountStatusRequest(username=account.username)
        response, _ = await self.load.call(
            replica,
            "GetAccountStatus",
            account.username,
            lambda m, t: stub.GetAccountStatus(request, metadata=m, timeout=t),
            self.load.admin,
        )
        return None if response is None else response.status

    async def _wrong(self, replica: str, account: CodeAccount) -> int | None:
        response, outcome = await self.load.call(
            replica,
            "VerifyCode",
            account.username,
            lambda m, t: self.load.stubs[replica].VerifyCode(
                pb.VerifyCodeRequest(username=account.username, code=_wrong_code(account)),
                metadata=m,
                timeout=t,
            ),
            self.load.verifier,
            allowed=LOCKED,
        )
        if outcome.code in LOCKED:
            return enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
        return None if response is None else response.result

    async def before(self) -> None:
        first = self.replicas[0]
        for _ in range(3):
            if await self._wrong(first, self.counter) != enums_pb2.VERIFY_CODE_RESULT_FAILED:
                self.problems.append("a wrong code was not refused")
        status = await self._status(first, self.counter)
        if status is None or status.consecutive_failures != 3:
            self.problems.append(f"3 failures acknowledged, status says {status}")
        for _ in range(12):
            if (
                await self._wrong(first, self.lockout)
                == enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
            ):
                break
        else:
            self.problems.append("12 wrong codes did not lock the account")
        status = await self._status(first, self.lockout)
        if status is None or not status.HasField("locked_until"):
            self.problems.append("the lockout is not in the account's status")
        for index, account in enumerate(self.replays):
            step = step_now() + 1  # the next step: still in the window well after the failover
            replica = self.replicas[index % len(self.replicas)]
            response, outcome = await self.load.verify_code(
                replica, account, code_at(account.secret, step)
            )
            if response is None or response.result != enums_pb2.VERIFY_CODE_RESULT_OK:
                self.problems.append(f"a valid code was not accepted: {outcome.code.name}")
                continue
            self.load.accept(account, step, outcome)
            self.accepted.append((account, step, outcome.ended))

    async def after(self) -> int:
        """Checks the probes on the new primary; returns how many replays were refused."""
        second = self.replicas[-1]
        status = await self._status(second, self.counter)
        if status is None or status.consecutive_failures != 3:
            got = None if status is None else status.consecutive_failures
            self.problems.append(f"3 failures were acknowledged before the failover; now {got}")
        lockout = self.lockout
        result = None
        step = step_now()
        response, outcome = await self.load.verify_code(
            second, lockout, code_at(lockout.secret, step)
        )
        if outcome.code in LOCKED:
            result = enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS
        elif response is not None:
            result = response.result
        if result != enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS:
            self.problems.append(f"the lockout did not survive the failover: {result}")
        refused = 0
        for index, (account, step, accepted_at) in enumerate(self.accepted):
            if step < step_now() - 1:
                self.problems.append("replay probe out of the code window: failover too slow")
                continue
            replica = self.replicas[(index + 1) % len(self.replicas)]
            refused += await self.load.replay(replica, account, step, accepted_at)
        if refused != len(self.accepted):
            self.problems.append(
                f"{len(self.accepted) - refused} codes accepted before the failover were not "
                "refused after it"
            )
        return refused


class FreezeProbes:
    """What a frozen and resumed old primary must not do: acknowledge a commit, or let the
    service answer from data older than what the new primary acknowledged."""

    def __init__(self, cluster: Cluster, old: Node, load: Load, round_number: int) -> None:
        self.cluster = cluster
        self.old = old
        self.load = load
        self.round_number = round_number
        self.sessions: list[asyncpg.Connection] = []
        self.tags: list[str] = []
        self.fresh: list[str] = []
        self.acknowledged_by_old: list[str] = []
        self.refusals: collections.Counter[str] = collections.Counter()
        self.stale_answers: list[str] = []
        self.stale_reads = 0

    async def open(self) -> None:
        """Before the freeze: sessions on the old primary, past their connection set-up."""
        url = self.cluster.node_url(self.old)
        for _ in range(FENCE_SESSIONS):
            self.sessions.append(await asyncpg.connect(url, timeout=5))

    async def create_fresh_accounts(self, replica: str) -> None:
        """Once the new primary takes writes: accounts acknowledged there only."""
        stub = self.load.stubs[replica]
        for i in range(FRESH_ACCOUNTS):
            name = f"ha-fresh-{self.round_number}-{i}"
            request = pb.CreateAccountRequest(
                username=name, kind=enums_pb2.ACCOUNT_KIND_INTERNAL, password=PASSWORD
            )

            def create(
                metadata: tuple[tuple[str, str], ...],
                timeout: float,
                request: pb.CreateAccountRequest = request,
            ) -> Any:
                return stub.CreateAccount(request, metadata=metadata, timeout=timeout)

            for _ in range(20):
                _, outcome = await self.load.call(
                    replica,
                    "CreateAccount",
                    name,
                    create,
                    self.load.admin,
                    allowed=frozenset({grpc.StatusCode.ALREADY_EXISTS}),
                )
                if outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS):
                    self.fresh.append(name)
                    break

    async def after_resume(self) -> None:
        """Right after SIGCONT: every session tries to commit a row; meanwhile every replica is
        asked, again and again, for the accounts the new primary acknowledged."""
        await asyncio.gather(
            *(self._commit(i, conn) for i, conn in enumerate(self.sessions)),
            self._read_fresh(),
        )

    async def _commit(self, index: int, conn: asyncpg.Connection) -> None:
        tag = f"fence-{self.round_number}-{index}"
        self.tags.append(tag)
        try:
            async with asyncio.timeout(FENCE_WAIT_SECONDS):
                await conn.execute("INSERT INTO ha_fence (tag) VALUES ($1)", tag)
            self.acknowledged_by_old.append(tag)
        except TimeoutError:
            self.refusals["no answer within 8 s (waiting for a synchronous standby)"] += 1
        except asyncpg.PostgresError as error:
            self.refusals[f"{type(error).__name__} {error.sqlstate}"] += 1
        except (OSError, asyncpg.InterfaceError) as error:
            self.refusals[f"connection lost ({type(error).__name__})"] += 1
        finally:
            conn.terminate()

    async def _read_fresh(self) -> None:
        until = time.monotonic() + STALE_READ_SECONDS
        while time.monotonic() < until:
            for replica, stub in self.load.stubs.items():
                for name in self.fresh:
                    request = pb.GetAccountStatusRequest(username=name)

                    def status(
                        metadata: tuple[tuple[str, str], ...],
                        timeout: float,
                        request: pb.GetAccountStatusRequest = request,
                        stub: Any = stub,
                    ) -> Any:
                        return stub.GetAccountStatus(request, metadata=metadata, timeout=timeout)

                    _, outcome = await self.load.call(
                        replica,
                        "GetAccountStatus",
                        name,
                        status,
                        self.load.admin,
                        allowed=frozenset({grpc.StatusCode.NOT_FOUND}),
                    )
                    self.stale_reads += 1
                    if outcome.code == grpc.StatusCode.NOT_FOUND:
                        self.stale_answers.append(
                            f"{name}: NOT_FOUND from {replica}, created and acknowledged before"
                        )
            await asyncio.sleep(0.2)

    async def rows_on(self, url: str) -> list[str]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT tag FROM ha_fence WHERE tag = ANY($1::text[])", self.tags
            )
        finally:
            await conn.close()
        return [r["tag"] for r in rows]


def _wrong_code(account: CodeAccount) -> str:
    now = step_now()
    valid = {code_at(account.secret, s) for s in range(now - 2, now + 3)}
    return next(f"{n:06d}" for n in range(1000) if f"{n:06d}" not in valid)


async def failover(
    number: int,
    cluster: Cluster,
    load: Load,
    replicas: list[Replica],
    url: str,
    env: dict[str, str],
    health: list[tuple[float, str, int]],
    report: Report,
    mode: str,
) -> Failover:
    old = await cluster.primary()
    if old is None or not await cluster.healthy():
        raise ClusterError("the cluster is not primary + secondary before the failover")
    new = next(n for n in cluster.nodes if n is not old)
    names = [r.name for r in replicas]
    await asyncio.sleep(BASELINE_SECONDS)  # throughput under load, before
    baseline_end = time.monotonic()
    probes = Probes(load, number, names)
    await probes.before()
    freezing = FreezeProbes(cluster, old, load, number) if mode == "freeze" else None
    if freezing is not None:
        await freezing.open()

    kill_at, kill_wall = time.monotonic(), time.time()
    frozen: list[int] = []
    if freezing is None:
        cluster.kill(old)
    else:
        frozen = cluster.freeze(old)
    try:
        return await _failover_after(
            number, cluster, load, replicas, url, env, health, report,
            old, new, probes, freezing, frozen, kill_at, kill_wall, baseline_end,
        )  # fmt: skip
    finally:
        cluster.thaw(frozen)  # on any way out; a no-op once resumed


async def _failover_after(
    number: int,
    cluster: Cluster,
    load: Load,
    replicas: list[Replica],
    url: str,
    env: dict[str, str],
    health: list[tuple[float, str, int]],
    report: Report,
    old: Node,
    new: Node,
    probes: Probes,
    freezing: FreezeProbes | None,
    frozen: list[int],
    kill_at: float,
    kill_wall: float,
    baseline_end: float,
) -> Failover:
    names = [r.name for r in replicas]
    # Calls that started before the SIGKILLs landed may still have been acknowledged by the
    # old primary: the replicas are back only with a call started after them.
    load.mark()
    result = Failover(f"{old.name} -> {new.name}", kill_at, kill_wall, killed_at=load.since)
    # Before the probes' own calls.
    result.throughput_before = checks.throughput(
        load.record.outcomes, baseline_end - BASELINE_SECONDS, baseline_end
    )
    if freezing is None:
        report.say(
            f"killed {old.name} (pg_autoctl and PostgreSQL, SIGKILL) under "
            f"{result.throughput_before:.0f} acknowledged calls/s; the load goes on"
        )
        resume: asyncio.Task[None] | None = None
    else:
        report.say(
            f"froze {old.name} ({len(frozen)} processes: pg_autoctl, postmaster, backends; "
            f"SIGSTOP) under {result.throughput_before:.0f} acknowledged calls/s; the load "
            f"goes on; resumed after {FREEZE_SECONDS:.0f} s"
        )

        async def resume_later(probes: FreezeProbes = freezing) -> None:
            await asyncio.sleep(max(0.0, kill_at + FREEZE_SECONDS - time.monotonic()))
            cluster.thaw(frozen)
            report.say(f"{old.name} resumed (SIGCONT)")
            await probes.after_resume()

        resume = asyncio.create_task(resume_later())
    result.writable_at = await wait_writable(cluster, within=120)

    async def promoted() -> bool:
        return await cluster.primary() is new

    await cluster.wait_until(promoted, within=60, what=f"{new.name} primary")

    async def both_back() -> bool:
        return len(load.back) == len(replicas)

    await cluster.wait_until(both_back, within=60, what="both replicas acknowledging again")
    result.back = dict(load.back)
    result.unavailable_seconds = max(result.back.values()) - kill_at
    result.first_write_seconds = min(result.back.values()) - kill_at
    if freezing is not None:
        await freezing.create_fresh_accounts(names[0])
    report.say(
        f"{new.name} writable after {result.writable_at - kill_at:.1f} s; replicas acknowledging "
        "again after "
        + ", ".join(f"{name} {at - kill_at:.1f} s" for name, at in sorted(result.back.items()))
    )
    await asyncio.sleep(max(0.0, result.writable_at + OBSERVE_SECONDS - time.monotonic()))
    result.recovered_within, result.recovered_share = checks.recovery(
        load.record.outcomes,
        result.throughput_before,
        result.writable_at,
        RECOVERY_SHARE,
        OBSERVE_SECONDS,
    )
    writable = result.writable_at
    after = [o for o in load.record.outcomes if writable <= o.started < writable + OBSERVE_SECONDS]
    slowest = max(after, key=lambda o: o.ended - o.started, default=None)
    if slowest is not None:
        result.slowest_call = (
            f"{slowest.operation} {slowest.ended - slowest.started:.2f} s from "
            f"+{slowest.started - writable:.1f} s ({slowest.code.name})"
        )
    result.series = [
        round(checks.throughput(load.record.outcomes, writable + i, writable + i + 1))
        for i in range(-3, int(OBSERVE_SECONDS))
    ]
    for name in names:
        seen = [(t, s) for t, n, s in health if n == name and t >= kill_at]
        down = [t for t, s in seen if s != health_pb2.HealthCheckResponse.SERVING]
        up_again = bool(down) and any(
            t > down[-1] and s == health_pb2.HealthCheckResponse.SERVING for t, s in seen
        )
        result.health[name] = ((down[-1] - down[0]) if down else 0.0, up_again)
    events = await cluster.events(kill_wall - 1)
    for at, text in events:
        line = f"+{at - kill_wall:5.1f} s  {text}"
        wanted = "unhealthy" in text or "wait_primary" in text or "prepare_promotion" in text
        if wanted and line not in result.timeline:  # the monitor logs some events twice
            result.timeline.append(line)

    result.health_down_after, serving_while_failing = checks.health_while_failing(
        health, names, kill_at, result.writable_at
    )
    report.say(
        "health NOT_SERVING after "
        + ", ".join(f"{n} {s:.1f} s" for n, s in sorted(result.health_down_after.items()))
    )
    report.check(
        f"failover {number}: health NOT_SERVING within {HEALTH_NOT_SERVING_WITHIN_SECONDS} s "
        "of writes failing, and while they fail",
        [
            f"{name}: NOT_SERVING only after {seconds:.1f} s"
            for name, seconds in result.health_down_after.items()
            if seconds > HEALTH_NOT_SERVING_WITHIN_SECONDS
        ]
        + serving_while_failing,
    )
    refused = await probes.after()
    report.check(f"failover {number}: failure count, lockout and replays kept", probes.problems)
    report.say(f"{refused} codes accepted before the failover refused after it")
    problems, where = await checks.missing_acknowledged(cluster.node_url(new), load.record)
    report.check(
        f"failover {number}: every acknowledged change is on the new primary ({where})", problems
    )
    report.check(
        f"failover {number}: health NOT_SERVING during the failover, SERVING again",
        [
            f"{name}: NOT_SERVING never seen" if seconds == 0 else f"{name}: not SERVING again"
            for name, (seconds, again) in result.health.items()
            if seconds == 0 or not again
        ],
    )
    code, output = await twofactor(env, "verify-audit", within=180)
    report.check(
        f"failover {number}: twofactor verify-audit",
        [] if code == 0 else [f"exit {code}: {output.strip()}"],
    )
    if code == 0:
        report.say(output.strip().splitlines()[0])

    if resume is not None and freezing is not None:
        await resume
        report.say(
            f"after the resume: {len(freezing.sessions)} commits tried on {old.name}: "
            + ", ".join(f"{n} {why}" for why, n in freezing.refusals.items())
            + f"; {freezing.stale_reads} reads of {len(freezing.fresh)} accounts created during "
            "the freeze"
        )
        report.check(
            f"failover {number}: the resumed old primary acknowledged nothing",
            [f"commit {tag} acknowledged by {old.name}" for tag in freezing.acknowledged_by_old],
        )
        report.check(
            f"failover {number}: no answer contradicting an acknowledged change after the resume",
            freezing.stale_answers
            + ([] if len(freezing.fresh) == FRESH_ACCOUNTS else ["accounts not created"]),
        )

    result.rejoin_started = time.monotonic()
    cluster.start(old)  # a frozen node's keeper still runs and rejoins by itself
    result.rejoin_seconds = await cluster.wait_until(
        cluster.healthy, within=180, what=f"{old.name} back as standby"
    )
    report.say(f"{old.name} rejoined as synchronous standby in {result.rejoin_seconds:.1f} s")
    if freezing is not None:
        report.check(
            f"failover {number}: no row the old primary took after the resume is on the new one",
            [f"{tag} on {new.name}" for tag in await freezing.rows_on(cluster.node_url(new))],
        )
    return result


def figures(result: Failover) -> str:
    share = result.recovered_share or 0.0
    within = (
        f"{result.recovered_within:.1f} s"
        if result.recovered_within is not None
        else f"more than {OBSERVE_SECONDS:.0f} s (best {share:.0%})"
    )
    return (
        f"failover: first write acknowledged after {result.first_write_seconds:.1f} s, "
        f"unavailable for {result.unavailable_seconds:.1f} s, throughput back to "
        f"{share:.0%} of before within {within}"
    )


async def run(base: Path, report: Report, mode: str) -> None:
    keys = new_key_line("ha1")
    async with running_cluster(base, report.say) as cluster:
        url = cluster.database_url
        report.say(f"cluster ready; service URL {url}; mode {mode}")
        conn = await asyncpg.connect(url, timeout=10)
        try:  # what the freeze mode's sessions on a resumed old primary try to write
            await conn.execute("CREATE TABLE ha_fence (tag text PRIMARY KEY)")
        finally:
            await conn.close()
        env = service_env(url, keys, log_level="WARNING")
        settings = {
            "log_level": "WARNING",
            # The web console is not under test here (and two replicas cannot share its port).
            "console_address": "",
            # Longer than the whole test: a lockout made before a failover is still in force.
            "lockout_first_delay_seconds": "900",
            "lockout_max_delay_seconds": "900",
        }
        replicas = [
            start_replica(name, base / "logs", url, keys, **settings) for name in ("a", "b")
        ]
        health: list[tuple[float, str, int]] = []
        stop_health = asyncio.Event()
        health_task: asyncio.Task[None] | None = None
        load: Load | None = None
        setup: Setup | None = None
        try:
            await asyncio.gather(*(wait_serving(r) for r in replicas))
            report.say("replicas " + ", ".join(f"{r.name} on {r.address}" for r in replicas))
            setup = await bootstrap(env, url, keys, replicas, report)
            code_accounts = [
                CodeAccount(f"ha-user-{i:05d}", secret_of(f"ha-user-{i:05d}"))
                for i in range(SEEDED_ACCOUNTS)
            ]
            load = Load(
                setup.stubs,
                setup.verifier_token,
                setup.admin_token,
                code_accounts,
                setup.cycle_accounts,
                rate=LOAD_RATE or None,
            )
            health_task = asyncio.create_task(watch_health(replicas, health, stop_health))
            load.start()
            report.say(f"load running on both replicas, {LOAD_RATE:.0f} operations/s offered")
            results = []
            for number in range(FAILOVERS):
                result = await failover(
                    number, cluster, load, replicas, url, env, health, report, mode
                )
                results.append(result)
                print(f"{figures(result)}  ({result.label})", flush=True)
                print(
                    "           acknowledged calls/s, second by second from 3 s before the new "
                    f"primary took writes: {' '.join(map(str, result.series))} (before the "
                    f"kill: {result.throughput_before:.0f}); slowest call in the first "
                    f"{OBSERVE_SECONDS:.0f} s: {result.slowest_call}",
                    flush=True,
                )
                for line in result.timeline:
                    print(f"           monitor {line}", flush=True)
            await asyncio.sleep(2.0)  # a little load on the healthy cluster after the last one
            await load.stop()
            record = load.record
            calls = len(record.outcomes)
            acknowledged = sum(1 for o in record.outcomes if o.acknowledged)
            report.say(
                f"load stopped: {calls} calls, {acknowledged} acknowledged; workers found no "
                f"unused time step {load.starved} times"
            )
            by_operation = collections.Counter(
                o.operation for o in record.outcomes if o.acknowledged
            )
            report.say(
                "acknowledged: " + ", ".join(f"{n} {op}" for op, n in by_operation.most_common())
            )
            report.check(
                "no answer other than OK and UNAVAILABLE; every answer as expected",
                record.violations,
            )
            report.check("no time step accepted twice", checks.steps_accepted_twice(record))
            report.check("no DEADLINE_EXCEEDED", checks.deadlines_exceeded(record.outcomes))
            report.check(
                "UNAVAILABLE only during a failover, with DATABASE_UNAVAILABLE and RetryInfo",
                checks.unavailable_outside_failovers(record.outcomes, results),
            )
            problems, where = await checks.missing_acknowledged(url, record)
            problems += await checks.cycle_states_differ(url, load.cycle_accounts)
            report.check(f"every acknowledged change is stored, at the end ({where})", problems)
            across = sum(
                1 for accepted, replayed in record.replays
                if any(accepted < r.kill_at < replayed for r in results)
            )  # fmt: skip
            report.say(
                f"{len(record.replays)} replayed codes refused, {across} of them accepted before "
                "a failover and replayed after it"
            )
            for number, result in enumerate(results):
                report.check(
                    f"failover {number}: first acknowledged write at most {MAX_GAP_SECONDS:.0f} s "
                    f"after the {mode}, both replicas within {MAX_UNAVAILABLE_SECONDS:.0f} s, and "
                    f"{RECOVERY_SHARE:.0%} throughput within {RECOVERY_WITHIN_SECONDS:.0f} s",
                    _targets(result),
                )
            for result in results:
                print(f"{figures(result)}  ({result.label})", flush=True)
        finally:
            if load is not None and not load.stopping.is_set():
                await load.stop()
            stop_health.set()
            if health_task is not None:
                await health_task
            if setup is not None:
                for channel in setup.channels:
                    await channel.close()
            for replica in replicas:
                await asyncio.to_thread(stop_replica, replica)


def _targets(result: Failover) -> list[str]:
    problems = []
    if result.first_write_seconds is None or result.first_write_seconds > MAX_GAP_SECONDS:
        problems.append(f"first acknowledged write after {result.first_write_seconds} s")
    if result.unavailable_seconds is None or result.unavailable_seconds > MAX_UNAVAILABLE_SECONDS:
        problems.append(f"unavailable for {result.unavailable_seconds} s")
    if result.recovered_within is None or result.recovered_within > RECOVERY_WITHIN_SECONDS:
        problems.append(
            f"throughput {result.recovered_share or 0:.0%} of before, within "
            f"{result.recovered_within} s"
        )
    return problems


def main() -> int:
    install_thaw_guards()
    wanted = os.environ.get("HA_MODE", "both")
    modes = MODES if wanted == "both" else (wanted,)
    if any(m not in MODES for m in modes):
        print(f"HA_MODE must be kill, freeze or both, not {wanted!r}", file=sys.stderr)
        return 2
    report = Report()
    keep = os.environ.get("HA_KEEP") == "1"
    bases = []
    for mode in modes:
        base = Path(tempfile.mkdtemp(prefix=f"twofactor-ha-{mode}-"))
        bases.append(base)
        report.say(f"=== mode {mode}: the primary is {'killed' if mode == 'kill' else 'frozen'}")
        failed_before = len(report.failed)
        try:
            asyncio.run(asyncio.wait_for(run(base, report, mode), WITHIN_SECONDS))
        except Exception as exc:  # noqa: BLE001 - any failure fails the run, said as such
            report.failed.append(f"{mode}: {type(exc).__name__}")
            if not isinstance(exc, ClusterError | TimeoutError):
                traceback.print_exc()
            report.say(f"FAIL {type(exc).__name__}: {exc}")
        if len(report.failed) > failed_before:
            keep = True
            print(f"logs kept in {base}/logs", flush=True)
    total = time.monotonic() - report.started
    if report.failed:
        report.say(f"make test-ha FAILED ({len(report.failed)} checks) in {total:.0f} s")
    else:
        report.say(f"make test-ha passed ({', '.join(modes)}) in {total:.0f} s")
    if keep:
        for base in bases:
            print(f"logs kept in {base}/logs", flush=True)
    else:
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
