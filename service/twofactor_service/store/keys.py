"""TOTP secret keys: at most one ACTIVE and one PENDING per account, stored encrypted."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from twofactor_service.encryption import Sealed
from twofactor_service.store.database import Connection
from twofactor_service.totp import KeyParameters


@dataclass(frozen=True)
class StoredKey:
    id: int
    account_id: int
    sealed: Sealed
    parameters: KeyParameters
    last_used_step: int
    created_at: datetime
    expires_at: datetime | None

    def __repr__(self) -> str:
        return f"StoredKey(id={self.id}, account_id={self.account_id})"


_COLUMN_NAMES = (
    "id", "account_id", "encryption_key_id", "nonce", "ciphertext", "algorithm", "digits",
    "period_seconds", "last_used_step", "created_at", "expires_at",
)  # fmt: skip
_COLUMNS = ", ".join(_COLUMN_NAMES)


def columns(table_alias: str, *, prefix: str) -> str:
    """The key columns of `table_alias`, named with `prefix` (to select beside other rows)."""
    return ", ".join(f"{table_alias}.{name} AS {prefix}{name}" for name in _COLUMN_NAMES)


def from_row(row: asyncpg.Record, prefix: str = "") -> StoredKey:
    return StoredKey(
        id=row[prefix + "id"],
        account_id=row[prefix + "account_id"],
        sealed=Sealed(
            row[prefix + "encryption_key_id"], row[prefix + "nonce"], row[prefix + "ciphertext"]
        ),
        parameters=KeyParameters(
            row[prefix + "algorithm"], row[prefix + "digits"], row[prefix + "period_seconds"]
        ),
        last_used_step=row[prefix + "last_used_step"],
        created_at=row[prefix + "created_at"],
        expires_at=row[prefix + "expires_at"],
    )


async def active(conn: Connection, account_id: int) -> StoredKey | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM secret_keys WHERE account_id = $1 AND state = 'ACTIVE'",
        account_id,
    )
    return from_row(row) if row else None


async def pending(conn: Connection, account_id: int) -> StoredKey | None:
    """The account's unexpired pending key."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM secret_keys"
        " WHERE account_id = $1 AND state = 'PENDING' AND expires_at > now()",
        account_id,
    )
    return from_row(row) if row else None


async def by_id(conn: Connection, key_id: int) -> StoredKey | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM secret_keys WHERE id = $1", key_id)
    return from_row(row) if row else None


async def put_pending(
    conn: Connection,
    account_id: int,
    sealed: Sealed,
    parameters: KeyParameters,
    ttl_seconds: int,
) -> tuple[int, datetime]:
    """Replaces any pending key of the account with a new one; returns its id and expiry."""
    await conn.execute(
        "DELETE FROM secret_keys WHERE account_id = $1 AND state = 'PENDING'", account_id
    )
    row = await conn.fetchrow(
        """
        INSERT INTO secret_keys (account_id, state, encryption_key_id, nonce, ciphertext,
                                 algorithm, digits, period_seconds, expires_at)
        VALUES ($1, 'PENDING', $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
        RETURNING id, expires_at
        """,
        account_id,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
        parameters.algorithm,
        parameters.digits,
        parameters.period_seconds,
        ttl_seconds,
    )
    assert row is not None
    return row["id"], row["expires_at"]


async def activate_pending(conn: Connection, key_id: int) -> bool:
    """Makes the pending key active, deleting the old active key; the step its confirming code
    used stays used. False when the pending key is gone or expired. Call inside a transaction."""
    account_id = await conn.fetchval(
        "SELECT account_id FROM secret_keys WHERE id = $1 AND state = 'PENDING'"
        " AND expires_at > now() FOR UPDATE",
        key_id,
    )
    if account_id is None:
        return False
    await conn.execute(
        "DELETE FROM secret_keys WHERE account_id = $1 AND state = 'ACTIVE'", account_id
    )
    await conn.execute(
        "UPDATE secret_keys SET state = 'ACTIVE', expires_at = NULL, created_at = now()"
        " WHERE id = $1",
        key_id,
    )
    return True


async def delete_all(conn: Connection, account_id: int) -> int:
    """Deletes the account's active and pending key; returns how many there were."""
    result = await conn.execute("DELETE FROM secret_keys WHERE account_id = $1", account_id)
    return int(result.split()[-1])


async def consume_step(conn: Connection, key_id: int, step: int) -> bool:
    """Records `step` as used, atomically: True for exactly one caller per step, even when two
    replicas receive the same code at the same moment (the row lock serialises them and the
    second sees the first's step). The attempt was paid for before (store/attempts.py)."""
    consumed = await conn.fetchval(
        "UPDATE secret_keys SET last_used_step = $2 WHERE id = $1 AND last_used_step < $2"
        " RETURNING true",
        key_id,
        step,
    )
    return bool(consumed)


async def all_sealed(
    conn: Connection, *, not_key_id: str, limit: int, after_id: int = 0
) -> list[StoredKey]:
    """Keys not yet encrypted with `not_key_id` (for rotation), a batch at a time, by id after
    `after_id` (so a pass moves on past rows it could not re-encrypt)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM secret_keys WHERE encryption_key_id <> $1 AND id > $3"
        " ORDER BY id LIMIT $2",
        not_key_id,
        limit,
        after_id,
    )
    return [from_row(r) for r in rows]


async def count_not_sealed_with(conn: Connection, key_id: str) -> int:
    """How many keys are not (yet) encrypted with `key_id`."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM secret_keys WHERE encryption_key_id <> $1", key_id
    )
    return count


async def reseal(conn: Connection, key_id: int, old: Sealed, sealed: Sealed) -> bool:
    """Stores a re-encrypted secret unless the row changed meanwhile (its key id or nonce is no
    longer the one that was read: another rotation got there first) or is busy right now.

    A busy row is skipped rather than waited for: a rotation batch holding rows of its own while
    waiting for one that a key change holds (which may wait for one of the batch's) would
    deadlock; skipped, the row is taken up again by the next pass."""
    result = await conn.execute(
        "UPDATE secret_keys SET encryption_key_id = $4, nonce = $5, ciphertext = $6"
        " WHERE id = (SELECT id FROM secret_keys"
        "             WHERE id = $1 AND encryption_key_id = $2 AND nonce = $3"
        "             FOR UPDATE SKIP LOCKED)",
        key_id,
        old.key_id,
        old.nonce,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
    )
    return result.endswith(" 1")


async def replace_with_active(
    conn: Connection, entries: list[tuple[int, Sealed, KeyParameters]]
) -> None:
    """Makes each (account id, sealed secret, parameters) the account's only key, active now,
    with no time step used yet: an import (O12). Its pending key (with the enrollment ticket
    that confirms it) and its old active key are deleted. Call inside a transaction, with the
    accounts locked."""
    account_ids = [account_id for account_id, _, _ in entries]
    await conn.execute("DELETE FROM secret_keys WHERE account_id = ANY($1::bigint[])", account_ids)
    await conn.execute(
        """
        INSERT INTO secret_keys (account_id, state, encryption_key_id, nonce, ciphertext,
                                 algorithm, digits, period_seconds)
        SELECT account_id, 'ACTIVE', encryption_key_id, nonce, ciphertext,
               algorithm, digits, period_seconds
        FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[], $5::text[],
                    $6::integer[], $7::integer[])
             AS k(account_id, encryption_key_id, nonce, ciphertext, algorithm, digits,
                  period_seconds)
        """,
        account_ids,
        [sealed.key_id for _, sealed, _ in entries],
        [sealed.nonce for _, sealed, _ in entries],
        [sealed.ciphertext for _, sealed, _ in entries],
        [parameters.algorithm for _, _, parameters in entries],
        [parameters.digits for _, _, parameters in entries],
        [parameters.period_seconds for _, _, parameters in entries],
    )
