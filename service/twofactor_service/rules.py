"""The 2FA rules as plain functions over plain values: no I/O, no gRPC, no SQL.

Derived account state (SPEC §1), who may call what (SPEC §2, the seed page), lockout
arithmetic (RFC 4226 §7.3, NIST SP 800-63B §5.2.2) and input validation.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass

from twofactor_service.config import LockoutPolicy
from twofactor_service.errors import (
    InvalidArgument,
    MissingRight,
    RuleViolation,
    TwoFactorNotConfigured,
)

MAX_USERNAME_LENGTH = 256
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
MAX_ISSUER_LENGTH = 64
MAX_RIGHT_PART_LENGTH = 128

# The right that governs every administrative operation (seed page).
ADMIN_RIGHT = ("General features: User permissions", "MODIFY_OBJECT_ACLS")


class AccountKind(enum.Enum):
    INTERNAL = "INTERNAL"
    DOMAIN = "DOMAIN"


class TwoFactorState(enum.Enum):
    ENROLLED = "ENROLLED"
    ALLOWLISTED = "ALLOWLISTED"
    BLOCKED = "BLOCKED"
    EXCLUDED = "EXCLUDED"


def two_factor_state(*, has_active_key: bool, allowlisted: bool, excluded: bool) -> TwoFactorState:
    """SPEC §1: exclusion wins, then an active key, then the allowlist; otherwise blocked."""
    if excluded:
        return TwoFactorState.EXCLUDED
    if has_active_key:
        return TwoFactorState.ENROLLED
    if allowlisted:
        return TwoFactorState.ALLOWLISTED
    return TwoFactorState.BLOCKED


Right = tuple[str, str]


@dataclass(frozen=True)
class Actor:
    """The signed-in caller of an RPC, resolved from its session."""

    account_id: int
    username: str
    kind: AccountKind
    session_id: bytes
    # The session was opened with a code of an active key (not password alone).
    signed_in_with_two_factor: bool
    has_active_key: bool
    protected: bool
    rights: frozenset[Right]


@dataclass(frozen=True)
class MethodPolicy:
    """The access policy of one RPC, as declared in the proto's method options."""

    allow_anonymous: bool = False
    required_right: Right | None = None
    require_two_factor: bool = False
    allow_self_without_right: bool = False
    protects_target: bool = False
    # The accounts changed are named inside a payload the operation parses (ImportSecrets): it
    # asks for step-up proof when any of them is protected.
    protects_targets_in_payload: bool = False
    # The request field naming the target account, if any.
    target_field: str | None = None
    # The request message's full name, for the refusal of bytes that do not parse as it.
    request_type: str = ""

    @property
    def acts_on_caller(self) -> bool:
        """Self-service: signed in, no right needed and no account named (SignOut,
        ChangePassword, Begin/ConfirmRegenerateSecret)."""
        return not self.allow_anonymous and self.required_right is None and not self.target_field


def same_account(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def acted_on(policy: MethodPolicy, target: str, actor: Actor | None) -> str:
    """The account a call acts on, as the audit log records it: the account the request names,
    else the caller for the calls that act on their caller (or read its own status)."""
    if target or actor is None:
        return target
    if policy.acts_on_caller or policy.allow_self_without_right:
        return actor.username
    return ""


def authorize(actor: Actor, policy: MethodPolicy, target: str | None) -> None:
    """Raises unless `actor` may call an RPC with `policy` on `target` (seed: 2FA, then right)."""
    if policy.allow_self_without_right and (not target or same_account(target, actor.username)):
        return
    if policy.required_right is not None and policy.required_right not in actor.rights:
        area, permission = policy.required_right
        raise MissingRight(f"this operation needs the right {permission} in the area {area!r}")
    if policy.require_two_factor and not (actor.has_active_key and actor.signed_in_with_two_factor):
        raise TwoFactorNotConfigured()


def lockout_delay_seconds(consecutive_failures: int, policy: LockoutPolicy) -> int:
    """How long attempts are locked after this many consecutive failures.

    The first `free_failures - 1` cost nothing; the `free_failures`-th locks for
    `first_delay_seconds`, and each further one for twice as long, up to `max_delay_seconds`.
    So at most `free_failures - 1` failures in a row go without a lockout, far inside NIST SP
    800-63B's limit of 100. With the defaults (5, 30 s, 15 min) a guesser who waits out every
    lockout still gets 104 guesses in the first day and 96 a day after that
    (tests/test_lockout.py; docs/security.md).
    """
    over = consecutive_failures - policy.free_failures
    if over < 0:
        return 0
    # Bound the exponent so a huge count cannot build a huge integer.
    doubling: int = 2 ** min(over, 32)
    return min(policy.first_delay_seconds * doubling, policy.max_delay_seconds)


def lockout_schedule(policy: LockoutPolicy) -> list[int]:
    """Delays indexed by failure count (1-based in SQL), ending with the cap that applies beyond.

    SQL applies it atomically in the same statement that counts the failure.
    """
    schedule = []
    count = 1
    while True:
        delay = lockout_delay_seconds(count, policy)
        schedule.append(delay)
        if delay >= policy.max_delay_seconds:
            return schedule
        count += 1


# --- Input validation: every RPC checks its fields before anything is read or changed.


def validate_username(value: str, field: str = "username") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_USERNAME_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_USERNAME_LENGTH} characters")
    if value != value.strip():
        raise InvalidArgument(field, "must not start or end with white space")
    # Printable ASCII (most names) holds no such character; the per-character look is for the
    # rest.
    if not (value.isascii() and value.isprintable()) and any(
        unicodedata.category(ch).startswith("C") for ch in value
    ):
        raise InvalidArgument(field, "must not contain control or unassigned characters")
    return value


def validate_code_shape(value: str, field: str = "code") -> str:
    """A code whose key's digit count is not known yet: 6 to 8 ASCII digits."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not 6 <= len(value) <= 8 or not (value.isascii() and value.isdigit()):
        raise InvalidArgument(field, "must be 6 to 8 digits (0-9)")
    return value


def validate_password(value: str, field: str = "password") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_PASSWORD_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_PASSWORD_LENGTH} characters")
    return value


def validate_new_password(value: str, field: str = "password") -> str:
    validate_password(value, field)
    if len(value) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument(field, f"must be at least {MIN_PASSWORD_LENGTH} characters")
    return value


def validate_issuer(value: str) -> str:
    if not value or len(value) > MAX_ISSUER_LENGTH:
        raise InvalidArgument("issuer_name", f"must be 1 to {MAX_ISSUER_LENGTH} characters")
    if ":" in value or not value.isprintable():
        # The Key Uri Format separates issuer and account with a colon.
        raise InvalidArgument("issuer_name", "must be printable and must not contain ':'")
    return value


def validate_right(area: str, permission: str) -> Right:
    for field, value in (("right.functional_area", area), ("right.permission", permission)):
        if not value or len(value) > MAX_RIGHT_PART_LENGTH or not value.isprintable():
            raise InvalidArgument(
                field, f"must be 1 to {MAX_RIGHT_PART_LENGTH} printable characters"
            )
    return (area, permission)


def validate_page_size(value: int) -> int:
    if value < 0 or value > 1000:
        raise InvalidArgument("page_size", "must be between 0 and 1000 (0 means 100)")
    return value or 100


# --- Rules of the seed page for the administrative operations.


def check_reset_allowed(actor: Actor | None, target: str, *, excluded: bool) -> None:
    """`actor` None: the operator at the command line, who has no account of its own here."""
    if actor is not None and same_account(actor.username, target):
        raise RuleViolation(
            "OWN_KEY_RESET",
            "you cannot reset your own secret key; regenerate it with BeginRegenerateSecret",
        )
    if excluded:
        raise RuleViolation(
            "ACCOUNT_EXCLUDED",
            f"account {target!r} is on the exclusion list and has no key to reset",
        )


def check_delete_allowed(actor: Actor | None, target: str, *, kind: AccountKind) -> None:
    if actor is not None and same_account(actor.username, target):
        raise RuleViolation(
            "OWN_KEY_DELETE", "you cannot delete the secret key of your own account"
        )
    if kind is not AccountKind.INTERNAL:
        raise RuleViolation(
            "NOT_INTERNAL_ACCOUNT",
            f"account {target!r} is a domain account; only internal accounts' keys can be deleted",
        )


def check_exclusion_add_allowed(actor: Actor | None, target: str) -> None:
    """Excluding an account deletes its key; for one's own account that would be the deletion
    of one's own key that the seed forbids, and would drop one's own second factor."""
    if actor is not None and same_account(actor.username, target):
        raise RuleViolation(
            "OWN_ACCOUNT_EXCLUSION",
            "you cannot put your own account on the exclusion list; another administrator can",
        )


def check_allowlist_add_allowed(target: str, *, has_active_key: bool, excluded: bool) -> None:
    if excluded:
        raise RuleViolation(
            "ACCOUNT_EXCLUDED",
            f"account {target!r} is on the exclusion list; remove it from there first",
        )
    if has_active_key:
        raise RuleViolation(
            "ACCOUNT_HAS_KEY",
            f"account {target!r} already has a secret key; reset the key instead",
        )


def check_import_allowed(
    actor: Actor | None, target: str, *, has_active_key: bool, excluded: bool, replace: bool
) -> None:
    """O12: an imported key is an administrator's change of another account's key, as a reset
    is (so never one's own, nor an excluded account's), and it never overwrites a key unless
    the caller asked for that."""
    if actor is not None and same_account(actor.username, target):
        raise RuleViolation(
            "OWN_KEY_IMPORT",
            "you cannot import a key for your own account; regenerate it with "
            "BeginRegenerateSecret",
        )
    if excluded:
        raise RuleViolation(
            "ACCOUNT_EXCLUDED",
            f"account {target!r} is on the exclusion list (it signs in without 2FA); remove it "
            "from there first",
        )
    if has_active_key and not replace:
        raise RuleViolation(
            "ACCOUNT_HAS_KEY",
            f"account {target!r} already has a secret key; import with replace_existing_keys "
            "(--replace) to replace it",
        )
