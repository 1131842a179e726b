"""TOTP (RFC 6238) over pyotp: new secrets, code checks that say which time step matched,
provisioning URIs (Key Uri Format) and their QR codes."""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
from base64 import b32encode
from collections.abc import Callable
from dataclasses import dataclass

import pyotp
import segno

from twofactor_service.config import TotpParameters

_DIGESTS: dict[str, Callable[..., hashlib._Hash]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}


class SecretKey:
    """Raw key bytes that never show themselves in a repr, log line or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def base32(self) -> str:
        return b32encode(self._value).decode("ascii").rstrip("=")

    def __repr__(self) -> str:
        return "SecretKey(<hidden>)"

    __str__ = __repr__


@dataclass(frozen=True)
class KeyParameters:
    algorithm: str
    digits: int
    period_seconds: int


def new_secret(params: TotpParameters) -> SecretKey:
    return SecretKey(secrets.token_bytes(params.secret_bytes))


def _totp(secret: SecretKey, key: KeyParameters) -> pyotp.TOTP:
    return pyotp.TOTP(
        secret.base32(),
        digits=key.digits,
        digest=_DIGESTS[key.algorithm],
        interval=key.period_seconds,
    )


def time_step(now: float, period_seconds: int) -> int:
    return int(now) // period_seconds


@dataclass(frozen=True)
class StepMatch:
    # The matching time step newer than the last used one, if any.
    step: int | None
    # The code matched only steps already used: a replay, not a wrong code.
    replayed: bool


def _hotp(secret: SecretKey, key: KeyParameters, step: int) -> str:
    """RFC 4226 §5.3 (HOTP of the time step, RFC 6238 §4), computed as pyotp does, without its
    base32 round trip of the secret at every step: the hot path checks three steps a call."""
    mac = hmac.digest(secret.reveal(), step.to_bytes(8, "big"), key.algorithm.lower())
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**key.digits).zfill(key.digits)


def matching_step(
    secret: SecretKey, key: KeyParameters, code: str, *, now: float, window: int, after_step: int
) -> StepMatch:
    """The time step within ±window of now whose code equals `code`, newer than `after_step`.

    Steps at or before `after_step` were already used (or are older than a used one): the
    replay rule of SPEC §4 refuses them. Every candidate is compared in constant time.
    """
    current = time_step(now, key.period_seconds)
    found = None
    used = False
    # Time steps start at 0 (RFC 6238 §4: T0 is the Unix epoch); there is no step before it.
    for step in range(max(0, current - window), current + window + 1):
        if hmac.compare_digest(_hotp(secret, key, step), code):
            if step > after_step:
                found = step
            else:
                used = True
    return StepMatch(found, replayed=found is None and used)


def code_at(secret: SecretKey, key: KeyParameters, step: int) -> str:
    return _totp(secret, key).generate_otp(step)


def provisioning_uri(secret: SecretKey, key: KeyParameters, *, username: str, issuer: str) -> str:
    uri: str = _totp(secret, key).provisioning_uri(name=username, issuer_name=issuer)
    return uri


def qr_png(uri: str) -> bytes:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="png", scale=5, border=4)
    return out.getvalue()


def qr_svg(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=5, border=4, xmldecl=False)
    return out.getvalue().decode("utf-8")


def qr_terminal(uri: str) -> str:
    out = io.StringIO()
    segno.make(uri, error="m").terminal(out=out, compact=True)
    return out.getvalue()
