"""Online re-encryption of the stored secrets under the key ring's current key
(`twofactor rotate-keys`, SPEC §3 "keys can be rotated online").

The operator's procedure:

1. Give every replica the ring `[new, old]` (new first: it encrypts; both decrypt) and roll
   them. Secrets made from then on are encrypted with `new`.
2. Run `twofactor rotate-keys` with the same ring while the service serves. It walks the
   `secret_keys` rows not yet under `new`, a batch at a time, and re-encrypts them.
3. When it reports nothing left, drop `old` from every ring.

Each batch is its own short transaction: its rows are read, decrypted and re-encrypted in
memory, and each is written back only if it is unchanged since it was read (same key id and
nonce). The write touches only the ciphertext columns, so a code check racing it (which moves
`last_used_step` on the same row) neither waits long nor loses its update. A row changed
meanwhile (another rotation got there first), or held by another transaction at that moment,
is skipped, never waited for (so rotation cannot deadlock with a key change), and looked at
again by the next pass.
A row that no key of the ring opens is reported, left as it is, and the command fails: its
account cannot sign in with any ring, and the operator must know.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from twofactor_service.caller import Caller
from twofactor_service.code_checks import SECRET_PURPOSE
from twofactor_service.encryption import DecryptionFailed
from twofactor_service.runtime import Runtime
from twofactor_service.store import audit, keys

DEFAULT_BATCH_SIZE = 100
# Passes over the table before giving up on rows that keep changing under us.
MAX_PASSES = 5


@dataclass(frozen=True)
class BatchDone:
    """Progress after one committed batch."""

    pass_number: int
    resealed: int
    skipped: int
    unreadable: int


@dataclass
class RotationReport:
    current_key_id: str
    resealed: int = 0
    # Rows that changed between read and write: retried by the next pass.
    skipped: int = 0
    # Ids of `secret_keys` rows no key of the ring decrypts.
    unreadable: set[int] = field(default_factory=set)
    # Rows still under another key after the last pass, the unreadable ones included.
    remaining: int = 0
    passes: int = 0

    @property
    def complete(self) -> bool:
        return not self.unreadable and self.remaining == 0


OnBatch = Callable[[BatchDone], Awaitable[None]]


async def _one_pass(
    runtime: Runtime, report: RotationReport, batch_size: int, on_batch: OnBatch | None
) -> int:
    """Walks every row not under the current key once; returns how many it found readable."""
    ring = runtime.key_ring
    current = ring.current_key_id
    after_id = 0
    found = 0
    while True:
        resealed = skipped = 0
        async with runtime.pool.acquire() as conn, conn.transaction():
            batch = await keys.all_sealed(
                conn, not_key_id=current, limit=batch_size, after_id=after_id
            )
            if not batch:
                return found
            for key in batch:
                try:
                    secret = ring.open(
                        key.sealed, account_id=key.account_id, purpose=SECRET_PURPOSE
                    )
                except DecryptionFailed:
                    report.unreadable.add(key.id)
                    continue
                found += 1
                sealed = ring.seal(secret, account_id=key.account_id, purpose=SECRET_PURPOSE)
                if await keys.reseal(conn, key.id, key.sealed, sealed):
                    resealed += 1
                else:
                    skipped += 1
            after_id = batch[-1].id
        report.resealed += resealed
        report.skipped += skipped
        if on_batch is not None:
            await on_batch(BatchDone(report.passes, resealed, skipped, len(report.unreadable)))


async def rotate_keys(
    runtime: Runtime,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_passes: int = MAX_PASSES,
    on_batch: OnBatch | None = None,
) -> RotationReport:
    """Re-encrypts every stored secret not yet under the ring's current key, online."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RotationReport(current_key_id=runtime.key_ring.current_key_id)
    while report.passes < max_passes:
        report.passes += 1
        skipped_before = report.skipped
        found = await _one_pass(runtime, report, batch_size, on_batch)
        # Done when a pass found nothing it could re-encrypt, or re-encrypted all it found.
        if found == 0 or report.skipped == skipped_before:
            break
    async with runtime.pool.acquire() as conn:
        report.remaining = await keys.count_not_sealed_with(conn, report.current_key_id)
    return report


async def rotate_keys_command(runtime: Runtime, caller: Caller, batch_size: int) -> int:
    """`twofactor rotate-keys`: rotates, audits, prints a summary; 0 when nothing is left."""
    report = await rotate_keys(runtime, batch_size=batch_size)
    summary = (
        f"re-encrypted {report.resealed} secret keys under encryption key "
        f"{report.current_key_id!r} in {report.passes} pass(es)"
    )
    async with runtime.pool.acquire() as conn:
        await audit.append(
            conn,
            caller.audit(
                "",
                success=report.complete,
                reason=f"resealed {report.resealed} under key {report.current_key_id}"
                if report.complete
                else "SECRET_KEYS_NOT_ROTATED",
            ),
        )
    print(summary)
    if report.unreadable:
        ids = ", ".join(str(i) for i in sorted(report.unreadable))
        print(
            f"error: {len(report.unreadable)} secret keys cannot be decrypted with the configured "
            f"key ring (secret_keys ids {ids}); they were left unchanged. Add the key they were "
            "encrypted with to the ring and run rotate-keys again.",
            file=sys.stderr,
        )
    if report.remaining > len(report.unreadable):
        print(
            f"error: {report.remaining - len(report.unreadable)} secret keys are still under an "
            "older key (they changed during every pass, or a replica without the new key keeps "
            "writing them); run rotate-keys again.",
            file=sys.stderr,
        )
    if report.complete:
        print(f"every secret key is now encrypted with {report.current_key_id!r}.")
    return 0 if report.complete else 1


def batch_size_argument(raw: str) -> int:
    """argparse type of `rotate-keys --batch-size`."""
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 10000")
    return int(raw)
