"""A tamper-evident audit log: the events are linked into a SHA-256 hash chain, and
`twofactor verify-audit` reports the first event altered or deleted after it was linked.

Every VerifyCode writes an event on the hot path, so inserting stays exactly as it was: no
lock, no read of the previous event. The chain is built afterwards by a sealer that every
server runs about once a second (and verify-audit runs first):

- It takes a PostgreSQL advisory lock, so one replica seals at a time; the others skip a turn.
- It links events in (txid, sequence) order and only those whose writing transaction, and
  every older one, has ended (below `pg_snapshot_xmin(pg_current_snapshot())`). Sequence
  numbers are drawn before commit, so a lower one can commit after a higher one; in this order
  no event can ever turn up before one already linked (the same rule as store.audit.after).
- Each event's link is `SHA-256(previous link || canonical encoding of its fields)`, numbered
  by its position in the chain, and the head row records the last position and link, so an
  altered event, a deleted one (a gap in the positions), the newest ones cut off, and one
  slipped in among the sealed ones are all told apart.

What it does not catch, and the anchors that close the gap: docs/security.md
("Tamper-evident audit log", "Known limits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from twofactor_service.store import audit_chain
from twofactor_service.store.audit_chain import ChainHead, ChainRow

log = logging.getLogger(__name__)

GENESIS = bytes(32)
# Versioned domain separation: a change of encoding starts a new label, never a silent change.
_LABEL = b"twofactor.v1/audit-chain/v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SEAL_INTERVAL_SECONDS = 1.0
SEAL_BATCH = 1000
VERIFY_BATCH = 5000
# A log rewritten wholesale would otherwise print a line per event.
MAX_REPORTED_PROBLEMS = 100
# Beyond cli.py's exit codes (0-5): the audit log was tampered with.
EXIT_TAMPERED = 6


def canonical_encoding(row: ChainRow, position: int) -> bytes:
    """The bytes an event's link covers: its chain position, every stored field in a fixed
    order, integers as 8 big-endian bytes, text as a 4-byte length and UTF-8 (no two different
    events encode alike)."""
    micros = (row.occurred_at - _EPOCH) // timedelta(microseconds=1)
    parts = [_LABEL, struct.pack(">qQqq", position, row.txid, row.sequence, micros)]
    for text in (
        row.actor,
        row.target,
        row.operation,
        row.outcome,
        row.reason,
        row.request_id,
        row.peer,
    ):
        data = text.encode("utf-8")
        parts.append(struct.pack(">I", len(data)))
        parts.append(data)
    return b"".join(parts)


def link(previous: bytes, row: ChainRow, position: int) -> bytes:
    return hashlib.sha256(previous + canonical_encoding(row, position)).digest()


class SealingRefused(Exception):
    """The chain's own bookkeeping was tampered with, so sealing more would only hide it."""


class ChainHeadMissing(SealingRefused):
    """The audit_chain_head row is gone: nothing can be sealed or verified against it."""


class HeadMovedBack(SealingRefused):
    """Events past the chain head are sealed already: the head was set back, maybe to have
    the sealer re-link the log around a deleted event."""


async def seal(pool: asyncpg.Pool, *, wait: bool, batch: int = SEAL_BATCH) -> int:
    """Links every sealable event into the chain; returns how many. Without `wait`, returns 0
    at once when another replica is sealing."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            if not await audit_chain.lock_sealer(conn, wait=wait):
                return total
            head = await audit_chain.head(conn)
            if head is None:
                raise ChainHeadMissing("the audit chain head is missing")
            rows = await audit_chain.sealable(conn, head.last, batch)
            if not rows:
                return total
            if any(row.chain_hash is not None for row in rows):
                raise HeadMovedBack(
                    f"audit events after event {head.last[1]} are sealed already, but the chain "
                    "head says they are not: it was moved back. Sealing stopped; run "
                    "`twofactor verify-audit`"
                )
            previous, position = head.chain_hash, head.position
            links = []
            for row in rows:
                position += 1
                previous = link(previous, row, position)
                links.append((row.sequence, position, previous))
            await audit_chain.seal(conn, links, ChainHead(rows[-1].cursor, position, previous))
        total += len(rows)
        if len(rows) < batch:
            return total


async def seal_periodically(
    pool: asyncpg.Pool, interval_seconds: float = SEAL_INTERVAL_SECONDS
) -> None:
    """The server's background sealer, until cancelled. A database outage is logged once and
    sealing resumes by itself; nothing is lost, the events just wait."""
    failing = False
    while True:
        try:
            await seal(pool, wait=False)
        except asyncio.CancelledError:
            raise
        except SealingRefused as exc:
            if not failing:
                log.error("audit log tampered with; not sealing", extra={"detail": str(exc)})
            failing = True
        except Exception as exc:  # noqa: BLE001 - keep sealing whatever went wrong this turn
            if not failing:
                log.warning("cannot seal the audit log", extra={"error": type(exc).__name__})
            failing = True
        else:
            if failing:
                log.info("sealing the audit log again")
            failing = False
        await asyncio.sleep(interval_seconds)


@dataclass(frozen=True)
class ChainProblem:
    # ALTERED, DELETED, INSERTED, TRUNCATED, HEAD_ALTERED, HEAD_MISSING, HEAD_MOVED_BACK or
    # ANCHOR_MISMATCH.
    kind: str
    # The event it concerns: the altered or inserted one, the one after a deletion.
    sequence: int | None
    message: str


@dataclass
class ChainReport:
    checked: int = 0
    head: ChainHead | None = None
    # Events newer than the sealed part (their transactions are still open).
    unsealed: int = 0
    # The first MAX_REPORTED_PROBLEMS problems, in chain order, and how many there were.
    problems: list[ChainProblem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def intact(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: ChainProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)


# A link recorded outside the database earlier (position, link): the chain must still hold it.
Anchor = tuple[int, bytes]


async def verify(
    pool: asyncpg.Pool, *, anchors: Sequence[Anchor] = (), batch: int = VERIFY_BATCH
) -> ChainReport:
    """Seals what can be sealed, then recomputes the whole chain from the genesis, and checks
    it still holds the `anchors` (links recorded elsewhere by earlier checks)."""
    report = ChainReport()
    with contextlib.suppress(SealingRefused):  # reported below
        await seal(pool, wait=True)
    wanted = dict(anchors)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await audit_chain.head(conn)
        if head is None:
            report.add(ChainProblem("HEAD_MISSING", None, "the audit chain head row was deleted"))
            return report
        report.head = head
        previous, expected = GENESIS, 1
        last: ChainRow | None = None
        cursor = (0, 0)
        while True:
            rows = await audit_chain.chain_rows(conn, cursor, head.last, batch)
            for row in rows:
                report.checked += 1
                problem = _check(row, previous, expected, last)
                if problem is not None:
                    report.add(problem)
                if row.chain_hash is not None and row.chain_position is not None:
                    anchored = wanted.pop(row.chain_position, None)
                    if anchored is not None and anchored != row.chain_hash:
                        report.add(_anchor_mismatch(row.chain_position, row.sequence))
                    # Carry on from what is stored, so one change is reported once.
                    previous, expected = row.chain_hash, row.chain_position + 1
                last = row
            if len(rows) < batch:
                break
            cursor = rows[-1].cursor
        report.unsealed = await audit_chain.count_after(conn, head.last)
        resealable = await audit_chain.first_sealed_after(conn, head.last)
    sealed_until = last.sequence if last else 0
    if expected - 1 < head.position:
        missing = head.position - (expected - 1)
        report.add(
            ChainProblem(
                "TRUNCATED",
                head.last[1],
                f"{missing} audit event(s) after event {sealed_until} were deleted: the chain "
                f"head records {head.position} events, up to event {head.last[1]}",
            )
        )
    elif previous != head.chain_hash and expected - 1 == head.position:
        report.add(
            ChainProblem(
                "HEAD_ALTERED",
                None,
                "the audit chain head does not match the last sealed event "
                f"{sealed_until}: the head or that event's link was changed",
            )
        )
    if resealable is not None:
        report.add(
            ChainProblem(
                "HEAD_MOVED_BACK",
                resealable,
                f"audit event {resealable}, past the chain head (event "
                f"{head.last[1]}), is sealed already: the head was moved back, which would have "
                "the sealer link the log anew around deleted or changed events",
            )
        )
    for position in sorted(wanted):
        report.add(_anchor_mismatch(position, None))
    return report


def _anchor_mismatch(position: int, sequence: int | None) -> ChainProblem:
    where = f"(event {sequence})" if sequence is not None else "(the chain is shorter now)"
    return ChainProblem(
        "ANCHOR_MISMATCH",
        sequence,
        f"the chain no longer holds the link recorded for position {position} {where}: the log "
        "up to there was rewritten since that link was recorded",
    )


def anchor_argument(raw: str) -> Anchor:
    """argparse type of `verify-audit --anchor POSITION:LINK` (as printed by an earlier check)."""
    position, _, link_hex = raw.partition(":")
    try:
        value = bytes.fromhex(link_hex)
    except ValueError:
        value = b""
    if not position.isdigit() or int(position) < 1 or len(value) != 32:
        raise argparse.ArgumentTypeError("must be POSITION:LINK, as printed by verify-audit")
    return int(position), value


def _check(
    row: ChainRow, previous: bytes, expected: int, last: ChainRow | None
) -> ChainProblem | None:
    before = f"event {last.sequence}" if last else "the start of the log"
    if row.chain_hash is None or row.chain_position is None:
        return ChainProblem(
            "INSERTED",
            row.sequence,
            f"audit event {row.sequence} is not in the chain: it was inserted among the "
            "sealed events after they were sealed",
        )
    if row.chain_position > expected:
        missing = row.chain_position - expected
        return ChainProblem(
            "DELETED",
            row.sequence,
            f"{missing} audit event(s) between {before} and event {row.sequence} were deleted",
        )
    if row.chain_position < expected or link(previous, row, row.chain_position) != row.chain_hash:
        return ChainProblem(
            "ALTERED",
            row.sequence,
            f"audit event {row.sequence} was altered after it was sealed: its contents no "
            "longer match its link in the chain",
        )
    return None


async def verify_command(pool: asyncpg.Pool, anchors: Sequence[Anchor] = ()) -> int:
    """`twofactor verify-audit`: 0 when intact, EXIT_TAMPERED with every problem, the first
    first."""
    report = await verify(pool, anchors=anchors)
    if not report.intact:
        for problem in report.problems:
            print(f"TAMPERED: {problem.message}")
        print(
            f"audit log NOT intact: {report.problem_count} problem(s) in {report.checked} "
            f"sealed events; the first {len(report.problems)} are listed, in chain order."
        )
        return EXIT_TAMPERED
    assert report.head is not None
    print(
        f"audit log intact: {report.checked} events sealed and verified, up to event "
        f"{report.head.last[1]}; {report.unsealed} newer events wait for open transactions to "
        "end.\n"
        f"chain head: {report.head.position}:{report.head.chain_hash.hex()} (keep it outside "
        "the database and pass it to later checks as --anchor, so a rewritten log is caught)"
    )
    return 0
