"""Accounts, their rights, list memberships (allowlist, exclusion list) and failure counters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from twofactor_service.rules import AccountKind, Right, TwoFactorState, two_factor_state
from twofactor_service.store import keys, recovery_codes
from twofactor_service.store.database import Connection
from twofactor_service.store.keys import StoredKey
from twofactor_service.store.recovery_codes import StoredRecoveryCode


@dataclass(frozen=True)
class AccountRecord:
    id: int
    username: str
    kind: AccountKind
    password_hash: str | None
    protected: bool
    allowlisted: bool
    excluded: bool
    failed_attempts: int
    locked_until: datetime | None
    key_created_at: datetime | None
    has_pending_key: bool
    rights: tuple[Right, ...]
    # Recovery codes (O11) not used yet.
    recovery_codes_remaining: int = 0

    @property
    def has_active_key(self) -> bool:
        return self.key_created_at is not None

    @property
    def state(self) -> TwoFactorState:
        return two_factor_state(
            has_active_key=self.has_active_key, allowlisted=self.allowlisted, excluded=self.excluded
        )

    def __repr__(self) -> str:
        # The password hash stays out of logs and tracebacks.
        return f"AccountRecord(id={self.id}, username={self.username!r}, state={self.state.name})"


_ACCOUNT_COLUMNS = (
    """
       a.id, a.username, a.kind, a.password_hash, a.protected, a.allowlisted, a.excluded,
       a.failed_attempts, a.locked_until,
       ak.created_at AS key_created_at,
       (pk.id IS NOT NULL) AS has_pending_key,
       array(SELECT functional_area FROM account_rights r WHERE r.account_id = a.id
             ORDER BY functional_area, permission) AS right_areas,
       array(SELECT permission FROM account_rights r WHERE r.account_id = a.id
             ORDER BY functional_area, permission) AS right_permissions,
"""
    + recovery_codes.REMAINING_COLUMN
)
_FROM_ACCOUNTS = """
FROM accounts a
LEFT JOIN secret_keys ak ON ak.account_id = a.id AND ak.state = 'ACTIVE'
LEFT JOIN secret_keys pk ON pk.account_id = a.id AND pk.state = 'PENDING' AND pk.expires_at > now()
"""
_SELECT_ACCOUNT = f"SELECT {_ACCOUNT_COLUMNS} {_FROM_ACCOUNTS}"
# The same, with the active key's columns (prefixed "key_") and the unused recovery codes, for
# sign-in.
_SELECT_ACCOUNT_AND_KEY = (
    f"SELECT {_ACCOUNT_COLUMNS}, {keys.columns('ak', prefix='key_')},"
    f" {recovery_codes.UNUSED_COLUMNS} {_FROM_ACCOUNTS}"
)


def username_key(username: str) -> str:
    return username.casefold()


def _record(row: asyncpg.Record) -> AccountRecord:
    return AccountRecord(
        id=row["id"],
        username=row["username"],
        kind=AccountKind(row["kind"]),
        password_hash=row["password_hash"],
        protected=row["protected"],
        allowlisted=row["allowlisted"],
        excluded=row["excluded"],
        failed_attempts=row["failed_attempts"],
        locked_until=row["locked_until"],
        key_created_at=row["key_created_at"],
        has_pending_key=row["has_pending_key"],
        rights=tuple(zip(row["right_areas"], row["right_permissions"], strict=True)),
        recovery_codes_remaining=row["recovery_codes_remaining"],
    )


async def find(conn: Connection, username: str) -> AccountRecord | None:
    row = await conn.fetchrow(_SELECT_ACCOUNT + "WHERE a.username_key = $1", username_key(username))
    return _record(row) if row else None


async def find_with_active_key(
    conn: Connection, username: str
) -> tuple[AccountRecord, StoredKey | None, tuple[StoredRecoveryCode, ...]] | None:
    """The account, its active key and its unused recovery codes in one round trip: a sign-in
    then costs the same round trips whether the password, the code or the name is wrong."""
    row = await conn.fetchrow(
        _SELECT_ACCOUNT_AND_KEY + "WHERE a.username_key = $1", username_key(username)
    )
    if row is None:
        return None
    key = keys.from_row(row, prefix="key_") if row["key_id"] is not None else None
    unused = recovery_codes.unused_from_arrays(row["recovery_ids"], row["recovery_hashes"])
    return _record(row), key, unused


async def find_by_id(conn: Connection, account_id: int) -> AccountRecord:
    row = await conn.fetchrow(_SELECT_ACCOUNT + "WHERE a.id = $1", account_id)
    assert row is not None, "account vanished inside its own transaction"
    return _record(row)


async def lock(conn: Connection, username: str) -> AccountRecord | None:
    """Locks the account row for the rest of the transaction, then reads it.

    Two administrators changing one account serialise here, so each sees the other's result.
    """
    account_id = await conn.fetchval(
        "SELECT id FROM accounts WHERE username_key = $1 FOR UPDATE", username_key(username)
    )
    return None if account_id is None else await find_by_id(conn, account_id)


async def lock_by_id(conn: Connection, account_id: int) -> None:
    """Takes the same row lock as `lock`. Every transaction that changes an account's keys
    takes it first, so they queue in one order instead of deadlocking (the account row, then
    its keys, tickets and sessions)."""
    await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)


async def create(
    conn: Connection,
    *,
    username: str,
    kind: AccountKind,
    password_hash: str | None,
    protected: bool,
    excluded: bool,
) -> int | None:
    """Inserts the account; None when the (case-insensitive) name is taken."""
    account_id: int | None = await conn.fetchval(
        """
        INSERT INTO accounts (username, username_key, kind, password_hash, protected,
                              allowlisted, excluded)
        VALUES ($1, $2, $3, $4, $5, NOT $6, $6)
        ON CONFLICT (username_key) DO NOTHING
        RETURNING id
        """,
        username,
        username_key(username),
        kind.value,
        password_hash,
        protected,
        excluded,
    )
    return account_id


async def set_lists(
    conn: Connection, account_id: int, *, allowlisted: bool, excluded: bool
) -> None:
    await conn.execute(
        "UPDATE accounts SET allowlisted = $2, excluded = $3 WHERE id = $1",
        account_id,
        allowlisted,
        excluded,
    )


async def set_protected(conn: Connection, account_id: int, protected: bool) -> None:
    await conn.execute("UPDATE accounts SET protected = $2 WHERE id = $1", account_id, protected)


async def set_password_hash(conn: Connection, account_id: int, password_hash: str) -> None:
    await conn.execute(
        "UPDATE accounts SET password_hash = $2 WHERE id = $1", account_id, password_hash
    )


async def grant(conn: Connection, account_id: int, right: Right) -> None:
    await conn.execute(
        "INSERT INTO account_rights (account_id, functional_area, permission) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        account_id,
        *right,
    )


async def revoke(conn: Connection, account_id: int, right: Right) -> None:
    await conn.execute(
        "DELETE FROM account_rights WHERE account_id = $1 AND functional_area = $2"
        " AND permission = $3",
        account_id,
        *right,
    )


async def list_members(
    conn: Connection, column: str, *, after: str, limit: int
) -> list[AccountRecord]:
    """Accounts on one list ("allowlisted" or "excluded"), by username key, after a page token."""
    assert column in ("allowlisted", "excluded")
    rows = await conn.fetch(
        _SELECT_ACCOUNT
        + f"WHERE a.{column} AND a.username_key > $1 ORDER BY a.username_key LIMIT $2",
        after,
        limit,
    )
    return [_record(r) for r in rows]


async def count_locked_out(conn: Connection) -> int:
    """How many accounts are locked out right now (for the metrics, once per scrape)."""
    count: int = await conn.fetchval("SELECT count(*) FROM accounts WHERE locked_until > now()")
    return count


async def list_accounts(
    conn: Connection, *, prefix: str, after: str, limit: int
) -> list[AccountRecord]:
    """Accounts whose username key starts with `prefix` (a casefolded text; empty for all), by
    username key, after a page token. `>= prefix` lets the scan start at the prefix."""
    rows = await conn.fetch(
        _SELECT_ACCOUNT + "WHERE a.username_key >= $1 AND a.username_key > $2"
        " AND starts_with(a.username_key, $1) ORDER BY a.username_key LIMIT $3",
        prefix,
        after,
        limit,
    )
    return [_record(r) for r in rows]


async def find_many(conn: Connection, usernames: list[str]) -> dict[str, AccountRecord]:
    """The accounts of these names that exist, by username key."""
    rows = await conn.fetch(
        _SELECT_ACCOUNT + "WHERE a.username_key = ANY($1::text[])",
        [username_key(name) for name in usernames],
    )
    return {username_key(r["username"]): _record(r) for r in rows}


async def lock_many(conn: Connection, usernames: list[str]) -> dict[str, AccountRecord]:
    """Locks the accounts of these names that exist, in id order (two transactions locking
    overlapping sets queue instead of deadlocking), then reads them, by username key."""
    account_ids = await conn.fetch(
        "SELECT id FROM accounts WHERE username_key = ANY($1::text[]) ORDER BY id FOR UPDATE",
        [username_key(name) for name in usernames],
    )
    rows = await conn.fetch(
        _SELECT_ACCOUNT + "WHERE a.id = ANY($1::bigint[])", [r["id"] for r in account_ids]
    )
    return {username_key(r["username"]): _record(r) for r in rows}


async def leave_lists(conn: Connection, account_ids: list[int]) -> None:
    """Takes the accounts off the allowlist: they have a key now (O12, as enrollment does)."""
    await conn.execute(
        "UPDATE accounts SET allowlisted = false WHERE id = ANY($1::bigint[])", account_ids
    )
