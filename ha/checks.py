"""What `make test-ha` asserts, from the load's record and from SQL on the new primary.

Each check returns the problems it found (empty: it holds), worded for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import grpc
from grpc_health.v1 import health_pb2

from ha.load import AUDITED, STATE, CycleAccount, Outcome, Record
from twofactor_service.store.sessions import token_hash


@dataclass
class Failover:
    """One failover as the test saw it (times: time.monotonic(), except `kill_wall`)."""

    label: str
    # When the kill began, and when every SIGKILL had been sent.
    kill_at: float
    kill_wall: float
    killed_at: float
    # When a writable primary was reachable through the service's URL again.
    writable_at: float | None = None
    # Replica -> start of its first call acknowledged after the kill.
    back: dict[str, float] = field(default_factory=dict)
    # Replica -> (seconds NOT_SERVING seen by the health poll, SERVING again).
    health: dict[str, tuple[float, bool]] = field(default_factory=dict)
    unavailable_seconds: float | None = None
    # From the kill (or freeze) to the start of the first call acknowledged again.
    first_write_seconds: float | None = None
    # Replica -> seconds from the kill (or freeze) to its first health answer not SERVING.
    health_down_after: dict[str, float] = field(default_factory=dict)
    throughput_before: float = 0.0
    recovered_share: float | None = None
    recovered_within: float | None = None
    # Acknowledged calls per second, from 3 s before `writable_at`, and the slowest call
    # started in the OBSERVE_SECONDS after it.
    series: list[int] = field(default_factory=list)
    slowest_call: str = ""
    timeline: list[str] = field(default_factory=list)
    rejoin_started: float | None = None
    rejoin_seconds: float | None = None


# --- from SQL


async def missing_acknowledged(url: str, record: Record) -> tuple[list[str], str]:
    """Every acknowledged change of the record is on the primary: the audit event of each
    acknowledged call, each seeded account's newest acknowledged time step as used, each
    acknowledged session. Returns the problems and the address that answered."""
    outcomes = list(record.outcomes)
    newest = dict(record.newest_step)
    sessions = list(record.sessions)
    audited = [o.request_id for o in outcomes if o.acknowledged and o.operation in AUDITED]
    problems: list[str] = []
    conn = await asyncpg.connect(url, timeout=10)
    try:
        where = f"127.0.0.1:{await conn.fetchval('SELECT inet_server_port()')}"
        found = {
            r["request_id"]
            for r in await conn.fetch(
                "SELECT request_id FROM audit_events WHERE request_id = ANY($1::text[])", audited
            )
        }
        lost = [rid for rid in audited if rid not in found]
        if lost:
            problems.append(
                f"{len(lost)} of {len(audited)} acknowledged calls have no audit event on the "
                f"primary, e.g. request {lost[0]}"
            )
        rows = await conn.fetch(
            "SELECT a.username, k.last_used_step FROM secret_keys k JOIN accounts a"
            " ON a.id = k.account_id WHERE k.state = 'ACTIVE' AND a.username = ANY($1::text[])",
            list(newest),
        )
        stored = {r["username"]: r["last_used_step"] for r in rows}
        behind = [name for name, step in newest.items() if stored.get(name, -1) < step]
        if behind:
            name = behind[0]
            problems.append(
                f"{len(behind)} accounts lost an acknowledged time step (a code accepted before "
                f"could be accepted again), e.g. {name}: step {newest[name]} acknowledged, "
                f"{stored.get(name)} stored"
            )
        hashes = [token_hash(token) for _, token, _ in sessions]
        present = await conn.fetchval(
            "SELECT count(*) FROM sessions WHERE token_hash = ANY($1::bytea[])", hashes
        )
        if present != len(hashes):
            problems.append(f"{len(hashes) - present} of {len(hashes)} acknowledged sessions lost")
    finally:
        await conn.close()
    return problems, where


async def cycle_states_differ(url: str, accounts: list[CycleAccount]) -> list[str]:
    """Each administrator-cycled account is stored in the state last acknowledged to the
    client (those whose last change went unacknowledged are skipped)."""
    known = {a.username: a.state for a in accounts if not a.uncertain}
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT a.username, a.allowlisted, EXISTS (SELECT 1 FROM secret_keys k"
            " WHERE k.account_id = a.id AND k.state = 'ACTIVE') AS enrolled"
            " FROM accounts a WHERE a.username = ANY($1::text[])",
            list(known),
        )
    finally:
        await conn.close()
    problems = []
    for row in rows:
        if row["enrolled"]:
            stored = STATE.TWO_FACTOR_STATE_ENROLLED
        elif row["allowlisted"]:
            stored = STATE.TWO_FACTOR_STATE_ALLOWLISTED
        else:
            stored = STATE.TWO_FACTOR_STATE_BLOCKED
        if stored != known[row["username"]]:
            problems.append(
                f"{row['username']} is {STATE.Name(stored)} in SQL, but "
                f"{STATE.Name(known[row['username']])} was acknowledged"
            )
    if len(rows) != len(known):
        problems.append(f"{len(known) - len(rows)} cycled accounts are missing")
    return problems


# --- from the record


# A replica may report SERVING a little before the test's own poll finds the new primary
# writable (both poll; the test every 0.1 s plus a connection): not counted as a contradiction.
WRITABLE_SLACK_SECONDS = 1.0


def health_while_failing(
    samples: list[tuple[float, str, int]],
    replicas: list[str],
    kill_at: float,
    writable_at: float | None,
) -> tuple[dict[str, float], list[str]]:
    """How soon after the kill each replica's health stopped saying SERVING, and the problems:
    SERVING again before a writable primary was back (writes still failing)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    down_after: dict[str, float] = {}
    problems: list[str] = []
    end = (writable_at or kill_at) - WRITABLE_SLACK_SECONDS
    for name in replicas:
        seen = [(t, s) for t, n, s in samples if n == name and t >= kill_at]
        down = next((t for t, s in seen if s != serving), None)
        if down is None:
            down_after[name] = float("inf")
            continue
        down_after[name] = down - kill_at
        early = [t for t, s in seen if down < t < end and s == serving]
        if early:
            problems.append(
                f"{name}: SERVING at +{early[0] - kill_at:.1f} s while no primary took writes "
                f"(until +{end + WRITABLE_SLACK_SECONDS - kill_at:.1f} s)"
            )
    return down_after, problems


def deadlines_exceeded(outcomes: list[Outcome]) -> list[str]:
    """No call may end DEADLINE_EXCEEDED: the service answers UNAVAILABLE in time instead."""
    return [
        f"{o.operation} on {o.replica} ended DEADLINE_EXCEEDED after {o.ended - o.started:.1f} s"
        f" (request {o.request_id})"
        for o in outcomes
        if o.code == grpc.StatusCode.DEADLINE_EXCEEDED
    ]


def steps_accepted_twice(record: Record) -> list[str]:
    return [
        f"{a[0].account}: step {a[0].step} accepted {len(a)} times"
        f" (requests {', '.join(x.outcome.request_id for x in a)})"
        for a in record.acceptances.values()
        if len(a) > 1
    ]


def unavailable_outside_failovers(outcomes: list[Outcome], failovers: list[Failover]) -> list[str]:
    """UNAVAILABLE only for calls caught by a failover: ended after a kill and started before
    their replica served again; and always with DATABASE_UNAVAILABLE and a retry delay."""
    problems = []
    for outcome in outcomes:
        if outcome.code != grpc.StatusCode.UNAVAILABLE:
            continue
        if outcome.reason != "DATABASE_UNAVAILABLE" or (outcome.retry_delay or 0) < 1:
            problems.append(
                f"UNAVAILABLE without DATABASE_UNAVAILABLE and RetryInfo: {outcome.operation}"
                f" request {outcome.request_id} (reason {outcome.reason!r})"
            )
        caught = any(
            outcome.ended >= f.kill_at and outcome.started < f.back.get(outcome.replica, 1e18)
            for f in failovers
        )
        if not caught:
            problems.append(
                f"UNAVAILABLE outside a failover: {outcome.operation} on {outcome.replica},"
                f" request {outcome.request_id}, {_when(outcome, failovers)}"
            )
    return problems


def _when(outcome: Outcome, failovers: list[Failover]) -> str:
    """The call's times relative to the last kill before it (and that failover's milestones)."""
    before = [f for f in failovers if f.kill_at <= outcome.ended]
    if not before:
        return f"ended {failovers[0].kill_at - outcome.ended:.1f} s before the first kill"
    f = before[-1]
    back = f.back.get(outcome.replica)
    parts = [
        f"started +{outcome.started - f.kill_at:.2f} s and ended +{outcome.ended - f.kill_at:.2f} s"
        f" after the kill of failover {f.label}",
        f"replica back at +{back - f.kill_at:.2f} s" if back else "replica never back",
    ]
    if f.rejoin_started is not None:
        parts.append(f"rejoin started at +{f.rejoin_started - f.kill_at:.2f} s")
    if f.rejoin_seconds is not None and f.rejoin_started is not None:
        parts.append(f"done at +{f.rejoin_started + f.rejoin_seconds - f.kill_at:.2f} s")
    return "; ".join(parts)


# The shortest time over which the throughput after a failover is averaged: a second of
# this shared 2-core machine swings by half either way (the per-second rates are printed).
MIN_RECOVERY_SECONDS = 1.0


def throughput(outcomes: list[Outcome], start: float, end: float) -> float:
    """Acknowledged calls per second that ended in [start, end)."""
    done = sum(1 for o in outcomes if o.acknowledged and start <= o.ended < end)
    return done / (end - start)


def recovery(
    outcomes: list[Outcome], baseline: float, since: float, share: float, horizon: float
) -> tuple[float | None, float]:
    """How soon the calls acknowledged since `since` (the new primary taking writes) average
    `share` of `baseline` (calls/s before the kill): (that many seconds, checked every 0.1 s
    from MIN_RECOVERY_SECONDS on, and the share then). None and the best share seen when not
    within `horizon` seconds."""
    best = 0.0
    elapsed = MIN_RECOVERY_SECONDS
    while elapsed <= horizon + 1e-9:
        rate = throughput(outcomes, since, since + elapsed) / baseline if baseline else 0.0
        best = max(best, rate)
        if rate >= share:
            return elapsed, rate
        elapsed += 0.1
    return None, best
