"""Importing the keys accounts already hold (O12): an administrator gives existing accounts the
secrets of another system's otpauth:// URIs or of a token vendor's PSKC file.

A file is applied atomically, in one transaction: every key of it, or none. What an imported
key gets is what an enrolled key gets: encrypted at rest with the account bound in, an active
key with the parameters it declares, the account off the allowlist (ENROLLED), and an audit
event per account (never the secret). Like a reset, it is an administrator's change of another
account's key: the same right, never one's own account, step-up proof when any account of the
file is protected, and the account's sessions and recovery codes end (neither may outlive the
key they were opened or made beside).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from twofactor_service import errors, key_files, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import SECRET_PURPOSE
from twofactor_service.key_files import ImportedKey, KeyFileFormat, PskcKeys
from twofactor_service.rules import Actor
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, keys, recovery_codes, sessions
from twofactor_service.store.accounts import AccountRecord, username_key
from twofactor_service.totp import KeyParameters


@dataclass(frozen=True)
class ImportRequest:
    file_format: KeyFileFormat | None
    content: bytes
    validate_only: bool = False
    replace_existing_keys: bool = False
    pskc: PskcKeys = field(default_factory=PskcKeys)

    def __repr__(self) -> str:
        return f"ImportRequest({self.file_format}, {len(self.content)} bytes)"


@dataclass(frozen=True)
class PlannedKey:
    """What the import does (or, validating only, would do) with one key of the file."""

    location: str
    username: str
    parameters: KeyParameters
    replaces_existing_key: bool
    protected: bool


@dataclass(frozen=True)
class ImportReport:
    keys: list[PlannedKey]
    validate_only: bool


def _plan(
    actor: Actor | None,
    imported: list[ImportedKey],
    found: dict[str, AccountRecord],
    *,
    replace: bool,
) -> list[PlannedKey]:
    """Checks every key against its account's state; the first refusal refuses the file."""
    planned = []
    for key in imported:
        account = found.get(username_key(key.username))
        if account is None:
            raise errors.ImportRefused(
                key.location,
                errors.AccountNotFound.reason,
                f"no account named {key.username!r}; create it first (CreateAccount, "
                "`twofactor create-user`)",
            )
        try:
            rules.check_import_allowed(
                actor,
                account.username,
                has_active_key=account.has_active_key,
                excluded=account.excluded,
                replace=replace,
            )
        except errors.RuleViolation as exc:
            raise errors.ImportRefused(key.location, exc.reason, exc.message) from None
        planned.append(
            PlannedKey(
                key.location,
                account.username,
                key.parameters,
                replaces_existing_key=account.has_active_key,
                protected=account.protected,
            )
        )
    return planned


def _first_protected(planned: list[PlannedKey]) -> str | None:
    return next((entry.username for entry in planned if entry.protected), None)


async def import_secrets(runtime: Runtime, caller: Caller, request: ImportRequest) -> ImportReport:
    if request.file_format is None:
        raise errors.InvalidArgument(
            "format", "is required: IMPORT_FORMAT_OTPAUTH or IMPORT_FORMAT_PSKC"
        )
    # Parsing, decryption and PBKDF2 are CPU work: off the event loop.
    imported = await asyncio.to_thread(
        key_files.parse, request.content, request.file_format, request.pskc
    )
    names = [key.username for key in imported]
    async with runtime.pool.acquire() as conn:
        found = await accounts.find_many(conn, names)
    planned = _plan(caller.actor, imported, found, replace=request.replace_existing_keys)
    if request.validate_only:
        return ImportReport(planned, validate_only=True)

    # Account protection: one proof for the call, when any account of the file is protected.
    # The operator at the command line (no actor) holds the database and needs none.
    proven = False
    protected = _first_protected(planned)
    if protected is not None and caller.actor is not None:
        if caller.prove_step_up is None:
            raise errors.StepUpRequired(protected)
        await caller.prove_step_up(protected)
        proven = True

    async with runtime.pool.acquire() as conn, conn.transaction():
        locked = await accounts.lock_many(conn, names)
        # Again under the locks: a change since the read above (a key set up, an account
        # protected or excluded) is seen here, and refuses the file as it would have then.
        planned = _plan(caller.actor, imported, locked, replace=request.replace_existing_keys)
        protected = _first_protected(planned)
        if protected is not None and caller.actor is not None and not proven:
            raise errors.StepUpRequired(protected)
        targets = [locked[username_key(key.username)] for key in imported]
        account_ids = [target.id for target in targets]
        await keys.replace_with_active(
            conn,
            [
                (
                    target.id,
                    runtime.key_ring.seal(key.secret, account_id=target.id, purpose=SECRET_PURPOSE),
                    key.parameters,
                )
                for target, key in zip(targets, imported, strict=True)
            ],
        )
        await accounts.leave_lists(conn, account_ids)
        await sessions.end_all_of(conn, account_ids)
        # Recovery codes belong to the key they were made beside: a replaced key's go with it,
        # as a reset voids them.
        await recovery_codes.void_all_of(conn, account_ids)
        await audit.append_many(
            conn,
            [
                caller.audit(
                    entry.username,
                    reason=f"{'REPLACED' if entry.replaces_existing_key else 'IMPORTED'} "
                    f"{request.file_format.value} {entry.location}",
                )
                for entry in planned
            ],
        )
    return ImportReport(planned, validate_only=False)
