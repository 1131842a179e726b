"""O7, the hot path: a backend that runs its own sign-in asks whether a code is valid."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twofactor_service import errors, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import check_code, count_failure
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, keys


class VerifyResult(enum.Enum):
    OK = "OK"
    FAILED = "FAILED"
    FAILED_MAX_ATTEMPTS = "FAILED_MAX_ATTEMPTS"


@dataclass(frozen=True)
class VerifyOutcome:
    result: VerifyResult
    retry_after_seconds: float = 0.0


async def verify_code(runtime: Runtime, caller: Caller, username: str, code: str) -> VerifyOutcome:
    rules.validate_username(username)
    rules.validate_code_shape(code)
    async with runtime.pool.acquire() as conn:
        target = await keys.verification_target(conn, accounts.username_key(username))
        if target is None:
            raise errors.AccountNotFound(username)
        if target.key is not None and len(code) != target.key.parameters.digits:
            raise errors.InvalidArgument(
                "code", f"must be exactly {target.key.parameters.digits} digits (0-9)"
            )
        if target.lock_remaining_seconds > 0:
            # Locked: the code is not even looked at (RFC 4226 §7.3).
            outcome = VerifyOutcome(VerifyResult.FAILED_MAX_ATTEMPTS, target.lock_remaining_seconds)
            reason = "TOO_MANY_FAILED_ATTEMPTS"
        elif target.key is not None and await check_code(runtime, conn, target.key, code):
            outcome, reason = VerifyOutcome(VerifyResult.OK), ""
            if target.failed_attempts:
                await accounts.clear_failures(conn, target.account_id)
        else:
            reason = "NO_ACTIVE_KEY" if target.key is None else "CODE_INVALID"
            await count_failure(runtime, conn, target.account_id)
            outcome = VerifyOutcome(VerifyResult.FAILED)
        await audit.append(
            conn,
            caller.audit(target.username, success=outcome.result is VerifyResult.OK, reason=reason),
        )
    return outcome
