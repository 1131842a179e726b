"""O12: importing the keys accounts already hold (ImportSecrets, `twofactor import`).

Files are made here the way other systems make them: otpauth:// URIs with secrets from pyotp,
and PSKC (RFC 6030) containers written by hand after the RFC's examples and encrypted with
Python `cryptography` (AES-CBC, HMAC-SHA1, PBKDF2), independently of the service's reader.
Every import is then proven the way a user would: signing in with codes computed from the
original secrets.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import quote

import grpc
import pyotp
import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import (
    PASSWORD,
    VERIFY_RIGHT,
    Actors,
    Person,
    audit_events,
    audit_rows_containing,
    error_reason,
)
from tests.test_cli import Run, cli_env
from twofactor_service import key_files
from twofactor_service.runtime import Runtime
from twofactor_service.store.database import Connection

Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"

OTPAUTH = enums_pb2.IMPORT_FORMAT_OTPAUTH
PSKC = enums_pb2.IMPORT_FORMAT_PSKC
DIGESTS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}


@dataclass
class Seed:
    """A key as its holder knows it: the secret and the parameters its codes are made with."""

    username: str
    secret: bytes
    algorithm: str = "SHA1"
    digits: int = 6
    period: int = 30

    @property
    def base32(self) -> str:
        return base64.b32encode(self.secret).decode("ascii").rstrip("=")

    def code(self, now: float) -> str:
        return pyotp.TOTP(
            self.base32, digits=self.digits, digest=DIGESTS[self.algorithm], interval=self.period
        ).at(now)


def new_seed(username: str, **parameters: Any) -> Seed:
    return Seed(username, os.urandom(20), **parameters)


def otpauth_uri(seed: Seed, issuer: str = "OldIdP") -> str:
    """As other systems export a key (Key Uri Format)."""
    return (
        f"otpauth://totp/{quote(issuer)}:{quote(seed.username)}?secret={seed.base32}"
        f"&issuer={quote(issuer)}&algorithm={seed.algorithm}&digits={seed.digits}"
        f"&period={seed.period}"
    )


def otpauth_file(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# --- PSKC, written by hand after RFC 6030 (figures 2, 6 and 7) and encrypted with
# `cryptography`.

AES128_CBC = "http://www.w3.org/2001/04/xmlenc#aes128-cbc"
NAMESPACES = (
    'xmlns:pskc="urn:ietf:params:xml:ns:keyprov:pskc" '
    'xmlns:ds="http://www.w3.org/2000/09/xmldsig#" '
    'xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" '
    'xmlns:xenc11="http://www.w3.org/2009/xmlenc11#" '
    'xmlns:pkcs5="http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#"'
)


def aes_cbc(key: bytes, plaintext: bytes) -> bytes:
    """XML Encryption's AES-CBC as RFC 6030 §6.1 uses it: the IV, then the ciphertext."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Container:
    """How the container protects its secrets: not at all, a pre-shared key, or PBKDF2."""

    pre_shared_key: bytes | None = None
    passphrase: str | None = None
    salt: bytes = b""
    iterations: int = 1000
    mac_key: bytes = b""

    def __post_init__(self) -> None:
        self.mac_key = os.urandom(20)
        if self.passphrase is not None:
            self.salt = os.urandom(8)

    @property
    def encryption_key(self) -> bytes | None:
        if self.passphrase is not None:
            return PBKDF2HMAC(
                algorithm=hashes.SHA1(),  # noqa: S303 - RFC 6030 §6.2's default PRF
                length=16,
                salt=self.salt,
                iterations=self.iterations,
            ).derive(self.passphrase.encode())
        return self.pre_shared_key

    def header(self) -> str:
        key = self.encryption_key
        if key is None:
            return ""
        if self.passphrase is not None:
            encryption_key = f"""
  <pskc:EncryptionKey>
    <xenc11:DerivedKey>
      <xenc11:KeyDerivationMethod
          Algorithm="http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#pbkdf2">
        <pkcs5:PBKDF2-params>
          <Salt><Specified>{b64(self.salt)}</Specified></Salt>
          <IterationCount>{self.iterations}</IterationCount>
          <KeyLength>16</KeyLength>
          <PRF/>
        </pkcs5:PBKDF2-params>
      </xenc11:KeyDerivationMethod>
      <xenc11:MasterKeyName>Import passphrase</xenc11:MasterKeyName>
    </xenc11:DerivedKey>
  </pskc:EncryptionKey>"""
        else:
            encryption_key = """
  <pskc:EncryptionKey><ds:KeyName>Pre-shared-key</ds:KeyName></pskc:EncryptionKey>"""
        return f"""{encryption_key}
  <pskc:MACMethod Algorithm="http://www.w3.org/2000/09/xmldsig#hmac-sha1">
    <pskc:MACKey>
      <xenc:EncryptionMethod Algorithm="{AES128_CBC}"/>
      <xenc:CipherData>
        <xenc:CipherValue>{b64(aes_cbc(key, self.mac_key))}</xenc:CipherValue>
      </xenc:CipherData>
    </pskc:MACKey>
  </pskc:MACMethod>"""

    def secret(self, value: bytes, *, with_mac: bool = True) -> str:
        key = self.encryption_key
        if key is None:
            return f"<pskc:Secret><pskc:PlainValue>{b64(value)}</pskc:PlainValue></pskc:Secret>"
        cipher_value = aes_cbc(key, value)
        # RFC 6030 §6.1.1: the MAC is over the CipherValue (IV and ciphertext).
        mac = hmac.digest(self.mac_key, cipher_value, "sha1")
        value_mac = f"<pskc:ValueMAC>{b64(mac)}</pskc:ValueMAC>" if with_mac else ""
        return f"""<pskc:Secret>
          <pskc:EncryptedValue>
            <xenc:EncryptionMethod Algorithm="{AES128_CBC}"/>
            <xenc:CipherData><xenc:CipherValue>{b64(cipher_value)}</xenc:CipherValue></xenc:CipherData>
          </pskc:EncryptedValue>
          {value_mac}
        </pskc:Secret>"""


def key_package(
    container: Container,
    seed: Seed,
    key_id: str,
    *,
    user_id: bool = True,
    algorithm: str = "totp",
    with_mac: bool = True,
    extra_data: str = "",
) -> str:
    suite = "" if seed.algorithm == "SHA1" else f"<pskc:Suite>HMAC-{seed.algorithm}</pskc:Suite>"
    user = f"<pskc:UserId>{seed.username}</pskc:UserId>" if user_id else ""
    return f"""
  <pskc:KeyPackage>
    <pskc:DeviceInfo>
      <pskc:Manufacturer>TokenVendorAcme</pskc:Manufacturer>
      <pskc:SerialNo>{key_id}</pskc:SerialNo>
    </pskc:DeviceInfo>
    <pskc:Key Id="{key_id}" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:{algorithm}">
      <pskc:Issuer>TokenVendorAcme</pskc:Issuer>
      <pskc:AlgorithmParameters>
        {suite}
        <pskc:ResponseFormat Length="{seed.digits}" Encoding="DECIMAL"/>
      </pskc:AlgorithmParameters>
      <pskc:Data>
        {container.secret(seed.secret, with_mac=with_mac)}
        <pskc:TimeInterval><pskc:PlainValue>{seed.period}</pskc:PlainValue></pskc:TimeInterval>
        {extra_data}
      </pskc:Data>
      {user}
    </pskc:Key>
  </pskc:KeyPackage>"""


def pskc_file(container: Container, *packages: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<pskc:KeyContainer Version="1.0" {NAMESPACES}>'
        f"{container.header()}{''.join(packages)}\n</pskc:KeyContainer>\n"
    ).encode()


# --- Helpers.


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value


async def import_file(
    stub: Stub,
    admin: Person,
    content: bytes,
    file_format: enums_pb2.ImportFormat.ValueType = OTPAUTH,
    **fields: Any,
) -> pb.ImportSecretsResponse:
    return await stub.ImportSecrets(
        pb.ImportSecretsRequest(format=file_format, content=content, **fields),
        metadata=admin.metadata(),
    )


async def state_of(stub: Stub, admin: Person, username: str) -> pb.AccountStatus:
    response = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=username), metadata=admin.metadata()
    )
    return response.status


async def signs_in_with(stub: Stub, actors: Actors, seed: Seed) -> pb.SignInResponse:
    """A sign-in with a code of the original secret, at a time step nobody used yet."""
    actors.clock.advance(seed.period)
    return await stub.SignIn(
        pb.SignInRequest(
            username=seed.username, password=PASSWORD, code=seed.code(actors.clock.now())
        )
    )


async def accounts(actors: Actors, count: int, **options: Any) -> list[str]:
    return [(await actors.create("holder", **options)).username for _ in range(count)]


# --- otpauth:// URIs.


async def test_otpauth_keys_sign_in_with_the_codes_of_their_original_secrets(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 3)
    seeds = [
        new_seed(names[0]),
        new_seed(names[1], algorithm="SHA256", digits=8, period=60),
        new_seed(names[2], algorithm="SHA512", digits=7, period=15),
    ]
    content = otpauth_file("# exported from OldIdP", "", *(otpauth_uri(s) for s in seeds))

    response = await import_file(stub, admin, content)

    assert not response.validate_only
    assert [(s.location, s.username) for s in response.secrets] == [
        ("line 3", names[0]),
        ("line 4", names[1]),
        ("line 5", names[2]),
    ]
    assert [(s.algorithm, s.digits, s.period_seconds) for s in response.secrets] == [
        ("SHA1", 6, 30),
        ("SHA256", 8, 60),
        ("SHA512", 7, 15),
    ]
    service = await actors.service(VERIFY_RIGHT)
    for seed in seeds:
        status = await state_of(stub, admin, seed.username)
        assert status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
        assert not status.allowlisted
        signed_in = await signs_in_with(stub, actors, seed)
        assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        # The key's own digit count and period hold for VerifyCode too.
        actors.clock.advance(seed.period)
        verified = await stub.VerifyCode(
            pb.VerifyCodeRequest(username=seed.username, code=seed.code(actors.clock.now())),
            metadata=service.metadata(),
        )
        assert verified.result == enums_pb2.VERIFY_CODE_RESULT_OK


async def test_a_code_of_the_service_default_parameters_fails_for_an_imported_key(
    actors: Actors, stub: Stub
) -> None:
    """The declared parameters are used, not the server's: a SHA1/6/30 code of the same secret
    is refused for a SHA256/8/60 key."""
    admin = await actors.admin()
    (name,) = await accounts(actors, 1)
    seed = new_seed(name, algorithm="SHA256", digits=8, period=60)
    await import_file(stub, admin, otpauth_file(otpauth_uri(seed)))

    actors.clock.advance(60)
    default_code = pyotp.TOTP(seed.base32).at(actors.clock.now())
    failure = await refused(
        stub.SignIn(pb.SignInRequest(username=name, password=PASSWORD, code=default_code))
    )

    assert failure.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_validate_only_reports_and_changes_nothing(
    actors: Actors, stub: Stub, db: Connection
) -> None:
    admin = await actors.admin()
    (fresh,) = await accounts(actors, 1)
    enrolled = await actors.user()
    seeds = [new_seed(fresh, digits=8), new_seed(enrolled.username)]
    before = await db.fetchval("SELECT count(*) FROM secret_keys")
    events_before = await db.fetchval("SELECT max(sequence) FROM audit_events")

    response = await import_file(
        stub,
        admin,
        otpauth_file(*(otpauth_uri(s) for s in seeds)),
        validate_only=True,
        replace_existing_keys=True,
    )

    assert response.validate_only
    assert [(s.username, s.digits, s.replaces_existing_key) for s in response.secrets] == [
        (fresh, 8, False),
        (enrolled.username, 6, True),
    ]
    assert (await state_of(stub, admin, fresh)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert await db.fetchval("SELECT count(*) FROM secret_keys") == before
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_events WHERE sequence > $1 AND operation = 'ImportSecrets'",
            events_before,
        )
        == 0
    )
    # The enrolled account's own key still works; the would-be one does not.
    assert (await actors.sign_in(enrolled)).token


BAD_LINES = [
    ("otpauth://hotp/OldIdP:{name}?secret={secret}&counter=5", "counter-based (HOTP)"),
    ("otpauth://totp/OldIdP:{name}?secret={secret}&digits=9", "9 digits are not supported"),
    ("otpauth://totp/OldIdP:{name}?secret={secret}&digits=4", "4 digits are not supported"),
    ("otpauth://totp/OldIdP:{name}?secret={secret}&algorithm=MD5", "algorithm 'MD5'"),
    ("otpauth://totp/OldIdP:{name}?secret={secret}&period=5", "period of 5 s"),
    ("otpauth://totp/OldIdP:{name}?secret={secret}&counter=1", "parameter 'counter'"),
    ("otpauth://totp/OldIdP:{name}?secret=NOT-BASE32!", "not base32"),
    ("otpauth://totp/OldIdP:{name}?secret=JBSWY3DPEHPK3PXP", "80 bits"),
    ("otpauth://totp/OldIdP:{name}?issuer=OldIdP", "no secret"),
    ("https://example.com/{name}?secret={secret}", "not an otpauth:// URI"),
    ("otpauth://totp/OldIdP:?secret={secret}", "account: is required"),
]


@pytest.mark.parametrize(("line", "says"), BAD_LINES, ids=[says for _, says in BAD_LINES])
async def test_an_unsupported_entry_is_refused_naming_its_line_and_nothing_is_imported(
    actors: Actors, stub: Stub, line: str, says: str
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 3)
    good = [otpauth_uri(new_seed(name)) for name in names[:2]]
    bad = line.format(name=names[2], secret=new_seed(names[2]).base32)

    failure = await refused(import_file(stub, admin, otpauth_file(good[0], "", good[1], bad)))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(failure)
    assert info.reason == "INVALID_KEY_FILE"
    assert info.metadata["location"] == "line 4"
    assert "line 4" in (failure.details() or "")
    assert says in (failure.details() or "")
    # Atomic: the good lines before it were not imported either.
    for name in names[:2]:
        assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_an_unknown_account_refuses_the_whole_file_naming_its_line(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    (known,) = await accounts(actors, 1)
    nobody = actors.name("nobody")
    content = otpauth_file(otpauth_uri(new_seed(known)), otpauth_uri(new_seed(nobody)))

    failure = await refused(import_file(stub, admin, content))

    assert failure.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(failure) == "ACCOUNT_NOT_FOUND"
    assert error_info(failure).metadata["location"] == "line 2"
    assert nobody in (failure.details() or "")
    assert (await state_of(stub, admin, known)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_the_same_account_twice_is_refused(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    (name,) = await accounts(actors, 1)
    content = otpauth_file(otpauth_uri(new_seed(name)), otpauth_uri(new_seed(name.upper())))

    failure = await refused(import_file(stub, admin, content))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(failure).metadata["location"] == "line 2"
    assert "line 1" in (failure.details() or "")


async def test_an_account_with_a_key_is_refused_unless_replacing_which_ends_its_sessions_and_codes(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    (fresh,) = await accounts(actors, 1)
    holder = await actors.user()
    old_secret = holder.secret
    recovery = await stub.GenerateRecoveryCodes(
        pb.GenerateRecoveryCodesRequest(code=holder.next_code()), metadata=holder.metadata()
    )
    seeds = [new_seed(fresh), new_seed(holder.username, digits=8)]
    content = otpauth_file(*(otpauth_uri(s) for s in seeds))

    failure = await refused(import_file(stub, admin, content))

    assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failure) == "ACCOUNT_HAS_KEY"
    assert error_info(failure).metadata["location"] == "line 2"
    assert (await state_of(stub, admin, fresh)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert (await actors.sign_in(holder)).token  # the old key still works

    response = await import_file(stub, admin, content, replace_existing_keys=True)

    assert [s.replaces_existing_key for s in response.secrets] == [False, True]
    # Like a reset, a replaced key's sessions end.
    ended = await refused(
        stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=holder.metadata())
    )
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    actors.clock.advance(30)
    with_old_key = await refused(
        stub.SignIn(
            pb.SignInRequest(
                username=holder.username, password=PASSWORD, code=holder.code_now(old_secret)
            )
        )
    )
    assert with_old_key.code() == grpc.StatusCode.UNAUTHENTICATED
    # The old key's recovery codes went with it, as a reset voids them.
    assert (await state_of(stub, admin, holder.username)).recovery_codes_remaining == 0
    with_recovery_code = await refused(
        stub.SignIn(
            pb.SignInRequest(
                username=holder.username,
                password=PASSWORD,
                recovery_code=recovery.recovery_codes[0],
            )
        )
    )
    assert with_recovery_code.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await signs_in_with(stub, actors, seeds[1])).session.token
    events = await audit_events(
        stub, admin, target_username=holder.username, operation="ImportSecrets"
    )
    assert [(e.reason, e.outcome) for e in events] == [
        ("REPLACED otpauth line 2", enums_pb2.AUDIT_OUTCOME_SUCCESS)
    ]


async def test_two_imports_of_the_same_accounts_at_once_end_with_one_files_keys(
    actors: Actors, stub: Stub
) -> None:
    """Both lock the accounts in the same order: no deadlock, and one whole file wins."""
    admin = await actors.admin()
    names = await accounts(actors, 3)
    first = [new_seed(name) for name in names]
    second = [new_seed(name, digits=8) for name in reversed(names)]

    outcomes = await asyncio.gather(
        import_file(stub, admin, otpauth_file(*(otpauth_uri(s) for s in first))),
        import_file(stub, admin, otpauth_file(*(otpauth_uri(s) for s in second))),
        return_exceptions=True,
    )

    failures = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(failures) == 1, outcomes
    assert error_reason(failures[0]) == "ACCOUNT_HAS_KEY"
    winner = first if not isinstance(outcomes[0], BaseException) else second
    for seed in winner:
        assert (await signs_in_with(stub, actors, seed)).session.token


async def test_own_and_excluded_accounts_are_refused(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    excluded = await actors.create("excluded", excluded=True)

    own = await refused(
        import_file(stub, admin, otpauth_file(otpauth_uri(new_seed(admin.username))))
    )
    other = await refused(
        import_file(stub, admin, otpauth_file(otpauth_uri(new_seed(excluded.username))))
    )

    assert (own.code(), error_reason(own)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "OWN_KEY_IMPORT",
    )
    assert (other.code(), error_reason(other)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_EXCLUDED",
    )


async def test_a_blocked_account_is_enrolled_and_its_pending_enrollment_is_dropped(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    (blocked, enrolling) = await accounts(actors, 2)
    await stub.RemoveFromAllowlist(
        pb.RemoveFromAllowlistRequest(username=blocked), metadata=admin.metadata()
    )
    started = await stub.SignIn(pb.SignInRequest(username=enrolling, password=PASSWORD))
    pending = started.enrollment.pending_key.secret_base32
    seeds = [new_seed(blocked), new_seed(enrolling)]

    await import_file(stub, admin, otpauth_file(*(otpauth_uri(s) for s in seeds)))

    for seed in seeds:
        assert (await state_of(stub, admin, seed.username)).state == (
            enums_pb2.TWO_FACTOR_STATE_ENROLLED
        )
        assert (await signs_in_with(stub, actors, seed)).session.token
    # The enrollment begun before the import cannot complete with the key it handed out.
    actors.clock.advance(30)
    stale = await refused(
        stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=started.enrollment.enrollment_ticket,
                code=pyotp.TOTP(pending).at(actors.clock.now()),
            )
        )
    )
    assert stale.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED)


async def test_a_protected_account_in_the_file_needs_step_up_once_for_the_call(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    (plain,) = await accounts(actors, 1)
    (guarded,) = await accounts(actors, 1, protected=True)
    seeds = [new_seed(plain), new_seed(guarded)]
    content = otpauth_file(*(otpauth_uri(s) for s in seeds))

    # Validating only changes nothing, needs no proof, and says which accounts will need it.
    checked = await import_file(stub, admin, content, validate_only=True)
    assert [s.protected for s in checked.secrets] == [False, True]

    without = await refused(import_file(stub, admin, content))
    assert (without.code(), error_reason(without)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "STEP_UP_REQUIRED",
    )
    assert guarded in (without.details() or "")
    wrong = await refused(
        stub.ImportSecrets(
            pb.ImportSecretsRequest(format=OTPAUTH, content=content),
            metadata=admin.metadata(
                x_step_up_password="not the password", x_step_up_code=admin.next_code()
            ),
        )
    )
    assert (wrong.code(), error_reason(wrong)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "STEP_UP_FAILED",
    )
    for name in (plain, guarded):
        assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED

    await stub.ImportSecrets(
        pb.ImportSecretsRequest(format=OTPAUTH, content=content), metadata=admin.step_up()
    )

    for seed in seeds:
        assert (await signs_in_with(stub, actors, seed)).session.token


async def test_only_administrators_with_two_factor_may_import(actors: Actors, stub: Stub) -> None:
    (name,) = await accounts(actors, 1)
    content = otpauth_file(otpauth_uri(new_seed(name)))
    user = await actors.user()
    admin_without_2fa = await actors.admin_without_2fa()

    anonymous = await refused(
        stub.ImportSecrets(pb.ImportSecretsRequest(format=OTPAUTH, content=content))
    )
    plain = await refused(import_file(stub, user, content))
    no_2fa = await refused(import_file(stub, admin_without_2fa, content))

    assert error_reason(anonymous) == "UNAUTHENTICATED"
    assert error_reason(plain) == "MISSING_RIGHT"
    assert error_reason(no_2fa) == "TWO_FACTOR_NOT_CONFIGURED"
    admin = await actors.admin()
    assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_every_account_gets_an_audit_event_and_no_secret_is_in_audit_or_logs(
    actors: Actors, stub: Stub, db: Connection, log_lines: list[str]
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 2)
    seeds = [new_seed(name) for name in names]
    container = Container(pre_shared_key=os.urandom(16))
    pskc_seeds = [new_seed(name) for name in await accounts(actors, 1)]
    await import_file(stub, admin, otpauth_file(*(otpauth_uri(s) for s in seeds)))
    await import_file(
        stub,
        admin,
        pskc_file(container, key_package(container, pskc_seeds[0], "777")),
        PSKC,
        pre_shared_key=container.pre_shared_key,
    )
    # A refused file's secrets stay out of the logs and the audit log as well.
    refused_seed = new_seed(names[0])
    await refused(import_file(stub, admin, otpauth_file(otpauth_uri(refused_seed) + "&x=1")))

    for seed, line in zip(seeds, ("line 1", "line 2"), strict=True):
        events = await audit_events(stub, admin, target_username=seed.username)
        assert [(e.operation, e.actor, e.reason) for e in events[:1]] == [
            ("ImportSecrets", admin.username, f"IMPORTED otpauth {line}")
        ]
    events = await audit_events(stub, admin, target_username=pskc_seeds[0].username)
    assert events[0].reason == 'IMPORTED pskc KeyPackage 1 (Key Id "777")'
    needles = []
    for seed in [*seeds, *pskc_seeds, refused_seed]:
        needles += [seed.base32, seed.base32.lower(), seed.secret.hex(), b64(seed.secret)]
    assert container.pre_shared_key is not None
    needles += [container.pre_shared_key.hex(), b64(container.pre_shared_key)]
    assert await audit_rows_containing(db, needles) == []
    assert [line for line in log_lines if any(n in line for n in needles)] == []
    # At rest: encrypted, never the secret itself.
    stored = await db.fetch(
        "SELECT k.ciphertext FROM secret_keys k JOIN accounts a ON a.id = k.account_id"
        " WHERE a.username = ANY($1::text[])",
        names,
    )
    assert len(stored) == 2
    assert all(seed.secret not in row["ciphertext"] for row in stored for seed in seeds)


async def test_limits_and_missing_format_are_invalid_arguments(
    actors: Actors, stub: Stub, runtime: Runtime
) -> None:
    admin = await actors.admin()
    too_many = otpauth_file(
        *(f"otpauth://totp/u{i}?secret={'A' * 32}" for i in range(key_files.MAX_KEYS + 1))
    )

    over = await refused(import_file(stub, admin, too_many))
    unspecified = await refused(
        import_file(
            stub, admin, b"otpauth://totp/x?secret=AAAA", enums_pb2.IMPORT_FORMAT_UNSPECIFIED
        )
    )
    empty = await refused(import_file(stub, admin, b""))
    # Past the server's message limit (TWOFACTOR_MAX_MESSAGE_BYTES), gRPC itself refuses.
    huge = await refused(import_file(stub, admin, b"#" * (runtime.config.max_message_bytes + 1)))
    not_utf8 = await refused(import_file(stub, admin, b"# ok\n\xff\xfe\n"))

    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {key_files.MAX_KEYS}" in (over.details() or "")
    assert (unspecified.code(), error_info(unspecified).metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "format",
    )
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(not_utf8).metadata["location"] == "line 2"


# --- PSKC (RFC 6030).


@pytest.mark.parametrize("protection", ["pre-shared key", "PBKDF2 passphrase", "plain"])
async def test_pskc_keys_sign_in_with_the_codes_of_their_original_secrets(
    actors: Actors, stub: Stub, protection: str
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 3)
    if protection == "pre-shared key":
        container = Container(pre_shared_key=os.urandom(16))
        opener: dict[str, Any] = {"pre_shared_key": container.pre_shared_key}
    elif protection == "PBKDF2 passphrase":
        container = Container(passphrase="correct horse battery staple")
        opener = {"passphrase": container.passphrase}
    else:
        container = Container()
        opener = {}
    seeds = [
        new_seed(names[0]),
        new_seed(names[1], algorithm="SHA256", digits=8, period=60),
        new_seed(names[2], algorithm="SHA512"),
    ]
    content = pskc_file(
        container,
        key_package(container, seeds[0], "1001"),
        key_package(container, seeds[1], "1002"),
        # A token shipped without a UserId: mapped to its account by its Key Id.
        key_package(container, seeds[2], "1003", user_id=False),
    )

    response = await import_file(
        stub, admin, content, PSKC, key_accounts={"1003": names[2]}, **opener
    )

    assert [(s.location, s.username) for s in response.secrets] == [
        ('KeyPackage 1 (Key Id "1001")', names[0]),
        ('KeyPackage 2 (Key Id "1002")', names[1]),
        ('KeyPackage 3 (Key Id "1003")', names[2]),
    ]
    assert [(s.algorithm, s.digits, s.period_seconds) for s in response.secrets] == [
        ("SHA1", 6, 30),
        ("SHA256", 8, 60),
        ("SHA512", 6, 30),
    ]
    for seed in seeds:
        signed_in = await signs_in_with(stub, actors, seed)
        assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED


# RFC 6030 figure 7, as published (PBKDF2 with the passphrase "qwerty"; the secret is
# "12345678901234567890"), with a UserId added and, for the TOTP case, the Key's Algorithm
# changed: the MAC covers the secret only, so the published ciphertext still opens.
RFC6030_FIGURE_7 = """<?xml version="1.0" encoding="UTF-8"?>
<pskc:KeyContainer
  xmlns:pskc="urn:ietf:params:xml:ns:keyprov:pskc"
  xmlns:xenc11="http://www.w3.org/2009/xmlenc11#"
  xmlns:pkcs5="http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#"
  xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" Version="1.0">
    <pskc:EncryptionKey>
        <xenc11:DerivedKey>
            <xenc11:KeyDerivationMethod
              Algorithm="http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#pbkdf2">
                <pkcs5:PBKDF2-params>
                    <Salt>
                        <Specified>Ej7/PEpyEpw=</Specified>
                    </Salt>
                    <IterationCount>1000</IterationCount>
                    <KeyLength>16</KeyLength>
                    <PRF/>
                </pkcs5:PBKDF2-params>
            </xenc11:KeyDerivationMethod>
            <xenc:ReferenceList>
                <xenc:DataReference URI="#ED"/>
            </xenc:ReferenceList>
            <xenc11:MasterKeyName>My Password 1</xenc11:MasterKeyName>
        </xenc11:DerivedKey>
    </pskc:EncryptionKey>
    <pskc:MACMethod
        Algorithm="http://www.w3.org/2000/09/xmldsig#hmac-sha1">
        <pskc:MACKey>
            <xenc:EncryptionMethod
            Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>
            <xenc:CipherData>
                <xenc:CipherValue>
2GTTnLwM3I4e5IO5FkufoOEiOhNj91fhKRQBtBJYluUDsPOLTfUvoU2dStyOwYZx
                </xenc:CipherValue>
            </xenc:CipherData>
        </pskc:MACKey>
    </pskc:MACMethod>
    <pskc:KeyPackage>
        <pskc:DeviceInfo>
            <pskc:Manufacturer>TokenVendorAcme</pskc:Manufacturer>
            <pskc:SerialNo>987654321</pskc:SerialNo>
        </pskc:DeviceInfo>
        <pskc:CryptoModuleInfo>
            <pskc:Id>CM_ID_001</pskc:Id>
        </pskc:CryptoModuleInfo>
        <pskc:Key Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:{algorithm}" Id="123456">
            <pskc:Issuer>Example-Issuer</pskc:Issuer>
            <pskc:AlgorithmParameters>
                <pskc:ResponseFormat Length="8" Encoding="DECIMAL"/>
            </pskc:AlgorithmParameters>
            <pskc:Data>
                <pskc:Secret>
                <pskc:EncryptedValue Id="ED">
                    <xenc:EncryptionMethod
                        Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>
                        <xenc:CipherData>
                            <xenc:CipherValue>
      oTvo+S22nsmS2Z/RtcoF8Hfh+jzMe0RkiafpoDpnoZTjPYZu6V+A4aEn032yCr4f
                        </xenc:CipherValue>
                    </xenc:CipherData>
                    </pskc:EncryptedValue>
                    <pskc:ValueMAC>LP6xMvjtypbfT9PdkJhBZ+D6O4w=
                    </pskc:ValueMAC>
                </pskc:Secret>
            </pskc:Data>
            <pskc:UserId>{user}</pskc:UserId>
        </pskc:Key>
    </pskc:KeyPackage>
</pskc:KeyContainer>
"""


async def test_the_rfc_6030_published_pbkdf2_example_opens_and_its_hotp_key_is_refused(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    (name,) = await accounts(actors, 1)

    hotp = await refused(
        import_file(
            stub,
            admin,
            RFC6030_FIGURE_7.format(algorithm="hotp", user=name).encode(),
            PSKC,
            passphrase="qwerty",
        )
    )
    assert hotp.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(hotp).metadata["location"] == 'KeyPackage 1 (Key Id "123456")'
    assert "counter-based (HOTP)" in (hotp.details() or "")
    assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED

    await import_file(
        stub,
        admin,
        RFC6030_FIGURE_7.format(algorithm="totp", user=name).encode(),
        PSKC,
        passphrase="qwerty",
    )

    seed = Seed(name, b"12345678901234567890", digits=8)
    assert (await signs_in_with(stub, actors, seed)).session.token


async def test_pskc_errors_name_the_element_and_nothing_is_imported(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 2)
    container = Container(passphrase="the right passphrase")
    seeds = [new_seed(name) for name in names]

    def document(**second: Any) -> bytes:
        return pskc_file(
            container,
            key_package(container, seeds[0], "A1"),
            key_package(container, seeds[1], "A2", **second),
        )

    cases: list[tuple[bytes, dict[str, Any], str, str]] = [
        (document(), {"passphrase": "a wrong passphrase"}, 'KeyPackage 1 (Key Id "A1")',
         "cannot be decrypted"),
        (document(with_mac=False), {"passphrase": container.passphrase},
         'KeyPackage 2 (Key Id "A2")', "no valid ValueMAC"),
        (document(algorithm="hotp"), {"passphrase": container.passphrase},
         'KeyPackage 2 (Key Id "A2")', "counter-based (HOTP)"),
        (document(user_id=False), {"passphrase": container.passphrase},
         'KeyPackage 2 (Key Id "A2")', "names no account"),
        (document(extra_data="<pskc:TimeDrift><pskc:PlainValue>2</pskc:PlainValue>"
                  "</pskc:TimeDrift>"), {"passphrase": container.passphrase},
         'KeyPackage 2 (Key Id "A2")', "TimeDrift"),
        # A ValueMAC that checks nothing is no MAC.
        (re.sub(rb"<pskc:ValueMAC>[^<]*", b"<pskc:ValueMAC>!!", document()),
         {"passphrase": container.passphrase}, 'KeyPackage 1 (Key Id "A1")', "no valid ValueMAC"),
        (document().replace(b'Length="6"', b'Length="0"'), {"passphrase": container.passphrase},
         'KeyPackage 1 (Key Id "A1")', "0 digits are not supported"),
        (re.sub(rb"<IterationCount>[0-9]+", b"<IterationCount>many", document()),
         {"passphrase": container.passphrase}, "KeyContainer", "malformed"),
        (document(), {}, "EncryptionKey/DerivedKey", "give the passphrase"),
        (document(), {"pre_shared_key": os.urandom(16)}, "EncryptionKey/DerivedKey",
         "give the passphrase"),
        (document().replace(b"</pskc:KeyContainer>", b"</pskc:KeyContainer"),
         {"passphrase": container.passphrase}, "line ", "not well-formed XML"),
    ]  # fmt: skip
    for content, opener, location, says in cases:
        failure = await refused(import_file(stub, admin, content, PSKC, **opener))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, says
        assert error_info(failure).metadata["location"].startswith(location), says
        assert says in (failure.details() or ""), failure.details()

    for name in names:
        assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED


async def test_xml_with_a_dtd_or_entities_is_refused_before_it_is_read(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    bomb = (
        b'<?xml version="1.0"?>\n<!DOCTYPE KeyContainer [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
        b'<KeyContainer xmlns="urn:ietf:params:xml:ns:keyprov:pskc">&b;</KeyContainer>'
    )
    external = (
        b'<?xml version="1.0"?>\n<!DOCTYPE KeyContainer [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'\n<KeyContainer xmlns="urn:ietf:params:xml:ns:keyprov:pskc">&x;</KeyContainer>'
    )

    for content in (bomb, external):
        failure = await refused(import_file(stub, admin, content, PSKC))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DTD" in (failure.details() or "")
        assert "root:" not in (failure.details() or "")


# --- The command line.


@pytest.fixture
def twofactor(database_url: str) -> Any:
    """`twofactor` as a subprocess (as tests/test_cli.py runs it), with bytes on stdin."""

    async def run(*args: str, stdin: bytes = b"", **env: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twofactor_service.cli",
            *args,
            env=cli_env(database_url, **env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate(stdin)
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())

    return run


async def test_cli_import_dry_run_then_import_of_otpauth_and_pskc_files(
    actors: Actors, stub: Stub, twofactor: Any, tmp_path: Path
) -> None:
    admin = await actors.admin()
    names = await accounts(actors, 3)
    seeds = [new_seed(names[0], digits=8), new_seed(names[1], period=60)]
    uris = tmp_path / "keys.txt"
    uris.write_bytes(otpauth_file(*(otpauth_uri(s) for s in seeds)))

    dry = await twofactor("import", str(uris), "--dry-run")

    assert dry.code == 0, dry.err
    assert f"line 1: {names[0]}: SHA1, 8 digits, 30 s (new key)" in dry.out
    assert "nothing was changed" in dry.out
    assert (await state_of(stub, admin, names[0])).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED

    done = await twofactor("import", str(uris), "--json")

    assert done.code == 0, done.err
    assert [(s["username"], s["digits"], s["period_seconds"]) for s in done.json()["secrets"]] == [
        (names[0], 8, 30),
        (names[1], 6, 60),
    ]
    for seed in seeds:
        assert (await signs_in_with(stub, actors, seed)).session.token

    # Again: the accounts have keys now.
    again = await twofactor("import", str(uris))
    assert again.code == 5
    assert "line 1" in again.err
    assert "--replace" in again.err

    # PSKC with a pre-shared key file (hex, as vendors send it) and a Key Id map.
    container = Container(pre_shared_key=os.urandom(16))
    pskc_seed = new_seed(names[2], algorithm="SHA256")
    (tmp_path / "seeds.pskcxml").write_bytes(
        pskc_file(container, key_package(container, pskc_seed, "T-1", user_id=False))
    )
    assert container.pre_shared_key is not None
    (tmp_path / "psk.hex").write_text(container.pre_shared_key.hex() + "\n")
    (tmp_path / "map.csv").write_text(f"# KeyId,username\nT-1,{names[2]}\n")

    pskc_run = await twofactor(
        "import",
        str(tmp_path / "seeds.pskcxml"),
        "--psk-file",
        str(tmp_path / "psk.hex"),
        "--key-map",
        str(tmp_path / "map.csv"),
    )

    assert pskc_run.code == 0, pskc_run.err
    assert "imported 1 keys (pskc)" in pskc_run.out
    assert (await signs_in_with(stub, actors, pskc_seed)).session.token
    events = await audit_events(stub, admin, target_username=names[2], operation="ImportSecrets")
    assert [(e.actor.startswith("cli:"), e.reason) for e in events] == [
        (True, 'IMPORTED pskc KeyPackage 1 (Key Id "T-1")')
    ]


async def test_cli_import_reads_a_passphrase_and_reports_errors_with_exit_codes(
    actors: Actors, stub: Stub, twofactor: Any, tmp_path: Path
) -> None:
    admin = await actors.admin()
    (name,) = await accounts(actors, 1)
    container = Container(passphrase="vendor passphrase")
    seed = new_seed(name, digits=8)
    seeds_file = tmp_path / "seeds.xml"
    seeds_file.write_bytes(pskc_file(container, key_package(container, seed, "P-1")))

    wrong = await twofactor(
        "import", str(seeds_file), "--passphrase", TWOFACTOR_IMPORT_PASSPHRASE="nope"
    )
    unknown = await twofactor(
        "import", "-", stdin=otpauth_file(otpauth_uri(new_seed(actors.name("nobody"))))
    )
    oversized = tmp_path / "big.txt"
    oversized.write_bytes(b"#" * (key_files.MAX_FILE_BYTES + 10))
    too_big = await twofactor("import", str(oversized))

    assert (wrong.code, unknown.code, too_big.code) == (2, 4, 2)
    assert 'KeyPackage 1 (Key Id "P-1")' in wrong.err
    assert "line 1" in unknown.err
    assert f"at most {key_files.MAX_FILE_BYTES}" in too_big.err
    assert (await state_of(stub, admin, name)).state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED

    done = await twofactor(
        "import", str(seeds_file), "--passphrase", TWOFACTOR_IMPORT_PASSPHRASE="vendor passphrase"
    )

    assert done.code == 0, done.err
    assert (await signs_in_with(stub, actors, seed)).session.token
