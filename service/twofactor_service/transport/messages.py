"""Conversions between the domain's plain values and the twofactor.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from twofactor.v1 import enums_pb2, options_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from twofactor_service.code_checks import PendingKeyView
from twofactor_service.errors import InvalidArgument
from twofactor_service.key_files import KeyFileFormat
from twofactor_service.key_import import PlannedKey
from twofactor_service.rules import AccountKind, TwoFactorState
from twofactor_service.sign_in import OpenedSession, SignInResult
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.audit import AuditRow

_STATES = {
    TwoFactorState.ENROLLED: enums_pb2.TWO_FACTOR_STATE_ENROLLED,
    TwoFactorState.ALLOWLISTED: enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED,
    TwoFactorState.BLOCKED: enums_pb2.TWO_FACTOR_STATE_BLOCKED,
    TwoFactorState.EXCLUDED: enums_pb2.TWO_FACTOR_STATE_EXCLUDED,
}
_KINDS = {
    AccountKind.INTERNAL: enums_pb2.ACCOUNT_KIND_INTERNAL,
    AccountKind.DOMAIN: enums_pb2.ACCOUNT_KIND_DOMAIN,
}


def account_kind(value: int) -> AccountKind | None:
    for kind, number in _KINDS.items():
        if number == value:
            return kind
    return None


# The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799


def request_time(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request's Timestamp as a datetime; one outside the Timestamp range is bad input."""
    if not (
        _MIN_TIMESTAMP_SECONDS <= value.seconds <= _MAX_TIMESTAMP_SECONDS
        and 0 <= value.nanos <= 999_999_999
    ):
        raise InvalidArgument(
            field, "must be a valid timestamp from 0001-01-01 to 9999-12-31 (nanos 0 to 999999999)"
        )
    return value.ToDatetime(tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def account_status(record: AccountRecord) -> pb.AccountStatus:
    status = pb.AccountStatus(
        username=record.username,
        kind=_KINDS[record.kind],
        state=_STATES[record.state],
        has_pending_key=record.has_pending_key,
        allowlisted=record.allowlisted,
        excluded=record.excluded,
        protected=record.protected,
        consecutive_failures=record.failed_attempts,
        rights=[options_pb2.Right(functional_area=a, permission=p) for a, p in record.rights],
        recovery_codes_remaining=record.recovery_codes_remaining,
    )
    if record.key_created_at is not None:
        status.key_create_time.FromDatetime(record.key_created_at)
    if record.locked_until is not None and record.locked_until > datetime.now(
        record.locked_until.tzinfo
    ):
        status.locked_until.FromDatetime(record.locked_until)
    return status


def pending_key(view: PendingKeyView) -> pb.PendingKey:
    return pb.PendingKey(
        secret_base32=view.secret.base32(),
        provisioning_uri=view.provisioning_uri,
        qr_code_png=view.qr_png,
        qr_code_svg=view.qr_svg,
        expire_time=timestamp(view.expires_at),
        algorithm=view.parameters.algorithm,
        digits=view.parameters.digits,
        period_seconds=view.parameters.period_seconds,
    )


def session(opened: OpenedSession) -> pb.Session:
    return pb.Session(token=opened.token, expire_time=timestamp(opened.expires_at))


def sign_in_fields(result: SignInResult) -> dict[str, object]:
    """The fields shared by SignInResponse and SignInDomainAccountResponse."""
    if isinstance(result, OpenedSession):
        return {"outcome": enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED, "session": session(result)}
    return {
        "outcome": enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED,
        "enrollment": pb.Enrollment(
            enrollment_ticket=result.ticket, pending_key=pending_key(result.pending_key)
        ),
    }


def audit_event(row: AuditRow) -> pb.AuditEvent:
    return pb.AuditEvent(
        sequence=row.sequence,
        time=timestamp(row.occurred_at),
        actor=row.actor,
        target=row.target,
        operation=row.operation,
        outcome=enums_pb2.AUDIT_OUTCOME_SUCCESS
        if row.outcome == "SUCCESS"
        else enums_pb2.AUDIT_OUTCOME_FAILURE,
        reason=row.reason,
        request_id=row.request_id,
        peer=row.peer,
    )


_IMPORT_FORMATS = {
    enums_pb2.IMPORT_FORMAT_OTPAUTH: KeyFileFormat.OTPAUTH,
    enums_pb2.IMPORT_FORMAT_PSKC: KeyFileFormat.PSKC,
}


def import_format(value: int) -> KeyFileFormat | None:
    for number, file_format in _IMPORT_FORMATS.items():
        if number == value:
            return file_format
    return None


def imported_secret(entry: PlannedKey) -> pb.ImportedSecret:
    return pb.ImportedSecret(
        location=entry.location,
        username=entry.username,
        algorithm=entry.parameters.algorithm,
        digits=entry.parameters.digits,
        period_seconds=entry.parameters.period_seconds,
        replaces_existing_key=entry.replaces_existing_key,
        protected=entry.protected,
    )
