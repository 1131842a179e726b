"""Recovery codes (O11) as stored: per account, a salted hash of each code and when it was used.

The codes themselves are never stored (recovery_codes.py makes and checks them)."""

from __future__ import annotations

from dataclasses import dataclass

from twofactor_service.store.database import Connection


@dataclass(frozen=True)
class StoredRecoveryCode:
    """An unused code of an account: its row id, salt and SHA-256(salt || code)."""

    id: int
    salt: bytes
    code_hash: bytes

    def __repr__(self) -> str:
        return f"StoredRecoveryCode(id={self.id})"


# The unused codes of account `a` as two arrays (row ids; salt || hash), to select beside the
# account in the sign-in's one round trip (store/accounts.py).
UNUSED_COLUMNS = """
       array(SELECT rc.id FROM recovery_codes rc
             WHERE rc.account_id = a.id AND rc.used_at IS NULL ORDER BY rc.id) AS recovery_ids,
       array(SELECT rc.salt || rc.code_hash FROM recovery_codes rc
             WHERE rc.account_id = a.id AND rc.used_at IS NULL ORDER BY rc.id) AS recovery_hashes
"""
# How many codes of account `a` are unused, for its status.
REMAINING_COLUMN = """
       (SELECT count(*) FROM recovery_codes rc
        WHERE rc.account_id = a.id AND rc.used_at IS NULL)::integer AS recovery_codes_remaining
"""
_SALT_BYTES = 16


def unused_from_arrays(
    ids: list[int], salted_hashes: list[bytes]
) -> tuple[StoredRecoveryCode, ...]:
    return tuple(
        StoredRecoveryCode(code_id, value[:_SALT_BYTES], value[_SALT_BYTES:])
        for code_id, value in zip(ids, salted_hashes, strict=True)
    )


async def replace_set(conn: Connection, account_id: int, hashed: list[tuple[bytes, bytes]]) -> None:
    """The account's codes become `hashed` ((salt, hash) pairs); the old ones, used or not,
    are deleted. Call inside the transaction that holds the account row."""
    await conn.execute("DELETE FROM recovery_codes WHERE account_id = $1", account_id)
    await conn.executemany(
        "INSERT INTO recovery_codes (account_id, salt, code_hash) VALUES ($1, $2, $3)",
        [(account_id, salt, code_hash) for salt, code_hash in hashed],
    )


async def void(conn: Connection, account_id: int) -> int:
    """Deletes the account's codes (a reset, a deleted key, an exclusion); how many were unused."""
    unused: int = await conn.fetchval(
        "WITH gone AS (DELETE FROM recovery_codes WHERE account_id = $1 RETURNING used_at)"
        " SELECT count(*) FROM gone WHERE used_at IS NULL",
        account_id,
    )
    return unused


async def void_all_of(conn: Connection, account_ids: list[int]) -> None:
    """Deletes the codes of these accounts (an import gives them keys: O12)."""
    await conn.execute(
        "DELETE FROM recovery_codes WHERE account_id = ANY($1::bigint[])", account_ids
    )


async def use(conn: Connection, code_id: int) -> bool:
    """Marks the code used, atomically: True for exactly one caller, even when two replicas get
    the same code at the same moment (the row lock serialises them and the second finds it used,
    or deleted by a new set or a reset). The attempt was paid for before (store/attempts.py)."""
    used = await conn.fetchval(
        "UPDATE recovery_codes SET used_at = now() WHERE id = $1 AND used_at IS NULL"
        " RETURNING true",
        code_id,
    )
    return bool(used)
