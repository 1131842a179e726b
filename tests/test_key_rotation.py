"""SPEC §3: secrets at rest are AES-256-GCM encrypted with the account bound in, and the
encryption keys rotate online: `twofactor rotate-keys` re-encrypts every stored secret under
the ring's new key while the service serves, and nothing is lost when the old key is dropped.

Rotation changes every stored secret, so these tests run on a database of their own, with
servers whose key rings they choose (`[old]`, then `[new, old]`, then `[new]`).
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    PERIOD,
    Actors,
    LocalService,
    Person,
    TestClock,
    error_reason,
    local_service,
    scratch_database,
)
from twofactor_service.code_checks import SECRET_PURPOSE
from twofactor_service.config import Config
from twofactor_service.encryption import (
    DecryptionFailed,
    KeyRing,
    load_key_ring,
    new_key_line,
    parse_keys,
)
from twofactor_service.key_rotation import BatchDone, rotate_keys
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, keys
from twofactor_service.store.database import Connection

OLD_KEYS = new_key_line("old")
NEW_KEYS = new_key_line("new")
BOTH_KEYS = f"{NEW_KEYS},{OLD_KEYS}"
USERS = 10
TWOFACTOR = Path(sys.executable).with_name("twofactor")
CLI_TIMEOUT_SECONDS = 120.0


@pytest.fixture
async def scratch_url(database_url: str) -> AsyncIterator[str]:
    async with scratch_database(database_url) as url:
        yield url


async def _key_ids(runtime: Runtime) -> dict[str, int]:
    """How many stored secrets each encryption key holds."""
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT encryption_key_id, count(*) AS n FROM secret_keys GROUP BY encryption_key_id"
        )
    return {r["encryption_key_id"]: r["n"] for r in rows}


async def _enrolled_users(service: LocalService, clock: TestClock, count: int) -> list[Person]:
    actors = Actors(service.stub, service.runtime, clock, prefix="rotation")
    return [await actors.user() for _ in range(count)]


async def _verify_all(
    stub: pb_grpc.TwoFactorServiceAsyncStub, verifier: Person, users: list[Person]
) -> list[int]:
    """Every user's current code, checked at once; the caller moves the clock to a fresh step."""
    responses = await asyncio.gather(
        *(
            stub.VerifyCode(
                pb.VerifyCodeRequest(username=user.username, code=user.code_now()),
                metadata=verifier.metadata(),
            )
            for user in users
        )
    )
    return [r.result for r in responses]


async def test_rotation_reencrypts_every_secret_while_codes_are_verified(scratch_url: str) -> None:
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        users = await _enrolled_users(old, clock, USERS)
        actors = Actors(old.stub, old.runtime, clock, prefix="rotation-svc")
        verifier = await actors.service()
        # A key halfway through regeneration: the pending key is rotated too.
        regenerating = users[0]
        begun = await old.stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=regenerating.metadata()
        )
        pending_secret = begun.pending_key.secret_base32
        assert await _key_ids(old.runtime) == {"old": USERS + 1}

    # Every replica now has the ring [new, old]: new secrets use `new`, both keys decrypt.
    async with local_service(scratch_url, clock, encryption_keys=BOTH_KEYS) as mixed:
        one_round_at_a_time = asyncio.Lock()
        rounds: list[list[int]] = []

        async def verify_round() -> None:
            async with one_round_at_a_time:
                clock.advance(PERIOD)  # a fresh time step, so no code is a replay
                rounds.append(await _verify_all(mixed.stub, verifier, users))

        seen_between_batches: list[dict[str, int]] = []

        async def between_batches(done: BatchDone) -> None:
            seen_between_batches.append(await _key_ids(mixed.runtime))
            await verify_round()

        rotation = asyncio.create_task(
            rotate_keys(mixed.runtime, batch_size=3, on_batch=between_batches)
        )
        rounds_alongside = 0
        while not rotation.done():
            await verify_round()
            rounds_alongside += 1
        report = await rotation

        assert rounds_alongside >= 1
        # Reads worked with the secrets half rotated, and all along.
        assert any(set(ids) == {"old", "new"} for ids in seen_between_batches)
        assert all(result == enums_pb2.VERIFY_CODE_RESULT_OK for r in rounds for result in r)
        assert report.complete
        assert report.resealed == USERS + 1
        assert report.unreadable == set()
        assert await _key_ids(mixed.runtime) == {"new": USERS + 1}
        # Rotation rewrote the ciphertext only: the replay rule's memory survived it.
        replayed = await _verify_all(mixed.stub, verifier, users)
        assert set(replayed) == {enums_pb2.VERIFY_CODE_RESULT_FAILED}
        clock.advance(PERIOD)
        assert set(await _verify_all(mixed.stub, verifier, users)) == {
            enums_pb2.VERIFY_CODE_RESULT_OK
        }

    # The old key is gone from the ring: nothing was lost.
    async with local_service(scratch_url, clock, encryption_keys=NEW_KEYS) as new_only:
        for user in users:
            response = await new_only.stub.SignIn(
                pb.SignInRequest(
                    username=user.username, password=user.password, code=user.next_code()
                )
            )
            assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
            user.token = response.session.token
        confirmed = await new_only.stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=regenerating.next_code(pending_secret)),
            metadata=regenerating.metadata(),
        )
        assert confirmed.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
        # And the old key alone opens none of them any more.
        old_ring = KeyRing(parse_keys(OLD_KEYS, "old"))
        async with new_only.runtime.pool.acquire() as conn:
            for key in await keys.all_sealed(conn, not_key_id="", limit=1000):
                with pytest.raises(DecryptionFailed):
                    old_ring.open(key.sealed, account_id=key.account_id, purpose=SECRET_PURPOSE)


async def test_two_rotations_at_once_reencrypt_each_secret_once(scratch_url: str) -> None:
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        users = await _enrolled_users(old, clock, USERS)
        verifier = await Actors(old.stub, old.runtime, clock, prefix="rotation-svc").service()

    async with (
        local_service(scratch_url, clock, encryption_keys=BOTH_KEYS) as first,
        local_service(scratch_url, clock, encryption_keys=BOTH_KEYS) as second,
    ):
        reports = await asyncio.gather(
            rotate_keys(first.runtime, batch_size=1), rotate_keys(second.runtime, batch_size=1)
        )
        assert all(report.complete for report in reports)
        # Each secret was re-encrypted by exactly one of them; the other skipped it.
        assert sum(report.resealed for report in reports) == USERS
        assert await _key_ids(first.runtime) == {"new": USERS}

    async with local_service(scratch_url, clock, encryption_keys=NEW_KEYS) as new_only:
        clock.advance(PERIOD)
        assert set(await _verify_all(new_only.stub, verifier, users)) == {
            enums_pb2.VERIFY_CODE_RESULT_OK
        }


async def test_a_secret_changed_since_it_was_read_is_not_overwritten(scratch_url: str) -> None:
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        await _enrolled_users(old, clock, 1)
    async with local_service(scratch_url, clock, encryption_keys=BOTH_KEYS) as mixed:
        ring = mixed.runtime.key_ring
        async with mixed.runtime.pool.acquire() as conn:
            [stale] = await keys.all_sealed(conn, not_key_id="new", limit=10)
            report = await rotate_keys(mixed.runtime)
            assert report.resealed == 1
            [current] = await keys.all_sealed(conn, not_key_id="", limit=10)

            secret = ring.open(stale.sealed, account_id=stale.account_id, purpose=SECRET_PURPOSE)
            late = ring.seal(secret, account_id=stale.account_id, purpose=SECRET_PURPOSE)

            # A rotation that read the row before the other one wrote it must not write it.
            assert not await keys.reseal(conn, stale.id, stale.sealed, late)
            [after] = await keys.all_sealed(conn, not_key_id="", limit=10)
            assert after.sealed == current.sealed


async def test_a_secret_busy_meanwhile_is_skipped_and_taken_up_later(scratch_url: str) -> None:
    """Rotation never waits for a row another transaction holds (a key being swapped in, say),
    so it cannot deadlock with one; it leaves the row for a later pass or run."""
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        await _enrolled_users(old, clock, 3)
    async with local_service(scratch_url, clock, encryption_keys=BOTH_KEYS) as mixed:
        pool = mixed.runtime.pool
        async with pool.acquire() as holder, holder.transaction():
            busy = await holder.fetchval(
                "SELECT id FROM secret_keys"
                " WHERE id = (SELECT id FROM secret_keys ORDER BY id LIMIT 1 OFFSET 1) FOR UPDATE"
            )
            report = await asyncio.wait_for(rotate_keys(mixed.runtime), 30)

            assert not report.complete
            assert report.resealed == 2
            assert report.skipped >= 1
            assert report.remaining == 1
            assert (
                await holder.fetchval(
                    "SELECT encryption_key_id FROM secret_keys WHERE id = $1", busy
                )
                == "old"
            )

        again = await rotate_keys(mixed.runtime)

        assert again.complete
        assert again.resealed == 1
        assert await _key_ids(mixed.runtime) == {"new": 3}


async def test_a_ciphertext_copied_to_another_account_does_not_decrypt(
    actors: Actors,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    runtime: Runtime,
    db: Connection,
) -> None:
    alice, bob = await actors.user(), await actors.user()
    alice_account = await accounts.find(db, alice.username)
    bob_account = await accounts.find(db, bob.username)
    assert alice_account is not None
    assert bob_account is not None

    # Someone with write access to the table copies Alice's secret onto Bob's row.
    await db.execute(
        """
        UPDATE secret_keys b
        SET encryption_key_id = a.encryption_key_id, nonce = a.nonce, ciphertext = a.ciphertext
        FROM secret_keys a
        WHERE a.account_id = $1 AND a.state = 'ACTIVE' AND b.account_id = $2 AND b.state = 'ACTIVE'
        """,
        alice_account.id,
        bob_account.id,
    )
    bob_key = await keys.active(db, bob_account.id)
    assert bob_key is not None

    # The associated data names the account: the copy fails authentication.
    with pytest.raises(DecryptionFailed):
        runtime.key_ring.open(bob_key.sealed, account_id=bob_account.id, purpose=SECRET_PURPOSE)
    # So Alice's codes do not open Bob's account; the server refuses rather than guesses, and
    # the refusal is audited as a sign of tampering.
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.SignIn(
            pb.SignInRequest(username=bob.username, password=bob.password, code=alice.next_code())
        )
    assert failure.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_reason(failure.value) == "SECRET_UNREADABLE"
    audited = await db.fetchval(
        "SELECT count(*) FROM audit_events WHERE target = $1 AND reason = 'SECRET_UNREADABLE'",
        bob.username,
    )
    assert audited == 1


# --- The command line, as an operator runs it.


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def _twofactor(*args: str, env: dict[str, str]) -> Finished:
    """`.venv/bin/twofactor ARGS` with only the given TWOFACTOR_* variables; killed (and the
    test failed) if it does not end in time."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    process = await asyncio.create_subprocess_exec(
        str(TWOFACTOR),
        *args,
        env=clean | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"`twofactor {' '.join(args)}` did not end in time") from None
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


async def test_rotate_keys_command_reencrypts_and_reports(scratch_url: str) -> None:
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        users = await _enrolled_users(old, clock, 3)

    done = await _twofactor(
        "rotate-keys",
        "--batch-size",
        "2",
        env={"TWOFACTOR_DATABASE_URL": scratch_url, "TWOFACTOR_ENCRYPTION_KEYS": BOTH_KEYS},
    )

    assert done.returncode == 0, done.stderr
    assert "re-encrypted 3 secret keys under encryption key 'new'" in done.stdout
    async with local_service(scratch_url, clock, encryption_keys=NEW_KEYS) as new_only:
        assert await _key_ids(new_only.runtime) == {"new": 3}
        for user in users:
            response = await new_only.stub.SignIn(
                pb.SignInRequest(
                    username=user.username, password=user.password, code=user.next_code()
                )
            )
            assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        async with new_only.runtime.pool.acquire() as conn:
            reasons = await conn.fetch(
                "SELECT actor, outcome, reason FROM audit_events"
                " WHERE operation = 'RotateEncryptionKeys'"
            )
    assert [(r["outcome"], r["reason"]) for r in reasons] == [
        ("SUCCESS", "resealed 3 under key new")
    ]
    assert reasons[0]["actor"].startswith("cli:")


async def test_rotate_keys_without_the_old_key_changes_nothing_and_fails(scratch_url: str) -> None:
    clock = TestClock()
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as old:
        await _enrolled_users(old, clock, 2)

    # The operator forgot to keep the old key in the ring.
    done = await _twofactor(
        "rotate-keys",
        env={"TWOFACTOR_DATABASE_URL": scratch_url, "TWOFACTOR_ENCRYPTION_KEYS": NEW_KEYS},
    )

    assert done.returncode == 1
    assert "2 secret keys cannot be decrypted" in done.stderr
    async with local_service(scratch_url, clock, encryption_keys=OLD_KEYS) as again:
        assert await _key_ids(again.runtime) == {"old": 2}


# --- Configuration: a production start never runs without a real key.


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_production_start_without_an_encryption_key_is_refused(
    database_url: str, command: str
) -> None:
    done = await _twofactor(
        command,
        env={
            "TWOFACTOR_DATABASE_URL": database_url,
            "TWOFACTOR_LISTEN_ADDRESS": "127.0.0.1:0",
            "TWOFACTOR_CONSOLE_ADDRESS": "127.0.0.1:0",
        },
    )

    assert done.returncode == 3, done.stderr
    assert "no encryption key is configured" in done.stderr
    assert "TWOFACTOR_ENCRYPTION_KEYS" in done.stderr


async def test_a_malformed_encryption_key_is_refused(database_url: str) -> None:
    done = await _twofactor(
        "migrate",
        env={"TWOFACTOR_DATABASE_URL": database_url, "TWOFACTOR_ENCRYPTION_KEYS": "k1:c2hvcnQ="},
    )

    assert done.returncode == 3
    assert "must be 32 bytes" in done.stderr


async def test_embedded_mode_generates_a_key_file_and_says_so(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key_file = data_dir / "encryption-keys"

    done = await _twofactor("migrate", env={"TWOFACTOR_DATA_DIR": str(data_dir)})

    assert done.returncode == 0, done.stderr
    assert f"generated a development encryption key in {key_file}" in done.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    generated = key_file.read_text()
    KeyRing(parse_keys(generated, str(key_file)))  # one usable 256-bit key
    # The next start uses it, silently: the data it encrypted stays readable.
    ring, notice = load_key_ring(Config(data_dir=data_dir))
    assert notice is None
    assert ring.current_key_id == "dev1"
    assert key_file.read_text() == generated
