"""The TOTP core against RFC 6238 Appendix B's published test vectors, and the replay rule of
SPEC §4 as a plain function (no server, no database)."""

from __future__ import annotations

import pyotp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twofactor_service.totp import KeyParameters, SecretKey, matching_step

# RFC 6238 Appendix B: the seeds are ASCII "1234567890" repeated to the hash's key length.
SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
VECTORS = [
    (59, {"SHA1": "94287082", "SHA256": "46119246", "SHA512": "90693936"}),
    (1111111109, {"SHA1": "07081804", "SHA256": "68084774", "SHA512": "25091201"}),
    (1111111111, {"SHA1": "14050471", "SHA256": "67062674", "SHA512": "99943326"}),
    (1234567890, {"SHA1": "89005924", "SHA256": "91819424", "SHA512": "93441116"}),
    (2000000000, {"SHA1": "69279037", "SHA256": "90698825", "SHA512": "38618901"}),
    (20000000000, {"SHA1": "65353130", "SHA256": "77737706", "SHA512": "47863826"}),
]


@pytest.mark.parametrize(("time", "codes"), VECTORS)
@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
def test_codes_match_rfc_6238_appendix_b(time: int, codes: dict[str, str], algorithm: str) -> None:
    key = KeyParameters(algorithm, 8, 30)
    step = time // 30

    match = matching_step(
        SecretKey(SEEDS[algorithm]), key, codes[algorithm], now=time, window=0, after_step=-1
    )

    assert match.step == step


@given(secret=st.binary(min_size=20, max_size=20), now=st.integers(0, 2**33))
def test_six_digit_codes_agree_with_pyotp(secret: bytes, now: int) -> None:
    key = KeyParameters("SHA1", 6, 30)
    code = pyotp.TOTP(SecretKey(secret).base32()).at(now)

    assert matching_step(SecretKey(secret), key, code, now=now, window=1, after_step=-1).step == (
        now // 30
    )


def test_a_used_step_is_reported_as_a_replay_not_a_match() -> None:
    secret = SecretKey(SEEDS["SHA1"])
    key = KeyParameters("SHA1", 8, 30)

    match = matching_step(secret, key, "94287082", now=59, window=1, after_step=1)

    assert match.step is None
    assert match.replayed
