"""Files of secret keys that accounts already hold (O12): otpauth:// URIs and PSKC (RFC 6030).

Plain functions from a file's bytes to the keys it declares, with no I/O. Every key keeps the
algorithm, digits and period its file declares; a parameter the service does not support is
refused with an error naming the line or the element, never changed. Secrets travel as
SecretKey, which never shows itself in a repr, log line or error.
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import defusedxml.ElementTree as SafeElementTree
from defusedxml import DefusedXmlException
from pskc import PSKC
from pskc.exceptions import PSKCError
from pskc.key import Key as PskcKey

from twofactor_service import rules
from twofactor_service.errors import InvalidArgument, InvalidKeyFile
from twofactor_service.totp import KeyParameters, SecretKey

# Bounds on what one import may ask of the server (docs/administration.md). A vendor's PSKC
# file takes about 1 KiB a key, so the largest file of MAX_KEYS keys fits; 4 MiB is also the
# most TWOFACTOR_MAX_MESSAGE_BYTES allows.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_KEYS = 1000
MAX_PBKDF2_ITERATIONS = 10_000_000
# RFC 4226 R6: a shared secret MUST be at least 128 bits; beyond 128 bytes (SHA-512's block)
# HMAC hashes the key first, so a longer one adds nothing.
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 128
# An empty or truncated ValueMAC would not be a check at all (HMAC-SHA1 gives 20 bytes).
MIN_MAC_BYTES = 16
# What the service can check (the same ranges as TWOFACTOR_TOTP_*).
ALGORITHMS = ("SHA1", "SHA256", "SHA512")
MIN_DIGITS, MAX_DIGITS = 6, 8
MIN_PERIOD_SECONDS, MAX_PERIOD_SECONDS = 15, 120
# RFC 6238 §4 and the Key Uri Format: what a key that declares nothing uses.
DEFAULT_PARAMETERS = KeyParameters("SHA1", 6, 30)


class KeyFileFormat(enum.Enum):
    OTPAUTH = "otpauth"
    PSKC = "pskc"


@dataclass(frozen=True)
class ImportedKey:
    """One key of a file: where it is, whose it is, and what it is."""

    location: str
    username: str
    secret: SecretKey
    parameters: KeyParameters

    def __repr__(self) -> str:
        return f"ImportedKey({self.location}, {self.username!r})"


@dataclass(frozen=True)
class PskcKeys:
    """How to open a PSKC container, and which account a key belongs to."""

    pre_shared_key: bytes = b""
    passphrase: str = ""
    # Key Id -> username, taking precedence over the key's UserId.
    key_accounts: Mapping[str, str] | None = None

    def __repr__(self) -> str:
        return "PskcKeys(<hidden>)"


def _check_size(content: bytes) -> None:
    if not content:
        raise InvalidArgument("content", "is empty: give the file's bytes")
    if len(content) > MAX_FILE_BYTES:
        raise InvalidArgument(
            "content",
            f"is {len(content)} bytes; at most {MAX_FILE_BYTES} per import (split the file)",
        )


def _check_count(count: int) -> None:
    if count > MAX_KEYS:
        raise InvalidArgument(
            "content", f"holds {count} keys; at most {MAX_KEYS} per import (split the file)"
        )


def _secret(raw: bytes, location: str) -> SecretKey:
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise InvalidKeyFile(
            location,
            f"the secret is {len(raw) * 8} bits; the service takes {MIN_SECRET_BYTES * 8} to "
            f"{MAX_SECRET_BYTES * 8} bits (RFC 4226 R6: at least 128). Such a key cannot be "
            "imported: reset the account so that it sets up a new key",
        )
    return SecretKey(raw)


def _parameters(algorithm: str, digits: int, period: int, location: str) -> KeyParameters:
    if algorithm not in ALGORITHMS:
        raise InvalidKeyFile(
            location, f"algorithm {algorithm!r} is not supported (SHA1, SHA256 or SHA512)"
        )
    if not MIN_DIGITS <= digits <= MAX_DIGITS:
        raise InvalidKeyFile(
            location, f"{digits} digits are not supported ({MIN_DIGITS} to {MAX_DIGITS})"
        )
    if not MIN_PERIOD_SECONDS <= period <= MAX_PERIOD_SECONDS:
        raise InvalidKeyFile(
            location,
            f"a period of {period} s is not supported ({MIN_PERIOD_SECONDS} to "
            f"{MAX_PERIOD_SECONDS} s)",
        )
    return KeyParameters(algorithm, digits, period)


def _username(value: str, location: str) -> str:
    try:
        return rules.validate_username(value, "account")
    except InvalidArgument as exc:
        raise InvalidKeyFile(location, exc.message) from None


def _refuse_duplicates(keys: list[ImportedKey]) -> None:
    seen: dict[str, str] = {}
    for key in keys:
        name = key.username.casefold()
        if name in seen:
            raise InvalidKeyFile(
                key.location,
                f"account {key.username!r} has a key at {seen[name]} already; one key per account",
            )
        seen[name] = key.location


# --- otpauth:// URIs (Key Uri Format), one per line.

# Parameters that only change how an app shows the key, not its codes.
_DISPLAY_PARAMETERS = frozenset({"issuer", "image", "color", "icon"})
_CODE_PARAMETERS = frozenset({"secret", "algorithm", "digits", "period"})
_WHOLE_NUMBER = re.compile(r"[0-9]{1,4}")


def _otpauth_number(params: dict[str, str], name: str, default: int, location: str) -> int:
    value = params.get(name)
    if value is None:
        return default
    if not _WHOLE_NUMBER.fullmatch(value):
        raise InvalidKeyFile(location, f"{name}={value[:16]!r} is not a whole number")
    return int(value)


def _base32_secret(value: str, location: str) -> SecretKey:
    text = value.strip().upper().rstrip("=")
    try:
        if not text or not re.fullmatch(r"[A-Z2-7]+", text):
            raise binascii.Error
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error:
        # Nothing of the value in the message: it is (most of) a secret.
        raise InvalidKeyFile(location, "the secret is not base32 (RFC 4648)") from None
    return _secret(raw, location)


def _otpauth_key(uri: str, location: str) -> ImportedKey:
    parts = urlsplit(uri)
    if parts.scheme.lower() != "otpauth":
        raise InvalidKeyFile(location, "is not an otpauth:// URI")
    kind = parts.netloc.lower()
    if kind == "hotp":
        raise InvalidKeyFile(
            location, "is a counter-based (HOTP) key; the service supports TOTP keys only"
        )
    if kind != "totp":
        raise InvalidKeyFile(location, f"has type {parts.netloc[:16]!r}; only totp is supported")
    label = unquote(parts.path.lstrip("/"), errors="strict")
    # Key Uri Format: the label is "issuer:account" (spaces may follow the colon) or "account".
    account = label.split(":", 1)[1].lstrip(" ") if ":" in label else label
    username = _username(account, location)
    params: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        name = name.lower()
        if name in params:
            raise InvalidKeyFile(location, f"gives the parameter {name!r} twice")
        if name not in _CODE_PARAMETERS | _DISPLAY_PARAMETERS:
            # An unknown parameter may change the codes (a counter, an offset): not guessed.
            raise InvalidKeyFile(location, f"has the parameter {name[:32]!r}, which is unknown")
        params[name] = value
    if "secret" not in params:
        raise InvalidKeyFile(location, "has no secret parameter")
    secret = _base32_secret(params["secret"], location)
    parameters = _parameters(
        params.get("algorithm", DEFAULT_PARAMETERS.algorithm).upper(),
        _otpauth_number(params, "digits", DEFAULT_PARAMETERS.digits, location),
        _otpauth_number(params, "period", DEFAULT_PARAMETERS.period_seconds, location),
        location,
    )
    return ImportedKey(location, username, secret, parameters)


def parse_otpauth(content: bytes) -> list[ImportedKey]:
    """The keys of a file of otpauth:// URIs, one per line; empty lines and lines starting
    with '#' are skipped."""
    _check_size(content)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise InvalidKeyFile(f"line {line}", "is not UTF-8") from None
    keys: list[ImportedKey] = []
    for number, text_line in enumerate(text.splitlines(), start=1):
        entry = text_line.strip()
        if not entry or entry.startswith("#"):
            continue
        _check_count(len(keys) + 1)
        try:
            keys.append(_otpauth_key(entry, f"line {number}"))
        except UnicodeDecodeError:
            raise InvalidKeyFile(f"line {number}", "has a label that is not UTF-8") from None
    if not keys:
        raise InvalidArgument("content", "holds no otpauth:// URI")
    _refuse_duplicates(keys)
    return keys


# --- PSKC (RFC 6030).

_PSKC = "{urn:ietf:params:xml:ns:keyprov:pskc}"
_TOTP_ALGORITHM = "urn:ietf:params:xml:ns:keyprov:pskc:totp"
_HOTP_ALGORITHM = "urn:ietf:params:xml:ns:keyprov:pskc:hotp"


def _safe_tree(content: bytes) -> ElementTree.Element:
    """The document, parsed by a parser that refuses DTDs, entities and external references
    (no XML bomb, no XXE) before the PSKC library reads it."""
    try:
        root: ElementTree.Element = SafeElementTree.fromstring(
            content, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException:
        raise InvalidKeyFile(
            "", "the document declares a DTD, entities or external references; refused"
        ) from None
    except ElementTree.ParseError as exc:
        line, column = exc.position
        raise InvalidKeyFile(f"line {line}, column {column}", "is not well-formed XML") from None
    if root.tag != f"{_PSKC}KeyContainer":
        raise InvalidKeyFile("", "is not a PSKC document (no KeyContainer, RFC 6030 §4)")
    return root


@dataclass(frozen=True)
class _KeyElement:
    """What the service reads from a Key element itself, rather than trusting a reader's
    leniency: where it is, what is wrong with it, and the numbers it declares."""

    location: str
    problem: str | None
    digits: int | None
    period: int | None


def _declared_number(text: str | None, what: str, location: str) -> int | None:
    if text is None:
        return None
    if not _WHOLE_NUMBER.fullmatch(text.strip()):
        raise InvalidKeyFile(location, f"{what} {text.strip()[:16]!r} is not a whole number")
    return int(text)


def _key_elements(root: ElementTree.Element) -> list[_KeyElement]:
    """Each Key in document order, with its location, the digits (ResponseFormat Length) and
    period (TimeInterval) it declares, and whether its encrypted secret carries the MAC that
    RFC 6030 §6.1.1 requires with CBC encryption, in a form that can be checked."""
    found = []
    for package_number, package in enumerate(root.iter(f"{_PSKC}KeyPackage"), start=1):
        for key in package.iter(f"{_PSKC}Key"):
            key_id = key.get("Id")
            location = f"KeyPackage {package_number}" + (
                f' (Key Id "{key_id[:64]}")' if key_id is not None else ""
            )
            problem = None
            secret = key.find(f"{_PSKC}Data/{_PSKC}Secret")
            if secret is not None and secret.find(f"{_PSKC}EncryptedValue") is not None:
                mac = secret.findtext(f"{_PSKC}ValueMAC")
                try:
                    mac_bytes = base64.b64decode((mac or "").strip(), validate=True)
                except binascii.Error:
                    mac_bytes = b""
                if len(mac_bytes) < MIN_MAC_BYTES:
                    problem = (
                        "its encrypted Secret has no valid ValueMAC (RFC 6030 §6.1.1 requires "
                        "one with CBC)"
                    )
            response = key.find(f"{_PSKC}AlgorithmParameters/{_PSKC}ResponseFormat")
            length = response.get("Length") if response is not None else None
            interval = key.findtext(f"{_PSKC}Data/{_PSKC}TimeInterval/{_PSKC}PlainValue")
            found.append(
                _KeyElement(
                    location,
                    problem,
                    _declared_number(length, "ResponseFormat Length", location),
                    _declared_number(interval, "TimeInterval", location),
                )
            )
    return found


def _first_declared(own: int | None, library: int | None, default: int) -> int:
    """A number as the element declares it (read here), else as the PSKC reader found it
    elsewhere (an older layout, an encrypted value), else the TOTP default."""
    if own is not None:
        return own
    return library if library is not None else default


def _hash_of_suite(suite: str | None, location: str) -> str:
    """AlgorithmParameters/Suite of a TOTP key: SHA1 when absent, as RFC 6238 §1.2 has it."""
    if not suite:
        return DEFAULT_PARAMETERS.algorithm
    name = suite.strip().upper().removeprefix("HMAC-").replace("-", "")
    if name not in ALGORITHMS:
        raise InvalidKeyFile(location, f"Suite {suite[:32]!r} is not supported (HMAC-SHA1, "
                             "HMAC-SHA256 or HMAC-SHA512)")  # fmt: skip
    return name


def _open_container(pskc: PSKC, keys: PskcKeys) -> None:
    """Sets the container's decryption key from the pre-shared key or the passphrase."""
    encryption = pskc.encryption
    derivation = encryption.derivation
    encrypted = bool(encryption.algorithm) or derivation.algorithm is not None
    if keys.pre_shared_key and keys.passphrase:
        raise InvalidArgument("passphrase", "give a pre-shared key or a passphrase, not both")
    if not encrypted:
        if keys.pre_shared_key or keys.passphrase:
            raise InvalidKeyFile(
                "EncryptionKey",
                "the container is not encrypted, but a pre-shared key or passphrase was given",
            )
        return
    if derivation.algorithm is not None:
        if not keys.passphrase:
            raise InvalidKeyFile(
                "EncryptionKey/DerivedKey",
                "the container is encrypted with a key derived from a passphrase (RFC 6030 "
                "§6.2): give the passphrase",
            )
        iterations = derivation.pbkdf2_iterations or 0
        if iterations > MAX_PBKDF2_ITERATIONS:
            raise InvalidKeyFile(
                "EncryptionKey/DerivedKey",
                f"IterationCount {iterations} is above the {MAX_PBKDF2_ITERATIONS} this "
                "service runs",
            )
        try:
            encryption.derive_key(keys.passphrase)
        except PSKCError as exc:
            raise InvalidKeyFile("EncryptionKey/DerivedKey", str(exc)) from None
        return
    if not keys.pre_shared_key:
        raise InvalidKeyFile(
            "EncryptionKey",
            "the container is encrypted with a pre-shared key (RFC 6030 §6.1): give that key",
        )
    encryption.key = keys.pre_shared_key


def _pskc_key(key: PskcKey, element: _KeyElement, keys: PskcKeys) -> ImportedKey:
    location = element.location
    algorithm = (key.algorithm or "").strip()
    if algorithm.lower() == _HOTP_ALGORITHM:
        raise InvalidKeyFile(
            location, "is a counter-based (HOTP) key; the service supports TOTP keys only"
        )
    if algorithm.lower() != _TOTP_ALGORITHM:
        raise InvalidKeyFile(
            location, f"has the Algorithm {algorithm[:80]!r}; only {_TOTP_ALGORITHM} is supported"
        )
    if key.response_encoding not in (None, "DECIMAL"):
        raise InvalidKeyFile(
            location, f"ResponseFormat Encoding {key.response_encoding!r} is not supported "
            "(DECIMAL)",
        )  # fmt: skip
    mapped = (keys.key_accounts or {}).get(key.id or "")
    account = mapped or key.userid
    if not account:
        raise InvalidKeyFile(
            location,
            "names no account: it has no UserId; map its Key Id to an account (key_accounts)",
        )
    username = _username(account, location)
    try:
        raw = key.secret
        period = _first_declared(
            element.period, key.time_interval, DEFAULT_PARAMETERS.period_seconds
        )
        offset = key.time_offset
        drift = key.time_drift
    except (PSKCError, ValueError):
        raise InvalidKeyFile(
            location,
            "cannot be decrypted: the pre-shared key or passphrase is wrong, or the MAC does "
            "not match",
        ) from None
    if not raw:
        raise InvalidKeyFile(location, "has no Data/Secret")
    if offset or drift:
        # The service has no per-key clock offset: codes would silently be off.
        raise InvalidKeyFile(
            location, "declares a Time offset or TimeDrift; the service supports neither"
        )
    parameters = _parameters(
        _hash_of_suite(key.algorithm_suite, location),
        _first_declared(element.digits, key.response_length, DEFAULT_PARAMETERS.digits),
        period,
        location,
    )
    return ImportedKey(location, username, _secret(raw, location), parameters)


def parse_pskc(content: bytes, keys: PskcKeys) -> list[ImportedKey]:
    """The keys of a PSKC document, decrypted with the pre-shared key or passphrase given.
    Runs PBKDF2 (hashlib, which releases the GIL): call it off the event loop."""
    _check_size(content)
    root = _safe_tree(content)
    _check_count(sum(1 for _ in root.iter(f"{_PSKC}Key")))
    elements = _key_elements(root)
    try:
        pskc = PSKC(io.BytesIO(content))
    except PSKCError as exc:
        raise InvalidKeyFile("KeyContainer", str(exc)) from None
    except ValueError:  # a malformed number or base64 value (binascii.Error too)
        # Not the reader's words: they may quote the value, and the value may be secret.
        raise InvalidKeyFile(
            "KeyContainer", "a number or base64 value in the document is malformed"
        ) from None
    if len(pskc.keys) != len(elements):
        raise InvalidKeyFile("KeyContainer", "the keys of the document could not be told apart")
    if not elements:
        raise InvalidKeyFile("KeyContainer", "holds no KeyPackage with a Key")
    _open_container(pskc, keys)
    wanted = set(keys.key_accounts or {})
    found = []
    for key, element in zip(pskc.keys, elements, strict=True):
        if element.problem is not None:
            raise InvalidKeyFile(element.location, element.problem)
        wanted.discard(key.id or "")
        found.append(_pskc_key(key, element, keys))
    if wanted:
        raise InvalidArgument(
            "key_accounts", f"names Key Id {sorted(wanted)[0][:64]!r}, which is not in the file"
        )
    _refuse_duplicates(found)
    return found


def parse(content: bytes, file_format: KeyFileFormat, keys: PskcKeys) -> list[ImportedKey]:
    if file_format is KeyFileFormat.OTPAUTH:
        if keys.pre_shared_key or keys.passphrase or keys.key_accounts:
            raise InvalidArgument(
                "format", "a pre-shared key, passphrase or key_accounts is for PSKC files only"
            )
        return parse_otpauth(content)
    return parse_pskc(content, keys)
