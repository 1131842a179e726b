"""O7, the hot path: a backend that runs its own sign-in asks whether a code is valid."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twofactor_service import errors, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import CodeCheck, match_code
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, audit, code_attempts, keys


class VerifyResult(enum.Enum):
    OK = "OK"
    FAILED = "FAILED"
    FAILED_MAX_ATTEMPTS = "FAILED_MAX_ATTEMPTS"


@dataclass(frozen=True)
class VerifyOutcome:
    result: VerifyResult
    retry_after_seconds: float = 0.0
    # How the code fared, for the metrics; None while locked (the code was not looked at).
    check: CodeCheck | None = None


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
            await audit.append(
                conn,
                caller.audit(target.username, success=False, reason="TOO_MANY_FAILED_ATTEMPTS"),
            )
            return VerifyOutcome(VerifyResult.FAILED_MAX_ATTEMPTS, target.lock_remaining_seconds)
        key = target.key
        match = None if key is None else match_code(runtime, key, code)
        # The step used up and the audit event in one statement: one round trip, one commit.
        if (
            key is not None
            and match is not None
            and match.step is not None
            and await code_attempts.consume_step(
                conn, key.id, match.step, caller.audit(target.username)
            )
        ):
            if target.failed_attempts:
                await accounts.clear_failures(conn, target.account_id)
            return VerifyOutcome(VerifyResult.OK, check=CodeCheck.VALID)
        # A wrong code, no key, or a right code whose step was used before (also by another
        # call a moment ago, on any replica): a counted failure, audited in the same statement.
        replayed = match is not None and (match.step is not None or match.replayed)
        reason = "NO_ACTIVE_KEY" if key is None else "CODE_INVALID"
        await code_attempts.record_failure(
            conn,
            target.account_id,
            runtime.lockout_schedule,
            caller.audit(target.username, success=False, reason=reason),
        )
        return VerifyOutcome(
            VerifyResult.FAILED, check=CodeCheck.REPLAYED if replayed else CodeCheck.INVALID
        )
