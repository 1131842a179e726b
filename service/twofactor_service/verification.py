"""O7, the hot path: a backend that runs its own sign-in asks whether a code is valid.

Each call pays for its attempt before its code is looked at, and settles it afterwards
(store/attempts.py). Calls that arrive together share the two round trips (group commit): the
first call of a batch schedules the batch for the next turn of the event loop, so every call
that arrives meanwhile joins it, and while `max_batches_in_flight` batches are at the database
new calls gather for the next one. One statement pays for the whole batch, the codes are
checked here, and one statement settles it and writes its audit events: a round trip and a
commit for many calls. Nothing is answered before the batch's settlement is committed.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twofactor_service import errors, rules
from twofactor_service.caller import Caller
from twofactor_service.code_checks import CodeCheck, match_code
from twofactor_service.runtime import Runtime
from twofactor_service.store import accounts, verifications
from twofactor_service.store.verifications import Attempt, Paid

if TYPE_CHECKING:
    from opentelemetry.trace import Span

# The most calls one statement carries.
MAX_BATCH = 256


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


@dataclass
class _Call:
    username_key: str
    username: str
    code: str
    caller: Caller
    answer: asyncio.Future[VerifyOutcome]
    # The call's span, for the batch's links (tracing on only).
    span: Span | None = None


async def verify_code(
    verifier: Verifier, caller: Caller, username: str, code: str
) -> VerifyOutcome:
    rules.validate_username(username)
    rules.validate_code_shape(code)
    return await verifier.verify(caller, username, code)


class Verifier:
    """The VerifyCode batches of one server."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_batches_in_flight: int,
        observe_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._runtime = runtime
        self._max_in_flight = max_batches_in_flight
        self._observe_batch = observe_batch
        self._tracing = runtime.tracing
        self._waiting: list[_Call] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def verify(self, caller: Caller, username: str, code: str) -> VerifyOutcome:
        answer: asyncio.Future[VerifyOutcome] = asyncio.get_running_loop().create_future()
        call = _Call(accounts.username_key(username), username, code, caller, answer)
        if self._tracing is not None:
            call.span = self._tracing.current_call()
        self._waiting.append(call)
        self._schedule()
        return await answer

    def _schedule(self) -> None:
        if self._scheduled or not self._waiting or self._in_flight >= self._max_in_flight:
            return
        # The task's first step runs on the event loop's next turn: every call that arrives
        # until then joins its batch.
        self._scheduled = True
        self._in_flight += 1
        task = asyncio.create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if task.cancelled():
            self._scheduled = False  # it may have been cancelled before its first step
        self._schedule()

    def _take_batch(self) -> list[_Call]:
        batch: dict[str, _Call] = {}
        later: list[_Call] = []
        for call in self._waiting:
            if call.answer.done():
                continue  # the caller went away before its attempt was paid for
            if call.username_key in batch or len(batch) >= MAX_BATCH:
                later.append(call)  # one statement updates an account once
            else:
                batch[call.username_key] = call
        self._waiting = later
        return list(batch.values())

    async def _run(self) -> None:
        self._scheduled = False
        batch = self._take_batch()
        if not batch:
            return
        self._observe_batch(len(batch))
        try:
            if self._tracing is None:
                outcomes = await self._verify_batch(batch)
            else:
                with self._tracing.verify_batch([call.span for call in batch if call.span]):
                    outcomes = await self._verify_batch(batch)
        except BaseException as exc:  # every waiting caller gets the failure
            for call in batch:
                if not call.answer.done():
                    call.answer.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for call, outcome in zip(batch, outcomes, strict=True):
            if call.answer.done():
                continue
            if isinstance(outcome, VerifyOutcome):
                call.answer.set_result(outcome)
            else:
                call.answer.set_exception(outcome)

    async def _verify_batch(
        self, batch: list[_Call]
    ) -> list[VerifyOutcome | errors.TwoFactorError]:
        runtime = self._runtime
        async with runtime.pool.acquire() as conn:
            paid = await verifications.pay(
                conn,
                [call.username_key for call in batch],
                [len(call.code) for call in batch],
                runtime.lockout_schedule,
            )
            looks = [self._look(call, paid.get(call.username_key)) for call in batch]
            attempts = [look.attempt for look in looks if look.attempt is not None]
            used_up = iter(
                await verifications.settle(conn, attempts, runtime.config.lockout.free_failures)
                if attempts
                else []
            )
        return [look.final(next(used_up) if look.attempt else False) for look in looks]

    def _look(self, call: _Call, paid: Paid | None) -> _Look:
        """What the call's code is worth, and the attempt to settle for it."""
        if paid is None:
            return _Look(None, errors.AccountNotFound(call.username))
        key = paid.key
        if key is not None and len(call.code) != key.parameters.digits:
            # Nothing was paid for a code of the wrong length (verifications.pay).
            message = f"must be exactly {key.parameters.digits} digits (0-9)"
            return _Look(None, errors.InvalidArgument("code", message))

        def attempt(reason: str, step: int | None = None) -> Attempt:
            event = call.caller.audit(paid.username, success=False, reason=reason)
            return Attempt(paid.account_id, paid.paid, key.id if key else None, step, event)

        if not paid.paid:
            # Locked: the code is not even looked at (RFC 4226 §7.3).
            locked = VerifyOutcome(
                VerifyResult.FAILED_MAX_ATTEMPTS, max(paid.lock_remaining_seconds, 1.0)
            )
            return _Look(attempt("TOO_MANY_FAILED_ATTEMPTS"), locked)
        if key is None:
            return _Look(attempt("NO_ACTIVE_KEY"), _failed(CodeCheck.INVALID))
        match = match_code(self._runtime, key, call.code)
        if match.step is None:
            check = CodeCheck.REPLAYED if match.replayed else CodeCheck.INVALID
            return _Look(attempt("CODE_INVALID"), _failed(check))
        # Accepted if the settlement uses the step up; else another call, on any replica, used
        # it a moment ago, and the attempt is recorded as failed with this reason.
        return _Look(attempt("CODE_INVALID", match.step), None)


@dataclass(frozen=True)
class _Look:
    # What the settlement records (None: bad input, nothing to record).
    attempt: Attempt | None
    # The answer; None when it depends on the settlement (the code matched a step).
    answer: VerifyOutcome | errors.TwoFactorError | None

    def final(self, used_up: bool) -> VerifyOutcome | errors.TwoFactorError:
        if self.answer is not None:
            return self.answer
        if used_up:
            return VerifyOutcome(VerifyResult.OK, check=CodeCheck.VALID)
        return _failed(CodeCheck.REPLAYED)


def _failed(check: CodeCheck) -> VerifyOutcome:
    return VerifyOutcome(VerifyResult.FAILED, check=check)
