"""Domain errors: each carries a gRPC status, a stable ErrorInfo reason and an actionable message.

One step of the call pipeline (transport/pipeline.py) turns them into a `google.rpc.Status`.
Messages never hold a secret, code, password or token.
"""

from __future__ import annotations

import grpc


class TwoFactorError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    reason: str = "FAILED_PRECONDITION"
    # Whether the pipeline's error step writes the refusal to the audit log: not where writing would
    # add to the very load or outage being reported (it is still logged and counted), nor where
    # the operation recorded it already (a failed attempt, with its settlement).
    audited: bool = True
    # Where in the request's payload the problem is (a line or an element of an import file),
    # sent as ErrorInfo metadata `location`; empty when the request has no such payload.
    location: str = ""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        # The reason the audit log records, where it may say more than the caller is told.
        self.audit_reason = ""

    @property
    def audited_reason(self) -> str:
        return self.audit_reason or self.reason


class InvalidArgument(TwoFactorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidKeyFile(InvalidArgument):
    """A file of keys to import (or one entry of it) cannot be imported as it is."""

    reason = "INVALID_KEY_FILE"

    def __init__(self, location: str, message: str) -> None:
        super().__init__("content", f"{location}: {message}" if location else message)
        self.location = location


class ImportRefused(TwoFactorError):
    """An entry of an import file names an account that cannot take the key (FAILED_PRECONDITION,
    or NOT_FOUND for an unknown account): the whole file is refused."""

    def __init__(self, location: str, reason: str, message: str) -> None:
        super().__init__(f"{location}: {message}")
        self.reason = reason
        self.location = location
        if reason == AccountNotFound.reason:
            self.code = grpc.StatusCode.NOT_FOUND


class AccountNotFound(TwoFactorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "ACCOUNT_NOT_FOUND"

    def __init__(self, username: str) -> None:
        super().__init__(f"no account named {username!r}")


class AccountExists(TwoFactorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ACCOUNT_EXISTS"

    def __init__(self, username: str) -> None:
        super().__init__(
            f"an account named {username!r} already exists (names are case-insensitive)"
        )


class Unauthenticated(TwoFactorError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class InvalidCredentials(Unauthenticated):
    reason = "INVALID_CREDENTIALS"

    def __init__(self, *, audit_reason: str = "") -> None:
        # One message for unknown account, wrong password and wrong code: no enumeration. The
        # audit log may tell more (RECOVERY_CODE_INVALID): administrators read it, guessers not.
        super().__init__("the username, password or code is wrong")
        self.audit_reason = audit_reason


class CodeRequired(Unauthenticated):
    reason = "CODE_REQUIRED"

    def __init__(self) -> None:
        super().__init__("this account has two-factor authentication: send the current code")


class PermissionDenied(TwoFactorError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class MissingRight(PermissionDenied):
    reason = "MISSING_RIGHT"


class TwoFactorNotConfigured(PermissionDenied):
    reason = "TWO_FACTOR_NOT_CONFIGURED"

    def __init__(self) -> None:
        super().__init__(
            "this operation needs an actor who has configured two-factor authentication "
            "and signed in with it; set up a key and sign in again"
        )


class StepUpRequired(TwoFactorError):
    reason = "STEP_UP_REQUIRED"

    def __init__(self, target: str) -> None:
        super().__init__(
            f"account {target!r} is protected against unauthorized modification: repeat the call "
            "with your own password (x-step-up-password) and a current code of your own key "
            "(x-step-up-code)"
        )


class StepUpFailed(PermissionDenied):
    reason = "STEP_UP_FAILED"

    def __init__(self) -> None:
        super().__init__("the account protection check failed: your password or code is wrong")


class TwoFactorKeyDeleted(TwoFactorError):
    reason = "TWO_FACTOR_KEY_DELETED"

    def __init__(self) -> None:
        super().__init__(
            "this account's two-factor secret key was deleted and it cannot sign in; "
            "an administrator must add it to the two-factor allowlist"
        )


class RuleViolation(TwoFactorError):
    """A request that is well-formed but breaks a rule of the seed (FAILED_PRECONDITION)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LockedOut(TwoFactorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_FAILED_ATTEMPTS"

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(
            "too many failed attempts: this account is locked for "
            f"{max(1, round(retry_after_seconds))} more seconds",
            retry_after_seconds=retry_after_seconds,
        )


class PasswordChecksBusy(TwoFactorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "PASSWORD_CHECKS_BUSY"
    audited = False

    def __init__(self) -> None:
        super().__init__(
            "too many password checks are running on this server; retry in a moment",
            retry_after_seconds=1.0,
        )


class MalformedRequest(TwoFactorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "MALFORMED_REQUEST"

    def __init__(self, message_type: str) -> None:
        super().__init__(f"the request body is not a valid {message_type} message")


class DuplicateMetadata(TwoFactorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "DUPLICATE_METADATA"

    def __init__(self, key: str) -> None:
        super().__init__(f"metadata {key!r} was sent more than once; send it once")


class Conflict(TwoFactorError):
    code = grpc.StatusCode.ABORTED
    reason = "CONCURRENT_MODIFICATION"

    def __init__(self) -> None:
        super().__init__("another change to the same account happened at the same time; retry")


class DatabaseUnavailable(TwoFactorError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"
    audited = False

    def __init__(self) -> None:
        super().__init__("the database is unavailable; retry shortly", retry_after_seconds=1.0)


class SecretUnreadable(TwoFactorError):
    """A stored secret failed to decrypt: its row was altered or copied, or its encryption key
    is no longer configured. Not the caller's fault, and retrying will not help."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "SECRET_UNREADABLE"

    def __init__(self) -> None:
        super().__init__(
            "this account's stored secret key cannot be read; an administrator must reset it"
        )
