"""The load generator: one process of grpc.aio clients keeping a fixed number of calls in flight
against one target, a warm-up, then a fixed measured window. It prints one JSON document.

Started as a separate process by bench/run.py (several of them when BENCH_CLIENTS > 1, each
with its own share of the concurrency and of the accounts). The same code drives the bare echo
server and TwoFactorService, so the two are measured alike.

Codes are honest: every VerifyCode/SignIn carries a code computed here for a time step the
server has not seen for that account (see CodeSource), or a deliberately wrong code whose
expected answer is known. Anything else the server answers is an unexpected outcome, which
makes the bench fail; an error is never counted as a success.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed import PERIOD_SECONDS, BenchAccounts, code_at

VERIFY_METHOD = "/twofactor.v1.TwoFactorService/VerifyCode"
SIGN_IN_METHOD = "/twofactor.v1.TwoFactorService/SignIn"
ECHO_METHOD = "/bench.v1.Echo/Echo"

OK = enums_pb2.VERIFY_CODE_RESULT_OK
FAILED = enums_pb2.VERIFY_CODE_RESULT_FAILED
LOCKED = enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS


class CodeSource:
    """Hands out (account, time step) pairs the server accepts exactly once.

    The replay rule: a step is accepted once per account, and never one older than the newest
    accepted. With a ±1 step window, steps current-1, current and current+1 are usable, in that
    order; then the account waits for the next step. Each account has at most one call in
    flight (a later step overtaking an earlier one would make the earlier one a replay).
    current-1 is skipped near a step boundary, where the server may already be one step on.
    """

    def __init__(
        self, spec: BenchAccounts, names: list[str], margin_seconds: float, after_step: int
    ) -> None:
        self.names = names
        self.secrets = [spec.secret(n) for n in names]
        # Steps up to `after_step` may have been used before this run (BENCH_TARGET).
        self.last_step = [after_step] * len(names)
        self.idle: collections.deque[int] = collections.deque(range(len(names)))
        self.spent: list[int] = []
        self.spent_at = 0
        self.margin = margin_seconds
        self.starved = 0

    def take(self, now: float) -> tuple[int, int] | None:
        current = int(now // PERIOD_SECONDS)
        if self.spent and current > self.spent_at:
            self.idle.extend(self.spent)
            self.spent.clear()
        to_boundary = PERIOD_SECONDS - now % PERIOD_SECONDS
        oldest = current - 1 if to_boundary > self.margin else current
        while self.idle:
            index = self.idle.popleft()
            step = max(self.last_step[index] + 1, oldest)
            if step <= current + 1:
                self.last_step[index] = step
                return index, step
            self.spent.append(index)
            self.spent_at = current
        self.starved += 1
        return None

    def peek_usable(self, now: float) -> int | None:
        """An idle account that has a usable step, without using it (for a wrong code that a
        valid one follows)."""
        if not self.idle:
            return None
        index = self.idle[0]
        current = int(now // PERIOD_SECONDS)
        if self.last_step[index] + 1 > current + 1:
            return None
        return self.idle.popleft()

    def give_back(self, index: int, *, first: bool = False) -> None:
        if first:
            self.idle.appendleft(index)
        else:
            self.idle.append(index)


def wrong_code(secret: bytes, now: float, rng: random.Random) -> str:
    """A 6-digit code that matches none of the steps the server could accept now."""
    current = int(now // PERIOD_SECONDS)
    valid = {code_at(secret, s) for s in range(current - 2, current + 3)}
    while True:
        code = f"{rng.randrange(10**6):06d}"
        if code not in valid:
            return code


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    # Unexpected outcomes during the warm-up or after the window: they fail the run too.
    unexpected_outside: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class Call:
    method: str
    request: bytes
    # What the outcome must be: "OK", "FAILED" (wrong code), "FAILED_OR_LOCKED" (an account
    # that only ever gets wrong codes), "SESSION_OPENED", "ECHO".
    expect: str
    account: int | None = None
    owed_success: bool = False


class Workload:
    """Builds the next call for the chosen kind of load."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kind = args.kind
        self.rng = random.Random(args.seed)  # noqa: S311 - load shaping, not security
        self.wrong_share = args.wrong_share if self.kind == "verify" else 0.0
        self.lockout_share = args.lockout_share
        spec = BenchAccounts.load(Path(args.accounts))
        self.spec = spec
        mine = [spec.user(i) for i in range(args.part, spec.users, args.parts)]
        self.codes = CodeSource(spec, mine, args.margin, args.after_step)
        self.lockout_names = [
            BenchAccounts.lockout_user(i) for i in range(args.part, spec.lockout_users, args.parts)
        ]
        self.lockout_secrets = [spec.secret(n) for n in self.lockout_names]
        self.owed: set[int] = set()
        self.metadata: tuple[tuple[str, str], ...] = ()
        if self.kind in ("verify", "echo"):
            # The echo carries the same metadata, so both servers read the same bytes.
            self.metadata = (("authorization", f"Bearer {spec.verifier_token}"),)

    def next_call(self, now: float) -> Call | None:
        if self.kind == "echo":
            index = self.rng.randrange(len(self.codes.names))
            request = pb.VerifyCodeRequest(username=self.codes.names[index], code="123456")
            return Call(ECHO_METHOD, request.SerializeToString(), "ECHO")
        if self.wrong_share and self.rng.random() < self.wrong_share:
            call = self._wrong_call(now)
            if call is not None:
                return call
        taken = self.codes.take(now)
        if taken is None:
            return None
        index, step = taken
        name, code = self.codes.names[index], code_at(self.codes.secrets[index], step)
        if self.kind == "signin":
            request = pb.SignInRequest(username=name, password=self.spec.password, code=code)
            return Call(SIGN_IN_METHOD, request.SerializeToString(), "SESSION_OPENED", index)
        owed = index in self.owed
        self.owed.discard(index)
        request_bytes = pb.VerifyCodeRequest(username=name, code=code).SerializeToString()
        return Call(VERIFY_METHOD, request_bytes, "OK", index, owed_success=owed)

    def _wrong_call(self, now: float) -> Call | None:
        if self.lockout_names and self.rng.random() < self.lockout_share:
            which = self.rng.randrange(len(self.lockout_names))
            code = wrong_code(self.lockout_secrets[which], now, self.rng)
            request = pb.VerifyCodeRequest(username=self.lockout_names[which], code=code)
            return Call(VERIFY_METHOD, request.SerializeToString(), "FAILED_OR_LOCKED")
        # A wrong code on an account whose next call is a valid one: the failure counter goes to
        # 1 and back to 0, never near the lockout.
        index = self.codes.peek_usable(now)
        if index is None:
            return None
        self.owed.add(index)
        code = wrong_code(self.codes.secrets[index], now, self.rng)
        request = pb.VerifyCodeRequest(username=self.codes.names[index], code=code)
        return Call(VERIFY_METHOD, request.SerializeToString(), "FAILED", index)

    def done(self, call: Call) -> None:
        if call.account is not None:
            # An account owed a success goes to the front, so its failure is cleared soon.
            self.codes.give_back(call.account, first=call.account in self.owed)


def judge(call: Call, response: bytes) -> str | None:
    """The outcome's name when it is the expected one, else None."""
    if call.expect == "ECHO":
        return "echoed" if response == call.request else None
    if call.expect == "SESSION_OPENED":
        signed_in = pb.SignInResponse.FromString(response)
        opened = signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
        return "session_opened" if opened and signed_in.session.token else None
    result = pb.VerifyCodeResponse.FromString(response).result
    if call.expect == "OK":
        return "ok" if result == OK else None
    if call.expect == "FAILED":
        return "expected_failed" if result == FAILED else None
    if result == FAILED:
        return "expected_failed"
    return "expected_locked" if result == LOCKED else None


def shed_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a PASSWORD_CHECKS_BUSY refusal; None for any other error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    reasons, delay = set(), None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.add(info.reason)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return (delay or 1.0) if "PASSWORD_CHECKS_BUSY" in reasons else None


def describe(call: Call, response: bytes) -> str:
    if call.expect in ("ECHO", "SESSION_OPENED"):
        return f"{call.expect}: unexpected response ({len(response)} bytes)"
    result = pb.VerifyCodeResponse.FromString(response).result
    return f"expected {call.expect}, got {enums_pb2.VerifyCodeResult.Name(result)}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = Workload(args)
    tally = Tally()
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    if args.ca_pem:
        credentials = grpc.ssl_channel_credentials(args.ca_pem)
        channels = [
            grpc.aio.secure_channel(args.target, credentials, options=options)
            for _ in range(args.channels)
        ]
    else:
        channels = [
            grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)
        ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=10)
        callables = [
            {m: c.unary_unary(m) for m in (VERIFY_METHOD, SIGN_IN_METHOD, ECHO_METHOD)}
            for c in channels
        ]
        start = args.start_at if args.start_at else time.time()
        measure_from = start + args.warmup
        measure_until = measure_from + args.duration
        await asyncio.sleep(max(0.0, start - time.time()))

        async def client(number: int) -> None:
            methods = callables[number % len(callables)]
            while True:
                now = time.time()
                if now >= measure_until:
                    return
                call = workload.next_call(now)
                if call is None:
                    await asyncio.sleep(0.005)  # no account has a fresh step: wait for one
                    continue
                began = time.perf_counter()
                try:
                    response = await methods[call.method](
                        call.request, metadata=workload.metadata, timeout=args.timeout
                    )
                    outcome = judge(call, response)
                    problem = None if outcome else describe(call, response)
                except grpc.aio.AioRpcError as error:
                    outcome, problem = None, f"status {error.code().name}: {error.details()}"
                    backoff = shed_delay(error)
                    if backoff is not None:
                        # Shed by the server's ration of password checks before anything was
                        # checked: expected under this load; wait as RetryInfo says, as a
                        # well-behaved client does (the sign-in's code is not used up).
                        outcome, problem = "shed", None
                finally:
                    workload.done(call)
                ended_wall = time.time()
                if outcome == "shed":
                    tally.counts["shed"] += measure_from <= ended_wall <= measure_until
                    await asyncio.sleep(backoff or 1.0)
                    continue
                # Closed loop: a call counts when it completes inside the window (a call that
                # waited seconds, as a sign-in behind argon2 does, still counts once).
                in_window = measure_from <= ended_wall <= measure_until
                if problem is not None:
                    (tally.unexpected if in_window else tally.unexpected_outside)[problem] += 1
                elif in_window:
                    assert outcome is not None
                    tally.counts[outcome] += 1
                    tally.latencies_ms.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    return {
        "latencies_ms": [round(x, 3) for x in tally.latencies_ms],
        "counts": dict(tally.counts),
        "unexpected": dict(tally.unexpected),
        "unexpected_outside": dict(tally.unexpected_outside),
        "starved": workload.codes.starved,
        "duration": args.duration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--ca", default="", help="TLS: the server's CA certificate (PEM)")
    parser.add_argument("--kind", choices=["echo", "verify", "signin"], required=True)
    parser.add_argument("--accounts", required=True, help="the JSON file bench/seed.py wrote")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--channels", type=int, default=8, help="TCP connections")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (epoch)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline")
    parser.add_argument("--wrong-share", type=float, default=0.05)
    parser.add_argument(
        "--lockout-share",
        type=float,
        default=0.2,
        help="share of the wrong codes sent to accounts that only get wrong codes (they lock)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=3.0,
        help="seconds before a step boundary from which the previous step is no longer used",
    )
    parser.add_argument("--part", type=int, default=0, help="this process's share of accounts")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--after-step", type=int, default=-1, help="time steps up to this one may be used already"
    )
    args = parser.parse_args()
    args.ca_pem = Path(args.ca).read_bytes() if args.ca else None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a service dependency
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
