"""Recovery codes (O11): one-time codes an ENROLLED account makes for itself, each usable once
instead of a TOTP code at sign-in, when the authenticator is lost.

A code is 16 characters of Crockford's base32 (https://www.crockford.com/base32.html), 80
random bits, shown in four groups of four (`7KQ2-M9XD-...`): no I, L, O or U to misread, and
typed in any case, with or without the dashes and spaces; the letters I and L read as 1, O as 0,
as Crockford's decoding says. Only SHA-256(salt || code) is stored, with 16 random bytes of
salt per code (docs/choices.md: why a fast hash is enough at 80 bits, and why argon2 is not).

Using a code is an attempt under the attempt budget like a TOTP code (the sign-in that carries
it is paid for first; sign_in.py); a wrong one is found in memory, against the hashes read with
the account, so it costs what a wrong TOTP code costs and takes no extra round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from twofactor_service import rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import Attempt, check_code, pay, settled
from twofactor_service.errors import InvalidArgument, RuleViolation
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, keys, recovery_codes
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.database import Connection
from twofactor_service.store.recovery_codes import StoredRecoveryCode

# Crockford's base32 alphabet: digits, then letters without I, L, O and U.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 16  # 16 x 5 bits = 80 bits of entropy
GROUP = 4
SALT_BYTES = 16
# Longer input is refused before it is looked at (a formatted code is 19 characters).
MAX_INPUT_LENGTH = 64
# Crockford's decoding: case-insensitive, I and L are 1, O is 0, hyphens are ignored; spaces too.
_NORMALISE = str.maketrans({"I": "1", "L": "1", "O": "0", "-": None, " ": None})
_SHAPE = (
    f"must be {CODE_LENGTH} characters of Crockford base32 (0-9 and A-Z without I, L, O, U), "
    "as XXXX-XXXX-XXXX-XXXX; case, dashes and spaces do not matter"
)


@dataclass(frozen=True)
class RecoveryCodeSet:
    """A new set, as shown once to its owner."""

    codes: tuple[str, ...]

    def __repr__(self) -> str:
        return f"RecoveryCodeSet({len(self.codes)} codes)"


def new_code() -> str:
    """A fresh code, formatted in groups."""
    raw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i : i + GROUP] for i in range(0, CODE_LENGTH, GROUP))


def normalise(value: str, field: str = "recovery_code") -> str:
    """The code's 16 characters as stored in the hash; InvalidArgument when it cannot be one."""
    if len(value) > MAX_INPUT_LENGTH or not value.isascii():
        raise InvalidArgument(field, _SHAPE)
    plain = value.upper().translate(_NORMALISE)
    if len(plain) != CODE_LENGTH or any(ch not in ALPHABET for ch in plain):
        raise InvalidArgument(field, _SHAPE)
    return plain


def hash_code(salt: bytes, normalised: str) -> bytes:
    return hashlib.sha256(salt + normalised.encode("ascii")).digest()


def hashed(code: str) -> tuple[bytes, bytes]:
    """(salt, hash) of a new code, for storing."""
    salt = secrets.token_bytes(SALT_BYTES)
    return salt, hash_code(salt, normalise(code))


def matching_code(unused: tuple[StoredRecoveryCode, ...], normalised: str) -> int | None:
    """The id of the unused code `normalised` is, or None. Every stored code is compared, in
    constant time, whichever matches: the time says nothing about which one did."""
    found = None
    for stored in unused:
        if hmac.compare_digest(hash_code(stored.salt, normalised), stored.code_hash):
            found = stored.id
    return found


async def generate(
    runtime: Runtime, caller: Caller, code: str, *, proven_by_step_up: bool
) -> tuple[RecoveryCodeSet, AccountRecord]:
    """A new set of codes for the caller's own account, replacing the old one. Needs a current
    code of the caller's active key, paid for and used up; a step-up proof accepted for this
    call (protected accounts) carried one already, and `code` is then not asked again."""
    actor = caller.signed_in()
    if code or not proven_by_step_up:
        rules.validate_code_shape(code)
    if proven_by_step_up:
        async with runtime.pool.acquire() as conn:
            return await _replace_set(runtime, conn, caller, actor.account_id, None)
    async with runtime.pool.acquire() as conn:
        key = await keys.active(conn, actor.account_id)
        if key is None:
            raise _no_active_key()
        ticket = await pay(runtime, conn, actor.account_id)
    async with (
        settled(runtime, caller, actor.username, ticket) as attempt,
        runtime.pool.acquire() as conn,
    ):
        if not await check_code(runtime, conn, key, code):
            raise RuleViolation(
                "CODE_INVALID",
                "the code does not match your key (or was already used); check the "
                "authenticator app's clock and try the next code",
            )
        return await _replace_set(runtime, conn, caller, actor.account_id, attempt)


def _no_active_key() -> RuleViolation:
    return RuleViolation(
        "NO_ACTIVE_KEY",
        "this account has no active secret key (it was reset or deleted); recovery codes "
        "stand in for a key's codes, so set up a key first",
    )


async def _replace_set(
    runtime: Runtime,
    conn: Connection,
    caller: Caller,
    account_id: int,
    attempt: Attempt | None,
) -> tuple[RecoveryCodeSet, AccountRecord]:
    codes = RecoveryCodeSet(tuple(new_code() for _ in range(runtime.config.recovery_codes_per_set)))
    async with conn.transaction():
        # The account row first, as a reset or delete takes it: a reset that got there first
        # deleted the key, and its voiding of the codes is not undone by this set.
        await accounts.lock_by_id(conn, account_id)
        if await keys.active(conn, account_id) is None:
            raise _no_active_key()
        await recovery_codes.replace_set(conn, account_id, [hashed(c) for c in codes.codes])
        if attempt is not None:
            await attempt.succeed(conn)
        record = await accounts.find_by_id(conn, account_id)
        await audit.append(conn, caller.audit(record.username, reason="RECOVERY_CODES_GENERATED"))
        return codes, record
