"""Sessions and enrollment tickets. Only SHA-256 hashes of the bearer tokens are stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from twofactor_service.rules import AccountKind
from twofactor_service.store.database import Connection


def new_token() -> tuple[str, bytes]:
    """A 256-bit random token (base64url) and the hash under which it is stored."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


async def open_session(
    conn: Connection,
    account_id: int,
    *,
    signed_in_with_two_factor: bool,
    ttl_seconds: int,
) -> tuple[str, datetime]:
    token, hashed = new_token()
    expires_at = await conn.fetchval(
        "INSERT INTO sessions (token_hash, account_id, signed_in_with_two_factor, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING expires_at",
        hashed,
        account_id,
        signed_in_with_two_factor,
        ttl_seconds,
    )
    return token, expires_at


@dataclass(frozen=True)
class SessionActor:
    """Who calls with a session (or, session-less, with a client certificate's account)."""

    account_id: int
    username: str
    kind: AccountKind
    protected: bool
    excluded: bool
    signed_in_with_two_factor: bool
    has_active_key: bool
    rights: frozenset[tuple[str, str]]
    idle_seconds: float
    # When the session ends (seconds since the epoch); None without a session.
    expires_at: float | None


_ACTOR_COLUMNS = """
       a.id, a.username, a.kind, a.protected, a.excluded,
       EXISTS (SELECT 1 FROM secret_keys k
               WHERE k.account_id = a.id AND k.state = 'ACTIVE') AS has_active_key,
       array(SELECT functional_area FROM account_rights r WHERE r.account_id = a.id
             ORDER BY functional_area, permission) AS right_areas,
       array(SELECT permission FROM account_rights r WHERE r.account_id = a.id
             ORDER BY functional_area, permission) AS right_permissions
"""


async def resolve(conn: Connection, hashed: bytes, idle_limit_seconds: int) -> SessionActor | None:
    """The live session's account, rights and key state, in one round trip."""
    row = await conn.fetchrow(
        f"""
        SELECT {_ACTOR_COLUMNS}, s.signed_in_with_two_factor,
               extract(epoch FROM now() - s.last_seen_at)::float8 AS idle_seconds,
               extract(epoch FROM s.expires_at)::float8 AS expires_at
        FROM sessions s JOIN accounts a ON a.id = s.account_id
        WHERE s.token_hash = $1 AND s.expires_at > now()
          AND s.last_seen_at > now() - make_interval(secs => $2)
        """,
        hashed,
        idle_limit_seconds,
    )
    return _actor(row) if row else None


async def resolve_account(conn: Connection, username_key: str) -> SessionActor | None:
    """An account as a session-less caller (a client certificate's), in one round trip."""
    row = await conn.fetchrow(
        f"""
        SELECT {_ACTOR_COLUMNS}, false AS signed_in_with_two_factor,
               0::float8 AS idle_seconds, NULL::float8 AS expires_at
        FROM accounts a WHERE a.username_key = $1
        """,
        username_key,
    )
    return _actor(row) if row else None


def _actor(row: asyncpg.Record) -> SessionActor:
    return SessionActor(
        account_id=row["id"],
        username=row["username"],
        kind=AccountKind(row["kind"]),
        protected=row["protected"],
        excluded=row["excluded"],
        signed_in_with_two_factor=row["signed_in_with_two_factor"],
        has_active_key=row["has_active_key"],
        rights=frozenset(zip(row["right_areas"], row["right_permissions"], strict=True)),
        idle_seconds=row["idle_seconds"],
        expires_at=row["expires_at"],
    )


async def touch(conn: Connection, hashed: bytes) -> None:
    await conn.execute("UPDATE sessions SET last_seen_at = now() WHERE token_hash = $1", hashed)


async def end(conn: Connection, hashed: bytes) -> None:
    await conn.execute("DELETE FROM sessions WHERE token_hash = $1", hashed)


async def end_all(conn: Connection, account_id: int, *, except_hash: bytes | None = None) -> int:
    result = await conn.execute(
        "DELETE FROM sessions WHERE account_id = $1 AND token_hash IS DISTINCT FROM $2",
        account_id,
        except_hash,
    )
    return int(result.split()[-1])


async def open_ticket(
    conn: Connection, account_id: int, secret_key_id: int, ttl_seconds: int
) -> str:
    token, hashed = new_token()
    await conn.execute("DELETE FROM enrollment_tickets WHERE account_id = $1", account_id)
    await conn.execute(
        "INSERT INTO enrollment_tickets (ticket_hash, account_id, secret_key_id, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        hashed,
        account_id,
        secret_key_id,
        ttl_seconds,
    )
    return token


async def take_ticket(conn: Connection, ticket: str) -> tuple[int, int] | None:
    """The live ticket's (account id, pending key id), locked for this transaction."""
    row = await conn.fetchrow(
        "SELECT account_id, secret_key_id FROM enrollment_tickets"
        " WHERE ticket_hash = $1 AND expires_at > now() FOR UPDATE",
        token_hash(ticket),
    )
    return (row["account_id"], row["secret_key_id"]) if row else None


async def end_ticket(conn: Connection, ticket: str) -> None:
    await conn.execute("DELETE FROM enrollment_tickets WHERE ticket_hash = $1", token_hash(ticket))


async def end_all_of(conn: Connection, account_ids: list[int]) -> int:
    """Ends every session of these accounts; returns how many there were."""
    result = await conn.execute(
        "DELETE FROM sessions WHERE account_id = ANY($1::bigint[])", account_ids
    )
    return int(result.split()[-1])
