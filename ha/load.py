"""Mixed load on the replicas that records every answer, and knows what each answer should be.

Workers (half on each replica) keep calling, at a steady offered rate or as fast as they are
answered, with a deadline on every call:
- VerifyCode with a valid code of a time step never tried before for that key (a seeded
  account's), with a wrong code, or with the code of a step already accepted (a replay, which
  must fail);
- SignIn with password and code (a step never tried before), which opens a session;
- reset/allowlist cycles by an administrator on accounts of their own, each account walking
  ENROLLED -> ResetSecret -> ALLOWLISTED -> (SignIn + CompleteEnrollment) -> ENROLLED ->
  DeleteSecret -> BLOCKED -> AddToAllowlist -> ALLOWLISTED -> RemoveFromAllowlist -> BLOCKED
  -> AddToAllowlist -> ... and checking every answer against that model.

An answer is *acknowledged* when the call ended OK. An UNAVAILABLE call may or may not have
taken effect: the account's state is read again before its next change, a step so tried is
never tried again with a valid code, and a possibly counted failure is counted. Whether an
UNAVAILABLE happened only during a failover is judged afterwards (failover_test.py), from the
times recorded here.

Every call carries an `x-request-id`, which the service writes into its audit event: the
acknowledged calls' ids are what failover_test.py looks for in the audit log on the new primary.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import pyotp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

PERIOD = 30
DIGITS = 6
CALL_DEADLINE_SECONDS = 10.0
UNAVAILABLE_PAUSE_SECONDS = 0.1
# Consecutive failures an account may have before a valid code clears them: below the
# service's LOCKOUT_FREE_FAILURES (5), counting possibly counted ones, so load never locks.
FAILURE_BUDGET = 2
# Operations whose every call (accepted or refused) writes an audit event in its transaction.
AUDITED = frozenset(
    {
        "VerifyCode",
        "SignIn",
        "CompleteEnrollment",
        "ResetSecret",
        "DeleteSecret",
        "AddToAllowlist",
        "RemoveFromAllowlist",
    }
)
STATE = enums_pb2.TwoFactorState
State: TypeAlias = enums_pb2.TwoFactorState.ValueType


def step_now() -> int:
    return int(time.time() // PERIOD)


def code_at(secret: bytes, step: int) -> str:
    """The code of time step `step` (RFC 6238: SHA-1, 6 digits), as an authenticator app makes
    it: with pyotp, not the service's own code."""
    return pyotp.HOTP(base64.b32encode(secret).decode("ascii"), digits=DIGITS).at(step)


def secret_from_base32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


@dataclass(frozen=True)
class Outcome:
    """One call and its answer, as the client saw it (times: time.monotonic())."""

    replica: str
    operation: str
    account: str
    request_id: str
    started: float
    ended: float
    code: grpc.StatusCode
    reason: str = ""
    retry_delay: int | None = None

    @property
    def acknowledged(self) -> bool:
        return self.code == grpc.StatusCode.OK


@dataclass(eq=False)
class CodeAccount:
    """An enrolled account whose key the load knows (a seeded one)."""

    username: str
    secret: bytes
    # The lowest step never tried with a valid code of this key.
    next_step: int = 0
    # Consecutive failures since the last acknowledged success, counting possible ones.
    failures: int = 0
    busy: bool = False

    def take_step(self) -> int | None:
        """A step never tried, valid now (the current one or the next: the ±1 window)."""
        now = step_now()
        step = max(now, self.next_step)
        if step > now + 1:
            return None
        self.next_step = step + 1
        return step


@dataclass(eq=False)
class CycleAccount:
    """An account an administrator keeps resetting, deleting and allowlisting."""

    username: str
    password: str
    state: State  # as last acknowledged
    # The secret of the active key (ENROLLED) and the lowest step never tried with it.
    secret: bytes | None = None
    next_step: int = 0
    # After an unacknowledged change: read the state before the next change, which must be
    # one of these.
    uncertain: bool = False
    candidates: tuple[State, ...] = ()
    moves: int = 0
    busy: bool = False


@dataclass
class Acceptance:
    """A valid code the service accepted (acknowledged OK)."""

    key: bytes  # the secret: one key's steps
    account: str
    step: int
    outcome: Outcome


@dataclass
class Record:
    """Everything the load saw and what it concluded."""

    outcomes: list[Outcome] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    # (key, step) -> acknowledged acceptances: more than one is a step accepted twice.
    acceptances: dict[tuple[bytes, int], list[Acceptance]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    # Seeded account -> the newest step acknowledged as used (by VerifyCode or SignIn).
    newest_step: dict[str, int] = field(default_factory=dict)
    # Sessions acknowledged to seeded accounts (never ended by the load): (username, token,
    # when acknowledged).
    sessions: list[tuple[str, str, float]] = field(default_factory=list)
    # Replays of accepted codes, all refused: (accepted at, replayed at).
    replays: list[tuple[float, float]] = field(default_factory=list)

    def violation(self, outcome: Outcome | None, message: str) -> None:
        where = (
            f" [{outcome.operation} {outcome.account} on {outcome.replica},"
            f" request {outcome.request_id}]"
            if outcome
            else ""
        )
        self.violations.append(message + where)


class Load:
    def __init__(
        self,
        stubs: dict[str, pb_grpc.TwoFactorServiceAsyncStub],
        verifier_token: str,
        admin_token: str,
        code_accounts: list[CodeAccount],
        cycle_accounts: list[CycleAccount],
        *,
        workers_per_replica: int = 12,
        rate: float | None = None,
        seed: int = 11,
    ) -> None:
        self.stubs = stubs
        self.verifier = (("authorization", f"Bearer {verifier_token}"),)
        self.admin = (("authorization", f"Bearer {admin_token}"),)
        self.ready: collections.deque[CodeAccount] = collections.deque(code_accounts)
        self.code_accounts = code_accounts
        self.cycle_accounts = cycle_accounts
        self.record = Record()
        # Accepted codes not replayed yet: (account, step, accepted at).
        self.replayable: collections.deque[tuple[CodeAccount, int, float]] = collections.deque()
        self.workers_per_replica = workers_per_replica
        # Operations per second offered by all workers together (None: as fast as answered).
        self.rate = rate
        self.random = random.Random(seed)  # noqa: S311 - load shape, not security
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # Replica -> start of its first acknowledged call since `mark()`.
        self.since = 0.0
        self.back: dict[str, float] = {}
        # Times a worker found nothing to send (the load, not the service, held back).
        self.starved = 0

    def mark(self) -> None:
        """From now on, note each replica's first acknowledged call (in `back`)."""
        self.since, self.back = time.monotonic(), {}

    # --- running

    def start(self) -> None:
        for replica in self.stubs:
            for _ in range(self.workers_per_replica):
                self.tasks.append(asyncio.create_task(self._worker(replica)))

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def _worker(self, replica: str) -> None:
        operations: list[tuple[Callable[[str], Awaitable[bool]], int]] = [
            (self.verify_valid, 70),
            (self.verify_wrong, 8),
            (self.verify_replay, 8),
            (self.sign_in, 2),
            (self.cycle, 12),
        ]
        functions = [f for f, _ in operations]
        weights = [w for _, w in operations]
        workers = self.workers_per_replica * len(self.stubs)
        interval = workers / self.rate if self.rate else 0.0
        # Spread the workers' first operations over one interval.
        next_at = time.monotonic() + self.random.uniform(0, interval)
        while not self.stopping.is_set():
            if interval:
                # Paced, without catching up after slow calls: a steady offered load rather
                # than whatever a shared machine lets through. A worker that fell behind (an
                # outage) restarts at a random phase, so the workers do not march in step.
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                if next_at < time.monotonic():
                    next_at = time.monotonic() + self.random.uniform(0, interval)
            operation = self.random.choices(functions, weights)[0]
            if not await operation(replica) and not await self.verify_valid(replica):
                # No account with an unused step at hand: wait for the clock, briefly.
                self.starved += 1
                await asyncio.sleep(0.02)

    async def call(
        self,
        replica: str,
        operation: str,
        account: str,
        invoke: Callable[[tuple[tuple[str, str], ...], float], Awaitable[Any]],
        metadata: tuple[tuple[str, str], ...] = (),
        allowed: frozenset[grpc.StatusCode] = frozenset(),
    ) -> tuple[Any, Outcome]:
        """One call with a fresh request id; records its outcome. A status other than OK,
        UNAVAILABLE or `allowed` is a violation at once (INTERNAL, UNKNOWN, a deadline...)."""
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        response = None
        reason, retry = "", None
        try:
            response = await invoke(
                (*metadata, ("x-request-id", request_id)), CALL_DEADLINE_SECONDS
            )
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
            reason, retry = _details(error)
        outcome = Outcome(
            replica, operation, account, request_id, started, time.monotonic(), code, reason, retry
        )
        self.record.outcomes.append(outcome)
        if code == grpc.StatusCode.OK:
            if started >= self.since:
                self.back.setdefault(replica, started)
        elif code == grpc.StatusCode.UNAVAILABLE:
            # A client waits before retrying (RetryInfo says 1 s; a short pause here, so the
            # moment the service is back is seen within 0.1 s).
            await asyncio.sleep(UNAVAILABLE_PAUSE_SECONDS)
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE) and code not in allowed:
            self.record.violation(outcome, f"status {code.name} ({reason or 'no reason'})")
        return response, outcome

    # --- VerifyCode and SignIn on seeded accounts

    def _idle_account(self, with_step: bool) -> tuple[CodeAccount, int | None] | None:
        """An account no call is using now (marked busy until `_release`), with a step never
        tried when `with_step`, or with failures to spare."""
        for _ in range(min(len(self.ready), 32)):
            account = self.ready.popleft()
            if account.busy:  # a replay probe has it
                self.ready.append(account)
                continue
            if with_step:
                step = account.take_step()
                if step is None:  # both steps of the window used (or tried, in an outage)
                    self.ready.append(account)
                    continue
                account.busy = True
                return account, step
            if account.failures < FAILURE_BUDGET:
                account.busy = True
                return account, None
            self.ready.append(account)
        return None

    def _release(self, account: CodeAccount) -> None:
        account.busy = False
        self.ready.append(account)

    def accept(self, account: CodeAccount, step: int, outcome: Outcome) -> None:
        key = (account.secret, step)
        acceptance = Acceptance(account.secret, account.username, step, outcome)
        self.record.acceptances[key].append(acceptance)
        if len(self.record.acceptances[key]) > 1:
            self.record.violation(outcome, f"time step {step} accepted twice")
        newest = self.record.newest_step.get(account.username, -1)
        self.record.newest_step[account.username] = max(newest, step)

    async def verify_valid(self, replica: str) -> bool:
        found = self._idle_account(with_step=True)
        if found is None:
            return False
        account, step = found
        assert step is not None
        try:
            response, outcome = await self.verify_code(
                replica, account, code_at(account.secret, step)
            )
            if response is None:
                account.failures += 1  # unknown: it may have counted, if it was refused
                return True
            if response.result == enums_pb2.VERIFY_CODE_RESULT_OK:
                account.failures = 0
                self.accept(account, step, outcome)
                self.replayable.append((account, step, outcome.ended))
            else:
                self.record.violation(
                    outcome, f"valid code of an unused step {step} refused: {response.result}"
                )
        finally:
            self._release(account)
        return True

    async def verify_wrong(self, replica: str) -> bool:
        found = self._idle_account(with_step=False)
        if found is None:
            return False
        account, _ = found
        now = step_now()
        valid = {code_at(account.secret, s) for s in range(now - 2, now + 3)}
        wrong = code_at(account.secret, now + 1000)
        while wrong in valid:
            wrong = f"{self.random.randrange(10**DIGITS):0{DIGITS}d}"
        try:
            account.failures += 1
            response, outcome = await self.verify_code(replica, account, wrong)
            if response is not None and response.result != enums_pb2.VERIFY_CODE_RESULT_FAILED:
                self.record.violation(outcome, f"wrong code answered {response.result}")
        finally:
            self._release(account)
        return True

    async def verify_replay(self, replica: str) -> bool:
        """The code of a step accepted before: must fail (SPEC §4), also on the other replica
        and across a failover."""
        while self.replayable:
            account, step, accepted_at = self.replayable.popleft()
            if step < step_now() - 1:
                continue  # out of the window: refused anyway, proves nothing
            if account.busy or account.failures >= FAILURE_BUDGET:
                self.replayable.append((account, step, accepted_at))
                return False
            account.busy = True  # stays in `ready`, skipped there while busy
            try:
                await self.replay(replica, account, step, accepted_at)
                return True
            finally:
                account.busy = False
        return False

    async def replay(
        self, replica: str, account: CodeAccount, step: int, accepted_at: float
    ) -> bool:
        """Sends the code of `step` again; True when it was refused (acknowledged FAILED)."""
        account.failures += 1
        response, outcome = await self.verify_code(replica, account, code_at(account.secret, step))
        if response is None:
            return False
        if response.result == enums_pb2.VERIFY_CODE_RESULT_OK:
            self.accept(account, step, outcome)
        elif response.result == enums_pb2.VERIFY_CODE_RESULT_FAILED:
            self.record.replays.append((accepted_at, outcome.ended))
            return True
        else:
            self.record.violation(outcome, f"replayed code answered {response.result}")
        return False

    async def verify_code(
        self, replica: str, account: CodeAccount, code: str
    ) -> tuple[Any, Outcome]:
        stub = self.stubs[replica]
        request = pb.VerifyCodeRequest(username=account.username, code=code)
        return await self.call(
            replica,
            "VerifyCode",
            account.username,
            lambda metadata, timeout: stub.VerifyCode(request, metadata=metadata, timeout=timeout),
            self.verifier,
        )

    async def sign_in(self, replica: str) -> bool:
        found = self._idle_account(with_step=True)
        if found is None:
            return False
        account, step = found
        assert step is not None
        stub = self.stubs[replica]
        request = pb.SignInRequest(
            username=account.username,
            password=PASSWORD,
            code=code_at(account.secret, step),
        )
        try:
            response, outcome = await self.call(
                replica,
                "SignIn",
                account.username,
                lambda metadata, timeout: stub.SignIn(request, metadata=metadata, timeout=timeout),
            )
            if response is None:
                account.failures += 1
            elif response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED:
                self.accept(account, step, outcome)
                self.record.sessions.append(
                    (account.username, response.session.token, outcome.ended)
                )
            else:
                self.record.violation(outcome, f"sign-in answered {response.outcome}")
        finally:
            self._release(account)
        return True

    # --- reset/allowlist cycles

    async def cycle(self, replica: str) -> bool:
        idle = [a for a in self.cycle_accounts if not a.busy]
        if not idle:
            return False
        account = self.random.choice(idle)
        account.busy = True
        try:
            if account.uncertain:
                await self._read_state(replica, account)
            elif account.state == STATE.TWO_FACTOR_STATE_ENROLLED:
                if account.moves % 2 == 0:
                    await self._admin_change(
                        replica, account, "ResetSecret", STATE.TWO_FACTOR_STATE_ALLOWLISTED
                    )
                else:
                    await self._admin_change(
                        replica, account, "DeleteSecret", STATE.TWO_FACTOR_STATE_BLOCKED
                    )
            elif account.state == STATE.TWO_FACTOR_STATE_BLOCKED:
                await self._admin_change(
                    replica, account, "AddToAllowlist", STATE.TWO_FACTOR_STATE_ALLOWLISTED
                )
            elif account.state == STATE.TWO_FACTOR_STATE_ALLOWLISTED:
                if account.moves % 3 == 1:
                    await self._admin_change(
                        replica, account, "RemoveFromAllowlist", STATE.TWO_FACTOR_STATE_BLOCKED
                    )
                else:
                    await self._enroll(replica, account)
        finally:
            account.busy = False
        return True

    async def _admin_change(
        self, replica: str, account: CycleAccount, operation: str, after: State
    ) -> None:
        stub = self.stubs[replica]
        requests: dict[str, Callable[[tuple[tuple[str, str], ...], float], Awaitable[Any]]] = {
            "ResetSecret": lambda m, t: stub.ResetSecret(
                pb.ResetSecretRequest(username=account.username), metadata=m, timeout=t
            ),
            "DeleteSecret": lambda m, t: stub.DeleteSecret(
                pb.DeleteSecretRequest(username=account.username), metadata=m, timeout=t
            ),
            "AddToAllowlist": lambda m, t: stub.AddToAllowlist(
                pb.AddToAllowlistRequest(username=account.username), metadata=m, timeout=t
            ),
            "RemoveFromAllowlist": lambda m, t: stub.RemoveFromAllowlist(
                pb.RemoveFromAllowlistRequest(username=account.username), metadata=m, timeout=t
            ),
        }
        before = account.state
        response, outcome = await self.call(
            replica, operation, account.username, requests[operation], self.admin
        )
        account.moves += 1
        if response is None:
            account.uncertain, account.candidates = True, (before, after)
            return
        state = response.status.state
        if state != after:
            self.record.violation(
                outcome, f"{STATE.Name(before)} account after {operation}: {STATE.Name(state)}"
            )
        account.state = state
        if state != STATE.TWO_FACTOR_STATE_ENROLLED:
            account.secret = None

    async def _enroll(self, replica: str, account: CycleAccount) -> None:
        """The account's owner signs in, gets a pending key and confirms it with a code."""
        stub = self.stubs[replica]
        request = pb.SignInRequest(username=account.username, password=account.password)
        response, outcome = await self.call(
            replica,
            "SignIn",
            account.username,
            lambda m, t: stub.SignIn(request, metadata=m, timeout=t),
        )
        if response is None:
            account.uncertain, account.candidates = True, (account.state,)
            return
        if response.outcome != enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED:
            self.record.violation(outcome, f"ALLOWLISTED account signed in: {response.outcome}")
            account.uncertain, account.candidates = True, (account.state,)
            return
        secret = secret_from_base32(response.enrollment.pending_key.secret_base32)
        step = step_now()
        confirm = pb.CompleteEnrollmentRequest(
            enrollment_ticket=response.enrollment.enrollment_ticket, code=code_at(secret, step)
        )
        done, outcome = await self.call(
            replica,
            "CompleteEnrollment",
            account.username,
            lambda m, t: stub.CompleteEnrollment(confirm, metadata=m, timeout=t),
        )
        account.moves += 1
        if done is None:
            account.uncertain = True
            account.candidates = (account.state, STATE.TWO_FACTOR_STATE_ENROLLED)
            account.secret, account.next_step = secret, step + 1
            return
        if done.session.token == "":
            self.record.violation(outcome, "enrollment confirmed without a session")
        self.record.acceptances[(secret, step)].append(
            Acceptance(secret, account.username, step, outcome)
        )
        account.state = STATE.TWO_FACTOR_STATE_ENROLLED
        account.secret, account.next_step = secret, step + 1

    async def _read_state(self, replica: str, account: CycleAccount) -> None:
        """After an unacknowledged change: the state now must be the one before or after it."""
        stub = self.stubs[replica]
        request = pb.GetAccountStatusRequest(username=account.username)
        response, outcome = await self.call(
            replica,
            "GetAccountStatus",
            account.username,
            lambda m, t: stub.GetAccountStatus(request, metadata=m, timeout=t),
            self.admin,
        )
        if response is None:
            return
        state = response.status.state
        if state not in account.candidates:
            self.record.violation(
                outcome,
                f"state {STATE.Name(state)} after an unacknowledged change; expected one of "
                + ", ".join(STATE.Name(s) for s in account.candidates),
            )
        account.state = state
        account.uncertain = False
        if state != STATE.TWO_FACTOR_STATE_ENROLLED:
            account.secret = None


# The seeded accounts' password (throw-away accounts of a test cluster).
PASSWORD = "ha load password, never a real one"  # noqa: S105


def _details(error: grpc.aio.AioRpcError) -> tuple[str, int | None]:
    """The ErrorInfo reason and the RetryInfo delay (seconds) of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason, retry = "", None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            delay = error_details_pb2.RetryInfo()
            detail.Unpack(delay)
            retry = delay.retry_delay.seconds
    return reason, retry
