"""Secrets at rest: AES-256-GCM with a key ring.

Each ciphertext is stored with the id of the key that made it and a fresh 96-bit nonce; the
account id and the purpose (active/pending key) are bound in as associated data, so a
ciphertext copied onto another account's row fails to decrypt. The first key of the ring
encrypts; every key decrypts, so keys rotate online (`twofactor rotate-keys`).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from twofactor_service.config import Config, ConfigError
from twofactor_service.totp import SecretKey

KEY_FILE_NAME = "encryption-keys"


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


class DecryptionFailed(Exception):
    """A stored secret could not be decrypted (unknown key id, or tampered/misplaced row)."""


def _associated_data(account_id: int, purpose: str) -> bytes:
    return f"twofactor.v1/secret-key/{purpose}/account:{account_id}".encode()


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("no encryption key configured")
        self._current_id = keys[0][0]
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}

    @property
    def current_key_id(self) -> str:
        return self._current_id

    def seal(self, secret: SecretKey, *, account_id: int, purpose: str) -> Sealed:
        nonce = os.urandom(12)
        ciphertext = self._ciphers[self._current_id].encrypt(
            nonce, secret.reveal(), _associated_data(account_id, purpose)
        )
        return Sealed(self._current_id, nonce, ciphertext)

    def open(self, sealed: Sealed, *, account_id: int, purpose: str) -> SecretKey:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise DecryptionFailed(f"encryption key {sealed.key_id!r} is not configured")
        try:
            plain = cipher.decrypt(
                sealed.nonce, sealed.ciphertext, _associated_data(account_id, purpose)
            )
        except InvalidTag:
            raise DecryptionFailed("stored secret failed authentication") from None
        return SecretKey(plain)

    def __repr__(self) -> str:
        return f"KeyRing(current={self._current_id!r}, ids={sorted(self._ciphers)!r})"


def parse_keys(spec: str, source: str) -> list[tuple[str, bytes]]:
    """Parses "kid:base64key[,kid:base64key...]" (or one per line); 32-byte keys only."""
    keys = []
    for item in spec.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        kid, sep, encoded = item.partition(":")
        if not sep or not kid:
            raise ConfigError(f"{source}: each key is 'id:base64', e.g. k1:{'A' * 43}=")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ConfigError(f"{source}: key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise ConfigError(f"{source}: key {kid!r} must be 32 bytes (AES-256), got {len(key)}")
        keys.append((kid, key))
    if len({kid for kid, _ in keys}) != len(keys):
        raise ConfigError(f"{source}: key ids must be unique")
    return keys


def new_key_line(kid: str) -> str:
    return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode('ascii')}"


def load_key_ring(config: Config) -> tuple[KeyRing, str | None]:
    """The key ring from configuration, and a notice to print when one was generated.

    Embedded (development) mode without a key generates one into the data folder; a production
    start (database URL set) without a key is refused.
    """
    if config.encryption_keys:
        return KeyRing(parse_keys(config.encryption_keys, "TWOFACTOR_ENCRYPTION_KEYS")), None
    if config.encryption_key_file:
        path = config.encryption_key_file
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read TWOFACTOR_ENCRYPTION_KEY_FILE {path}: {exc.strerror}"
            ) from None
        return KeyRing(parse_keys(text, str(path))), None
    if not config.embedded_database:
        raise ConfigError(
            "TWOFACTOR_DATABASE_URL is set but no encryption key is configured: set "
            "TWOFACTOR_ENCRYPTION_KEYS or TWOFACTOR_ENCRYPTION_KEY_FILE "
            "(make one with `twofactor new-encryption-key`)"
        )
    path = Path(config.data_dir) / KEY_FILE_NAME
    notice = None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key_line("dev1") + "\n")
        notice = f"generated a development encryption key in {path} (keep it with the data)"
    return KeyRing(parse_keys(path.read_text(), str(path))), notice
