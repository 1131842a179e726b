"""Seeds the bench database: thousands of enrolled accounts whose secrets the load generator
can derive, a few accounts that only ever get wrong codes (they lock), and one service account
holding the verify right with an open session.

Written straight through SQL and the store (not the API): seeding 20 000 accounts through
SignIn would take longer than the whole bench. Secrets are sealed with the service's own
KeyRing, as the service would seal them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from twofactor_service.code_checks import SECRET_PURPOSE
from twofactor_service.encryption import KeyRing
from twofactor_service.passwords import hash_password
from twofactor_service.rules import AccountKind
from twofactor_service.store import accounts, sessions
from twofactor_service.store.database import Connection
from twofactor_service.store.migrations import migrate
from twofactor_service.totp import SecretKey

VERIFY_RIGHT = ("Two-factor authentication service", "VERIFY_CODES")
PASSWORD = "bench password, never a real one"  # noqa: S105 - throw-away bench accounts
SERVICE_ACCOUNT = "bench-verifier"
PERIOD_SECONDS = 30
DIGITS = 6


@dataclass(frozen=True)
class BenchAccounts:
    """What the load generator needs to know; written to a JSON file next to the data."""

    users: int
    lockout_users: int
    password: str
    verifier_token: str

    @staticmethod
    def user(index: int) -> str:
        return f"bench-user-{index:06d}"

    @staticmethod
    def lockout_user(index: int) -> str:
        return f"bench-lockout-{index:03d}"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))
        path.chmod(0o600)

    @classmethod
    def load(cls, path: Path) -> BenchAccounts:
        return cls(**json.loads(path.read_text()))


def secret_of(username: str) -> bytes:
    """The 160-bit secret of a bench account: derived from its name, so no file of secrets is
    needed and every load-generator process knows every key."""
    return hashlib.sha1(b"twofactor-bench-secret:" + username.encode()).digest()  # noqa: S324


def code_at(secret: bytes, step: int) -> str:
    """RFC 4226 HOTP of time step `step` (RFC 6238 with SHA-1, 6 digits)."""
    mac = hmac.new(secret, step.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    binary = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return f"{binary % 10**DIGITS:0{DIGITS}d}"


def base32_of(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


async def seed(
    conn: Connection, key_ring: KeyRing, *, users: int, lockout_users: int
) -> BenchAccounts:
    """Replaces everything in the bench database with a fresh set of accounts: the schema is
    made anew by the service's own migrations (the bench database is the bench's own)."""
    await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    await migrate(conn)
    password_hash = hash_password(PASSWORD)
    async with conn.transaction():
        names = [BenchAccounts.user(i) for i in range(users)]
        names += [BenchAccounts.lockout_user(i) for i in range(lockout_users)]
        rows = await conn.fetch(
            """
            INSERT INTO accounts (username, username_key, kind, password_hash)
            SELECT n, n, 'INTERNAL', $2 FROM unnest($1::text[]) AS n
            RETURNING id, username
            """,
            names,
            password_hash,
        )
        records = []
        for row in rows:
            sealed = key_ring.seal(
                SecretKey(secret_of(row["username"])), account_id=row["id"], purpose=SECRET_PURPOSE
            )
            records.append(
                (
                    row["id"],
                    "ACTIVE",
                    sealed.key_id,
                    sealed.nonce,
                    sealed.ciphertext,
                    "SHA1",
                    DIGITS,
                    PERIOD_SECONDS,
                )
            )
        await conn.copy_records_to_table(
            "secret_keys",
            records=records,
            columns=[
                "account_id",
                "state",
                "encryption_key_id",
                "nonce",
                "ciphertext",
                "algorithm",
                "digits",
                "period_seconds",
            ],
        )
        # The service account, made the way the CLI makes one: excluded from 2FA, holding the
        # verify right, with a session (as if it had signed in with its password).
        verifier_id = await accounts.create(
            conn,
            username=SERVICE_ACCOUNT,
            kind=AccountKind.INTERNAL,
            password_hash=password_hash,
            protected=False,
            excluded=True,
        )
        assert verifier_id is not None
        await accounts.grant(conn, verifier_id, VERIFY_RIGHT)
        token, _ = await sessions.open_session(
            conn, verifier_id, signed_in_with_two_factor=False, ttl_seconds=24 * 3600
        )
    await conn.execute("ANALYZE")
    return BenchAccounts(users, lockout_users, PASSWORD, token)


async def reset_counters(conn: Connection) -> None:
    """Between phases: every time step unused again and no failures counted, so each phase
    starts from the same state (the bench database is the bench's own)."""
    await conn.execute("UPDATE secret_keys SET last_used_step = -1 WHERE last_used_step <> -1")
    await conn.execute(
        "UPDATE accounts SET failed_attempts = 0, attempts_open = 0, locked_until = NULL"
        " WHERE failed_attempts <> 0 OR attempts_open <> 0 OR locked_until IS NOT NULL"
    )
