"""The tamper-evident audit log: the events are sealed into a SHA-256 hash chain, and
`twofactor verify-audit` reports the first event altered or deleted afterwards.

These tests tamper with the log, so each runs on a database and a server of its own.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.support import (
    TEST_ENCRYPTION_KEYS,
    Actors,
    LocalService,
    Person,
    TestClock,
    audit_rows_containing,
    local_service,
    make_runtime,
    scratch_database,
    wait_until,
)
from twofactor_service import audit_chain
from twofactor_service.store import audit
from twofactor_service.store import audit_chain as chain_store
from twofactor_service.store.audit_chain import ChainRow, lock_sealer
from twofactor_service.store.database import Connection

TWOFACTOR = Path(sys.executable).with_name("twofactor")
SEALED_WITHIN_SECONDS = 15.0


@dataclass
class Scene:
    service: LocalService
    url: str
    admin: Person
    user: Person
    verifier: Person
    # Everything secret the scenario handled: none of it may reach the log.
    secrets: list[str]


@pytest.fixture
async def scene(database_url: str) -> AsyncIterator[Scene]:
    """A server on a database of its own, after a short scenario: enrollments, sign-ins, a
    verified and a wrong code, a reset of a key."""
    clock = TestClock()
    async with scratch_database(database_url) as url, local_service(url, clock) as service:
        actors = Actors(service.stub, service.runtime, clock, prefix=uuid.uuid4().hex[:8])
        admin = await actors.admin()
        user = await actors.user()
        verifier = await actors.service()
        secrets = [admin.password, user.password, str(admin.token), str(user.token)]
        secrets += [str(admin.secret), str(user.secret), str(verifier.token)]
        good = user.next_code()
        await service.stub.VerifyCode(
            pb.VerifyCodeRequest(username=user.username, code=good), metadata=verifier.metadata()
        )
        wrong = "000000" if good != "000000" else "111111"
        await service.stub.VerifyCode(
            pb.VerifyCodeRequest(username=user.username, code=wrong), metadata=verifier.metadata()
        )
        await service.stub.ResetSecret(
            pb.ResetSecretRequest(username=user.username), metadata=admin.metadata()
        )
        secrets += [good]
        yield Scene(service, url, admin, user, verifier, secrets)


async def _rows(scene: Scene) -> list[tuple[int, bytes | None]]:
    """(sequence, chain_hash) of every event, in chain order."""
    async with scene.service.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT sequence, chain_hash FROM audit_events ORDER BY txid, sequence"
        )
    return [(r["sequence"], r["chain_hash"]) for r in rows]


async def _verify_audit_command(scene: Scene, *args: str) -> tuple[int, str]:
    """`.venv/bin/twofactor verify-audit ARGS` against the scene's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {"TWOFACTOR_DATABASE_URL": scene.url, "TWOFACTOR_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS}
    process = await asyncio.create_subprocess_exec(
        str(TWOFACTOR),
        "verify-audit",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_log_of_a_scenario_verifies(scene: Scene) -> None:
    report = await audit_chain.verify(scene.service.runtime.pool)

    assert report.intact, report.problems
    rows = await _rows(scene)
    assert report.checked == len(rows) > 0
    assert all(chain_hash is not None for _, chain_hash in rows)
    assert report.unsealed == 0
    async with scene.service.runtime.pool.acquire() as conn:
        assert await audit_rows_containing(conn, scene.secrets) == []

    code, output = await _verify_audit_command(scene)

    assert code == 0, output
    assert f"audit log intact: {len(rows)} events sealed and verified" in output
    assert report.head is not None
    assert f"chain head: {report.head.position}:{report.head.chain_hash.hex()}" in output


async def test_the_server_seals_new_events_by_itself(scene: Scene) -> None:
    async def all_sealed() -> bool:
        return all(chain_hash is not None for _, chain_hash in await _rows(scene))

    await wait_until(all_sealed, within=SEALED_WITHIN_SECONDS, what="every event sealed")

    assert (await audit_chain.verify(scene.service.runtime.pool)).intact


async def test_an_altered_event_is_reported_with_its_sequence(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact
    rows = await _rows(scene)
    altered = rows[len(rows) // 2][0]

    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE audit_events SET reason = 'nothing happened' WHERE sequence = $1", altered
        )
    report = await audit_chain.verify(pool)

    assert not report.intact
    assert [(p.kind, p.sequence) for p in report.problems] == [("ALTERED", altered)]
    code, output = await _verify_audit_command(scene)
    assert code == audit_chain.EXIT_TAMPERED
    assert f"TAMPERED: audit event {altered} was altered" in output


async def test_an_event_whose_link_was_recomputed_alone_is_reported(scene: Scene) -> None:
    """Rewriting an event and its own hash breaks the link of the event after it."""
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact
    rows = await _rows(scene)
    index = len(rows) // 2
    sequence = rows[index][0]
    async with pool.acquire() as conn:
        previous = rows[index - 1][1]
        head = await chain_store.head(conn)
        assert head is not None
        [original] = [
            row
            for row in await chain_store.chain_rows(conn, (0, 0), head.last, 10_000)
            if row.sequence == sequence
        ]
        forged = replace(original, reason="nothing happened")
        assert previous is not None
        assert forged.chain_position is not None
        await conn.execute(
            "UPDATE audit_events SET reason = $2, chain_hash = $3 WHERE sequence = $1",
            sequence,
            forged.reason,
            audit_chain.link(previous, forged, forged.chain_position),
        )

    report = await audit_chain.verify(pool)

    assert [(p.kind, p.sequence) for p in report.problems] == [("ALTERED", rows[index + 1][0])]


async def test_a_deleted_event_is_reported(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact
    rows = await _rows(scene)
    index = len(rows) // 2
    before, deleted, after = rows[index - 1][0], rows[index][0], rows[index + 1][0]

    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM audit_events WHERE sequence = $1", deleted)
    report = await audit_chain.verify(pool)

    assert [(p.kind, p.sequence) for p in report.problems] == [("DELETED", after)]
    assert f"1 audit event(s) between event {before} and event {after} were deleted" in (
        report.problems[0].message
    )
    code, output = await _verify_audit_command(scene)
    assert code == audit_chain.EXIT_TAMPERED
    assert "were deleted" in output


async def test_deleting_the_newest_events_is_reported(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact
    rows = await _rows(scene)

    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM audit_events WHERE sequence = ANY($1::bigint[])", [s for s, _ in rows[-2:]]
        )
    report = await audit_chain.verify(pool)

    assert [p.kind for p in report.problems] == ["TRUNCATED"]
    assert f"2 audit event(s) after event {rows[-3][0]} were deleted" in report.problems[0].message


async def test_an_event_slipped_in_among_the_sealed_ones_is_reported(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact

    async with pool.acquire() as conn:
        # Backdated into the sealed part: an old transaction id.
        sequence = await conn.fetchval(
            "INSERT INTO audit_events (actor, target, operation, outcome, reason, request_id,"
            " peer, txid) VALUES ('admin', 'alice', 'ResetSecret', 'SUCCESS', '', 'x', 'y', '3')"
            " RETURNING sequence"
        )
    report = await audit_chain.verify(pool)

    assert [(p.kind, p.sequence) for p in report.problems] == [("INSERTED", sequence)]


async def _move_head_back_to(conn: Connection, sequence: int) -> None:
    """What an attacker does to have the sealer link the log anew from `sequence` on."""
    await conn.execute(
        "UPDATE audit_chain_head h SET last_txid = e.txid, last_sequence = e.sequence,"
        " chain_position = e.chain_position, chain_hash = e.chain_hash"
        " FROM audit_events e WHERE e.sequence = $1",
        sequence,
    )


async def test_a_chain_head_moved_back_is_reported_and_not_sealed_over(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    assert (await audit_chain.verify(pool)).intact
    rows = await _rows(scene)
    index = len(rows) // 2
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM audit_events WHERE sequence = $1", rows[index][0])
        await _move_head_back_to(conn, rows[index - 1][0])

    with pytest.raises(audit_chain.HeadMovedBack):
        await audit_chain.seal(pool, wait=True)
    report = await audit_chain.verify(pool)

    assert [(p.kind, p.sequence) for p in report.problems] == [
        ("HEAD_MOVED_BACK", min(s for s, _ in rows[index + 1 :]))
    ]


async def test_an_anchor_kept_outside_catches_a_rewritten_log(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    first = await audit_chain.verify(pool)
    assert first.intact
    assert first.head is not None
    recorded = (first.head.position, first.head.chain_hash)
    rows = await _rows(scene)
    index = len(rows) // 2

    # The log grows as usual: the anchor still holds.
    await scene.service.stub.VerifyCode(
        pb.VerifyCodeRequest(username=scene.admin.username, code="000000"),
        metadata=scene.verifier.metadata(),
    )
    assert (await audit_chain.verify(pool, anchors=[recorded])).intact

    # Someone with write access deletes an event, unlinks everything after it and sets the head
    # back: the sealer links the rest anew, and the chain alone looks whole.
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM audit_events WHERE sequence = $1", rows[index][0])
        await conn.execute(
            "UPDATE audit_events SET chain_hash = NULL, chain_position = NULL"
            " WHERE chain_position >= $1",
            index + 1,
        )
        await _move_head_back_to(conn, rows[index - 1][0])
    assert (await audit_chain.verify(pool)).intact

    report = await audit_chain.verify(pool, anchors=[recorded])

    assert [p.kind for p in report.problems] == ["ANCHOR_MISMATCH"]
    code, output = await _verify_audit_command(
        scene, "--anchor", f"{recorded[0]}:{recorded[1].hex()}"
    )
    assert code == audit_chain.EXIT_TAMPERED
    assert f"no longer holds the link recorded for position {recorded[0]}" in output


async def test_sealing_waits_for_open_transactions_without_blocking_writers(scene: Scene) -> None:
    """An event whose transaction is still open is not sealed, nor any written after it, so it
    takes its place in the chain when it commits; meanwhile writers carry on unhindered."""
    pool = scene.service.runtime.pool
    await audit_chain.seal(pool, wait=True)

    def entry(reason: str) -> audit.AuditEntry:
        return audit.AuditEntry("cli:test", "", "Test", True, reason, uuid.uuid4().hex, "test")

    async with pool.acquire() as slow, pool.acquire() as fast:
        transaction = slow.transaction()
        await transaction.start()
        try:
            await audit.append(slow, entry("first, committed last"))
            await audit.append(fast, entry("second, committed first"))
            await audit_chain.seal(pool, wait=True)
            unsealed = await fast.fetch(
                "SELECT reason FROM audit_events WHERE chain_hash IS NULL ORDER BY sequence"
            )
            assert [r["reason"] for r in unsealed] == ["second, committed first"]
            # The sealer's lock is held (a long seal, say): the hot path still writes its events.
            async with fast.transaction():
                assert await lock_sealer(fast, wait=False)
                response = await scene.service.stub.VerifyCode(
                    pb.VerifyCodeRequest(username=scene.admin.username, code="000000"),
                    metadata=scene.verifier.metadata(),
                    timeout=5,
                )
                assert response.result == enums_pb2.VERIFY_CODE_RESULT_FAILED
                assert await audit_chain.seal(pool, wait=False) == 0
        finally:
            await transaction.commit()

    await audit_chain.seal(pool, wait=True)
    async with pool.acquire() as conn:
        order = await conn.fetch(
            "SELECT reason FROM audit_events WHERE operation = 'Test' ORDER BY chain_position"
        )
    assert [r["reason"] for r in order] == ["first, committed last", "second, committed first"]
    assert (await audit_chain.verify(pool)).intact


async def test_two_sealers_at_once_build_one_chain(scene: Scene) -> None:
    pool = scene.service.runtime.pool
    for _ in range(50):
        await scene.service.stub.VerifyCode(
            pb.VerifyCodeRequest(username=scene.admin.username, code="000000"),
            metadata=scene.verifier.metadata(),
        )

    await asyncio.gather(*(audit_chain.seal(pool, wait=True, batch=7) for _ in range(4)))

    report = await audit_chain.verify(pool)
    assert report.intact, report.problems
    async with pool.acquire() as conn:
        positions = [
            r["chain_position"]
            for r in await conn.fetch(
                "SELECT chain_position FROM audit_events ORDER BY txid, sequence"
            )
        ]
    assert positions == list(range(1, len(positions) + 1))


async def test_events_are_chained_and_followed_in_numeric_transaction_order(
    database_url: str,
) -> None:
    """Regression: the transaction id is read as text, and ORDER BY a bare `txid` sorted by
    that text, so "100" came before "99" and a follower of the log (WatchAuditEvents) skipped or
    repeated events whenever transaction ids gained a digit."""
    async with scratch_database(database_url) as url:
        runtime = await make_runtime(url, TestClock())
        try:
            async with runtime.pool.acquire() as conn:
                # Old transaction ids (the cluster is well past them), across a digit boundary.
                for txid in ("98", "99", "100", "101"):
                    await conn.execute(
                        "INSERT INTO audit_events (actor, target, operation, outcome, reason,"
                        " request_id, peer, txid) VALUES ('a', 't', 'Op', 'SUCCESS', $1::text, 'r',"
                        " 'p', $1::text::xid8)",
                        txid,
                    )
                followed, _ = await audit.after(conn, ("0", 0), 10)
                assert [row.reason for row in followed] == ["98", "99", "100", "101"]
                newest = await audit.cursor_at(conn, 0)
                assert newest[0] == "101"

            assert await audit_chain.seal(runtime.pool, wait=True, batch=2) == 4
            async with runtime.pool.acquire() as conn:
                chained = await conn.fetch(
                    "SELECT reason FROM audit_events ORDER BY chain_position"
                )
            assert [r["reason"] for r in chained] == ["98", "99", "100", "101"]
            assert (await audit_chain.verify(runtime.pool)).intact
        finally:
            await runtime.pool.close()


def _row(**changes: object) -> ChainRow:
    row = ChainRow(
        txid=1234,
        sequence=7,
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        actor="admin",
        target="alice",
        operation="ResetSecret",
        outcome="SUCCESS",
        reason="",
        request_id="r1",
        peer="ipv4:127.0.0.1:5000",
        chain_position=None,
        chain_hash=None,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


def test_every_field_and_the_position_are_covered_by_the_link() -> None:
    base = audit_chain.link(audit_chain.GENESIS, _row(), 1)
    variants = [
        _row(txid=1235),
        _row(sequence=8),
        _row(occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678902, tzinfo=UTC)),
        _row(actor="admin2"),
        _row(target="bob"),
        _row(operation="DeleteSecret"),
        _row(outcome="FAILURE"),
        _row(reason="X"),
        _row(request_id="r2"),
        _row(peer="ipv4:127.0.0.1:5001"),
    ]
    links = {audit_chain.link(audit_chain.GENESIS, v, 1) for v in variants}
    links.add(audit_chain.link(audit_chain.GENESIS, _row(), 2))
    links.add(audit_chain.link(bytes([1]) * 32, _row(), 1))
    assert base not in links
    assert len(links) == len(variants) + 2


def test_the_encoding_keeps_field_boundaries() -> None:
    """Length prefixes: moving text from one field to the next changes the encoding."""
    assert audit_chain.canonical_encoding(
        _row(actor="ab", target="c"), 1
    ) != audit_chain.canonical_encoding(_row(actor="a", target="bc"), 1)
