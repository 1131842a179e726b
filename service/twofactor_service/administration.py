"""Administration (O5, O8, O10): the 2FA allowlist and the exclusion list, account status,
accounts and their rights, and the server settings."""

from __future__ import annotations

import base64
import binascii

from twofactor_service import errors, rules
from twofactor_service.caller import Caller
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, keys, recovery_codes, sessions, settings
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.database import Connection


async def _locked_target(conn: Connection, username: str) -> AccountRecord:
    rules.validate_username(username)
    account = await accounts.lock(conn, username)
    if account is None:
        raise errors.AccountNotFound(username)
    return account


async def add_to_allowlist(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    """Seed: restore access; at its next sign-in the account sets up a new key."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        rules.check_allowlist_add_allowed(
            target.username, has_active_key=target.has_active_key, excluded=target.excluded
        )
        await accounts.set_lists(conn, target.id, allowlisted=True, excluded=False)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)


async def remove_from_allowlist(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        if target.has_active_key:
            raise errors.RuleViolation(
                "ACCOUNT_HAS_KEY",
                f"account {target.username!r} has set up its key and is no longer on the "
                "allowlist; delete or reset its key instead",
            )
        await accounts.set_lists(conn, target.id, allowlisted=False, excluded=target.excluded)
        # An enrollment already started must not complete once the account is off the list.
        await keys.delete_all(conn, target.id)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)


async def add_to_exclusion_list(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    """The account signs in with its password alone; its keys are deleted."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        rules.check_exclusion_add_allowed(caller.actor, target.username)
        await keys.delete_all(conn, target.id)
        await recovery_codes.void(conn, target.id)
        await accounts.set_lists(conn, target.id, allowlisted=False, excluded=True)
        await sessions.end_all(conn, target.id)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)


async def remove_from_exclusion_list(
    runtime: Runtime, caller: Caller, username: str
) -> AccountRecord:
    """The account needs 2FA again: it is BLOCKED until someone allowlists it."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        if not target.excluded:
            # Otherwise an allowlisted account would silently be blocked, and an enrolled
            # one's sessions ended, by a call that was about a list it is not on.
            raise errors.RuleViolation(
                "ACCOUNT_NOT_EXCLUDED", f"account {target.username!r} is not on the exclusion list"
            )
        await accounts.set_lists(conn, target.id, allowlisted=False, excluded=False)
        # Its sessions were opened with a password alone.
        await sessions.end_all(conn, target.id)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    after: str | None
    try:
        after = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        after = None
    # Tokens hold a casefolded username, which never holds NUL (nor can PostgreSQL text).
    if after is None or "\x00" in after:
        raise errors.InvalidArgument(
            "page_token", "is not a token this server returned; start again without it"
        )
    return after


def _encode_page_token(username_key: str) -> str:
    return base64.urlsafe_b64encode(username_key.encode("utf-8")).decode("ascii")


async def list_members(
    runtime: Runtime, column: str, page_size: int, page_token: str
) -> tuple[list[AccountRecord], str]:
    """One page of the allowlist ("allowlisted") or the exclusion list ("excluded")."""
    limit = rules.validate_page_size(page_size)
    after = _decode_page_token(page_token)
    async with runtime.pool.acquire() as conn:
        found = await accounts.list_members(conn, column, after=after, limit=limit + 1)
    next_token = (
        _encode_page_token(accounts.username_key(found[limit - 1].username))
        if len(found) > limit
        else ""
    )
    return found[:limit], next_token


async def list_accounts(
    runtime: Runtime, username_prefix: str, page_size: int, page_token: str
) -> tuple[list[AccountRecord], str]:
    """One page of the accounts whose username starts with `username_prefix` (the Users tab)."""
    if len(username_prefix) > rules.MAX_USERNAME_LENGTH or "\x00" in username_prefix:
        raise errors.InvalidArgument(
            "username_prefix",
            f"must be at most {rules.MAX_USERNAME_LENGTH} characters, without NUL",
        )
    limit = rules.validate_page_size(page_size)
    after = _decode_page_token(page_token)
    async with runtime.pool.acquire() as conn:
        found = await accounts.list_accounts(
            conn, prefix=accounts.username_key(username_prefix), after=after, limit=limit + 1
        )
    next_token = (
        _encode_page_token(accounts.username_key(found[limit - 1].username))
        if len(found) > limit
        else ""
    )
    return found[:limit], next_token


async def account_status(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    # No username: the caller's own status (the operator's `twofactor status` always names one).
    username = username or caller.signed_in().username
    rules.validate_username(username)
    async with runtime.pool.acquire() as conn:
        account = await accounts.find(conn, username)
    if account is None:
        raise errors.AccountNotFound(username)
    return account


async def create_account(
    runtime: Runtime,
    caller: Caller,
    *,
    username: str,
    kind: AccountKind | None,
    password: str,
    protected: bool,
    excluded: bool,
) -> AccountRecord:
    rules.validate_username(username)
    if kind is None:
        raise errors.InvalidArgument("kind", "must be ACCOUNT_KIND_INTERNAL or ACCOUNT_KIND_DOMAIN")
    if kind is AccountKind.INTERNAL:
        rules.validate_new_password(password)
        password_hash: str | None = await runtime.password_checks.hash(password)
    else:
        if password:
            raise errors.InvalidArgument(
                "password", "must be empty for a domain account (its directory holds it)"
            )
        password_hash = None
    async with runtime.pool.acquire() as conn, conn.transaction():
        account_id = await accounts.create(
            conn,
            username=username,
            kind=kind,
            password_hash=password_hash,
            protected=protected,
            excluded=excluded,
        )
        if account_id is None:
            raise errors.AccountExists(username)
        await audit.append(conn, caller.audit(username))
        return await accounts.find_by_id(conn, account_id)


async def set_protection(
    runtime: Runtime, caller: Caller, username: str, protected: bool
) -> AccountRecord:
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        await accounts.set_protected(conn, target.id, protected)
        await audit.append(
            conn, caller.audit(target.username, reason="PROTECTED" if protected else "UNPROTECTED")
        )
        return await accounts.find_by_id(conn, target.id)


async def change_right(
    runtime: Runtime, caller: Caller, username: str, right: rules.Right, *, grant: bool
) -> AccountRecord:
    rules.validate_right(*right)
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        if grant:
            await accounts.grant(conn, target.id, right)
        else:
            await accounts.revoke(conn, target.id, right)
        # The right itself is no secret; naming it makes the audit log useful.
        await audit.append(conn, caller.audit(target.username, reason=f"{right[0]}/{right[1]}"))
        return await accounts.find_by_id(conn, target.id)


async def issuer_name(runtime: Runtime) -> str:
    async with runtime.pool.acquire() as conn:
        return await settings.issuer_name(conn, runtime.config.issuer_name)


async def set_issuer_name(runtime: Runtime, caller: Caller, issuer: str) -> str:
    """Applies to keys made from now on; existing keys keep the issuer they were shown with."""
    rules.validate_issuer(issuer)
    async with runtime.pool.acquire() as conn, conn.transaction():
        await settings.set_issuer_name(conn, issuer)
        await audit.append(conn, caller.audit(""))
    return issuer
