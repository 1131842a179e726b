"""The seed page's key operations: regenerate one's own key (begin, "Check and apply"), reset
another account's key, delete another account's key."""

from __future__ import annotations

import asyncio

from twofactor_service import rules, totp
from twofactor_service.caller import Caller
from twofactor_service.code_checks import (
    SECRET_PURPOSE,
    PendingKeyView,
    check_code,
    pay,
    settled,
)
from twofactor_service.errors import AccountNotFound, RuleViolation
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, keys, recovery_codes, sessions, settings
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.database import Connection


async def make_pending_key(
    runtime: Runtime, conn: Connection, account_id: int, username: str
) -> tuple[int, PendingKeyView]:
    """A new pending key for the account (replacing any earlier pending one), with its
    provisioning URI and QR codes. The issuer is read now: a changed issuer name applies to
    keys made afterwards only."""
    params = runtime.config.totp
    parameters = totp.KeyParameters(params.algorithm, params.digits, params.period_seconds)
    secret = totp.new_secret(params)
    sealed = runtime.key_ring.seal(secret, account_id=account_id, purpose=SECRET_PURPOSE)
    key_id, expires_at = await keys.put_pending(
        conn, account_id, sealed, parameters, runtime.config.pending_key_ttl_seconds
    )
    issuer = await settings.issuer_name(conn, runtime.config.issuer_name)
    uri = totp.provisioning_uri(secret, parameters, username=username, issuer=issuer)
    # QR rendering is CPU work; keep it off the event loop.
    png, svg = await asyncio.gather(
        asyncio.to_thread(totp.qr_png, uri), asyncio.to_thread(totp.qr_svg, uri)
    )
    return key_id, PendingKeyView(secret, parameters, uri, png, svg, expires_at)


async def begin_regenerate(runtime: Runtime, caller: Caller) -> PendingKeyView:
    """Seed, own account, step 1: a new pending key; the old key stays active until confirmed."""
    actor = caller.signed_in()
    async with runtime.pool.acquire() as conn, conn.transaction():
        _, view = await make_pending_key(runtime, conn, actor.account_id, actor.username)
        await audit.append(conn, caller.audit(actor.username))
    return view


async def confirm_regenerate(runtime: Runtime, caller: Caller, code: str) -> AccountRecord:
    """Seed, own account, "Check and apply": a code of the pending key swaps it in, atomically."""
    actor = caller.signed_in()
    rules.validate_code_shape(code)
    async with runtime.pool.acquire() as conn:
        pending = await keys.pending(conn, actor.account_id)
        if pending is None:
            raise RuleViolation(
                "NO_PENDING_KEY",
                "there is no pending key: it expired (after "
                f"{runtime.config.pending_key_ttl_seconds // 60} minutes) or was never made; "
                "begin again",
            )
        ticket = await pay(runtime, conn, actor.account_id)
    async with (
        settled(runtime, caller, actor.username, ticket) as attempt,
        runtime.pool.acquire() as conn,
    ):
        if not await check_code(runtime, conn, pending, code):
            raise RuleViolation(
                "CODE_INVALID",
                "the code does not match the new key (or was already used); your old key "
                "still works. Check the authenticator app's clock and try the next code",
            )
        async with conn.transaction():
            # The account row first, as a reset or delete takes it: racing them, one waits.
            await accounts.lock_by_id(conn, actor.account_id)
            if not await keys.activate_pending(conn, pending.id):
                raise RuleViolation(
                    "NO_PENDING_KEY", "the pending key expired meanwhile; begin again"
                )
            await attempt.succeed(conn)
            await audit.append(conn, caller.audit(actor.username))
            return await accounts.find_by_id(conn, actor.account_id)


async def _locked_target(conn: Connection, username: str) -> AccountRecord:
    account = await accounts.lock(conn, username)
    if account is None:
        raise AccountNotFound(username)
    return account


async def reset_secret(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    """Seed: the existing key is deleted and the account is added to the allowlist; at the next
    sign-in it sets up a new key. One transaction, sessions ended, audited."""
    actor = caller.actor  # None for the operator's `twofactor reset-key`
    rules.validate_username(username)
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        rules.check_reset_allowed(actor, target.username, excluded=target.excluded)
        await keys.delete_all(conn, target.id)
        # Recovery codes stand in for the key's codes: they go with it.
        await recovery_codes.void(conn, target.id)
        await accounts.set_lists(conn, target.id, allowlisted=True, excluded=False)
        await sessions.end_all(conn, target.id)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)


async def delete_secret(runtime: Runtime, caller: Caller, username: str) -> AccountRecord:
    """Seed: deleting the key completely blocks the user from signing in, until an
    administrator adds it to the allowlist again."""
    actor = caller.actor  # None for the operator's `twofactor delete-key`
    rules.validate_username(username)
    async with runtime.pool.acquire() as conn, conn.transaction():
        target = await _locked_target(conn, username)
        rules.check_delete_allowed(actor, target.username, kind=target.kind)
        await keys.delete_all(conn, target.id)
        await recovery_codes.void(conn, target.id)
        await accounts.set_lists(conn, target.id, allowlisted=False, excluded=target.excluded)
        await sessions.end_all(conn, target.id)
        await audit.append(conn, caller.audit(target.username))
        return await accounts.find_by_id(conn, target.id)
