"""Audit events as syslog messages for a SIEM: RFC 5424 with the event in structured data, or
ArcSight's Common Event Format (CEF) in the message, each framed by octet counting (RFC 6587
section 3.4.1, the framing RFC 5425 prescribes for TLS too).

What goes out is what the audit row holds (store/audit.py: names, operation names, ErrorInfo
reasons, the peer and the request id), never a secret, code, password or token. Still, every
text field is cleaned and bounded here: control characters are written as `\\xNN` (so no value
can end a line or forge a field), each value is cut at `MAX_VALUE_BYTES`, and each format's
own special characters are escaped.

Hand-written: the maintained Python syslog packages are `logging` handlers with blocking
sockets of their own, which cannot tell the exporter when the receiver took a message; the
formats themselves are a few lines each.
"""

from __future__ import annotations

import re
from datetime import UTC
from importlib import metadata

from twofactor_service.store.audit_chain import ChainRow

# The SD-ID of the event's structured data (RFC 5424 section 6.3.2: name@<private enterprise
# number>). The project has no enterprise number of its own; 32473 is the one RFC 5612 reserves
# for documentation and examples, so it can never clash with a registered one.
SD_ID = "twofactor@32473"
# Facility 10, security/authorization (authpriv), where SIEM feeds of sign-in and credential
# events are usually routed (RFC 5424 section 6.2.1).
FACILITY = 10
# Severities: a success is a notice (5), a failure a warning (4).
SEVERITY = {"SUCCESS": 5, "FAILURE": 4}
# CEF severities (0-10).
CEF_SEVERITY = {"SUCCESS": 3, "FAILURE": 6}
# A value's longest UTF-8 encoding; past it the value is cut and ends with "...".
MAX_VALUE_BYTES = 256
# RFC 5424's BOM: the MSG part is UTF-8 (section 6.4).
BOM = "\ufeff"
NIL = "-"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SD_SPECIAL = re.compile(r'(["\\\]])')

try:
    _VERSION = metadata.version("twofactor-service")
except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    _VERSION = "0"


def clean(text: str, limit: int = MAX_VALUE_BYTES) -> str:
    """`text` without control characters (each written as \\xNN), at most `limit` bytes of
    UTF-8."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def _header_token(text: str, longest: int) -> str:
    """A header field (MSGID): printable US-ASCII without spaces, else the NILVALUE."""
    token = "".join(c for c in text if 33 <= ord(c) <= 126)[:longest]
    return token or NIL


def _timestamp(row: ChainRow) -> str:
    # RFC 5424 section 6.2.3: RFC 3339, here in UTC with microseconds.
    return row.occurred_at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fields(row: ChainRow) -> list[tuple[str, str]]:
    """The event's fields in the order both formats write them; the chain's position only once
    the event is sealed."""
    fields = [
        ("actor", row.actor),
        ("target", row.target),
        ("operation", row.operation),
        ("outcome", row.outcome),
        ("reason", row.reason),
        ("peer", row.peer),
        ("requestId", row.request_id),
        ("sequence", str(row.sequence)),
    ]
    if row.chain_position is not None and row.chain_hash is not None:
        fields.append(("chainPosition", str(row.chain_position)))
        fields.append(("chainHash", row.chain_hash.hex()))
    return fields


def _sd_value(text: str) -> str:
    # RFC 5424 section 6.3.3: '"', '\' and ']' are escaped with a backslash.
    return _SD_SPECIAL.sub(r"\\\1", clean(text))


def _header(row: ChainRow, app_name: str, hostname: str) -> str:
    priority = FACILITY * 8 + SEVERITY.get(row.outcome, 4)
    msgid = _header_token(row.operation, 32)
    return f"<{priority}>1 {_timestamp(row)} {hostname} {app_name} {NIL} {msgid}"


def rfc5424(row: ChainRow, app_name: str, hostname: str) -> bytes:
    """One RFC 5424 message: the event in the structured data element `SD_ID`, and a line for
    people in the MSG."""
    params = " ".join(f'{name}="{_sd_value(value)}"' for name, value in _fields(row))
    text = f"{clean(row.operation)} by {clean(row.actor)} on {clean(row.target)}: {row.outcome}"
    if row.reason:
        text += f" ({clean(row.reason)})"
    message = f"{_header(row, app_name, hostname)} [{SD_ID} {params}] {BOM}{text}"
    return message.encode("utf-8")


def _cef_header(text: str) -> str:
    # CEF header fields: '\' and '|' are escaped with a backslash.
    return clean(text).replace("\\", "\\\\").replace("|", "\\|")


def _cef_value(text: str) -> str:
    # CEF extension values: '\' and '=' are escaped; line breaks as \n and \r (cleaned already).
    return (
        clean(text)
        .replace("\\", "\\\\")
        .replace("=", "\\=")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )


def cef(row: ChainRow, app_name: str, hostname: str) -> bytes:
    """One syslog message (RFC 5424 header, no structured data) whose MSG is a CEF:0 event,
    with the standard keys where CEF has them and labelled custom ones for the rest."""
    epoch_ms = int(row.occurred_at.timestamp() * 1000)
    extension: list[tuple[str, str]] = [
        ("rt", str(epoch_ms)),
        ("suser", row.actor),
        ("duser", row.target),
        ("act", row.operation),
        ("outcome", row.outcome),
        ("reason", row.reason),
        ("externalId", str(row.sequence)),
        ("cs1Label", "peer"),
        ("cs1", row.peer),
        ("cs2Label", "requestId"),
        ("cs2", row.request_id),
    ]
    if row.chain_position is not None and row.chain_hash is not None:
        extension += [
            ("cn1Label", "chainPosition"),
            ("cn1", str(row.chain_position)),
            ("cs3Label", "chainHash"),
            ("cs3", row.chain_hash.hex()),
        ]
    header = "|".join(
        (
            "CEF:0",
            "TwoFactorService",
            "TwoFactorService",
            _cef_header(_VERSION),
            _cef_header(row.operation),
            _cef_header(f"{row.operation} {row.outcome}"),
            str(CEF_SEVERITY.get(row.outcome, 6)),
        )
    )
    body = " ".join(f"{key}={_cef_value(value)}" for key, value in extension)
    return f"{_header(row, app_name, hostname)} {NIL} {header}|{body}".encode()


FORMATS = {"rfc5424": rfc5424, "cef": cef}


def frame(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 octet counting: the length in decimal, a space, the message."""
    return b"%d %s" % (len(message), message)
