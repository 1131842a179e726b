"""Passwords of INTERNAL accounts: argon2id (RFC 9106), verified off the event loop.

An unknown account is checked against a dummy hash, so it costs the same time as a wrong
password and sign-in reveals nothing about which accounts exist.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("not a real password: equalises timing for unknown accounts")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when `password` matches; with no stored hash, spends the same time and is False."""
    return await asyncio.to_thread(_verify, stored_hash, password)
