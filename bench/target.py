"""BENCH_TARGET: the same VerifyCode load against a deployed TwoFactorService.

The load generator must know the secrets of the accounts it verifies, so it verifies accounts
of its own, made once through the public API and remembered in a file beside the bench's data:
DOMAIN accounts (no password to hash), each enrolled through SignInDomainAccount by a service
account of the bench's own that holds the vouch right, then confirmed with a code. Making them
takes an administrator (BENCH_TARGET_ADMIN, with its password and the base32 secret of its key,
to compute its sign-in code); the calls under load are made by the operator's verifier account
(BENCH_TARGET_VERIFIER and its password: a service account holding VERIFY_CODES), exactly as a
backend makes them. With BENCH_TARGET_CA the channel is TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyotp
from seed import PASSWORD, PERIOD_SECONDS, BenchAccounts
from twofactor.v1 import enums_pb2, options_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

VOUCH_RIGHT = options_pb2.Right(
    functional_area="Two-factor authentication service", permission="VOUCH_DOMAIN_SIGN_IN"
)
PROVISION_CONCURRENCY = 16


@dataclass(frozen=True)
class Target:
    address: str
    ca: str
    verifier: tuple[str, str]
    admin: tuple[str, str, str] | None

    @classmethod
    def from_environment(cls) -> Target | None:
        address = os.environ.get("BENCH_TARGET", "")
        if not address:
            return None
        verifier = os.environ.get("BENCH_TARGET_VERIFIER", "")
        if not verifier:
            raise SystemExit("BENCH_TARGET needs BENCH_TARGET_VERIFIER and its _PASSWORD")
        admin = os.environ.get("BENCH_TARGET_ADMIN", "")
        return cls(
            address=address,
            ca=os.environ.get("BENCH_TARGET_CA", ""),
            verifier=(verifier, os.environ.get("BENCH_TARGET_VERIFIER_PASSWORD", "")),
            admin=(
                admin,
                os.environ.get("BENCH_TARGET_ADMIN_PASSWORD", ""),
                os.environ.get("BENCH_TARGET_ADMIN_SECRET", ""),
            )
            if admin
            else None,
        )

    def channel(self) -> grpc.aio.Channel:
        if self.ca:
            credentials = grpc.ssl_channel_credentials(Path(self.ca).read_bytes())
            return grpc.aio.secure_channel(self.address, credentials)
        return grpc.aio.insecure_channel(self.address)


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _sign_in(
    stub: pb_grpc.TwoFactorServiceAsyncStub, name: str, password: str, code: str = ""
) -> str:
    response = await stub.SignIn(pb.SignInRequest(username=name, password=password, code=code))
    if response.outcome != enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED:
        raise SystemExit(
            f"{name} did not sign in: {enums_pb2.SignInOutcome.Name(response.outcome)}"
        )
    return str(response.session.token)


def prepare_target(target: Target, count: int, state_file: Path) -> BenchAccounts:
    """Signs the verifier in, makes the bench's accounts up to `count` (remembered in
    `state_file`, so the next run makes none), and returns what the load generator needs."""
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    accounts = asyncio.run(_prepare(target, count, state))
    save_state(state_file, state)
    return accounts


def save_state(state_file: Path, state: dict[str, Any]) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    state_file.chmod(0o600)


def note_used_until(state_file: Path, step: int) -> None:
    """After a run: its codes may have used steps up to `step` (the next run starts after)."""
    state = json.loads(state_file.read_text())
    state["used_until_step"] = max(step, state.get("used_until_step", -1))
    save_state(state_file, state)


async def _prepare(target: Target, count: int, state: dict[str, Any]) -> BenchAccounts:
    named: dict[str, str] = state.setdefault("accounts", {})
    async with target.channel() as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)
        verifier_token = await _sign_in(stub, *target.verifier)
        if len(named) < count:
            if target.admin is None:
                raise SystemExit(
                    f"{len(named)} bench accounts known, {count} wanted: set BENCH_TARGET_ADMIN, "
                    "_PASSWORD and _SECRET once to make them"
                )
            run = state.setdefault("run", secrets.token_hex(4))
            # One sign-in: a second within the same time step would replay its code.
            admin_token = await _admin_token(stub, target.admin)
            voucher = await _voucher(stub, admin_token, state, run)
            names = (f"bench-{run}-{i:06d}" for i in range(count))
            gate = asyncio.Semaphore(PROVISION_CONCURRENCY)

            async def make(name: str) -> None:
                async with gate:
                    named[name] = await _enrolled(stub, admin_token, voucher, name)

            await asyncio.gather(*(make(name) for name in names if name not in named))
            # Each enrollment used its own current step.
            state["used_until_step"] = int(time.time()) // PERIOD_SECONDS
    return BenchAccounts(
        users=len(named),
        lockout_users=0,
        password=PASSWORD,
        verifier_token=verifier_token,
        named_secrets=named,
        used_until_step=state.get("used_until_step", -1),
    )


async def _admin_token(stub: pb_grpc.TwoFactorServiceAsyncStub, admin: tuple[str, str, str]) -> str:
    name, password, secret = admin
    return await _sign_in(stub, name, password, pyotp.TOTP(secret).now())


async def _voucher(
    stub: pb_grpc.TwoFactorServiceAsyncStub, token: str, state: dict[str, Any], run: str
) -> str:
    """A session of the bench's own service account holding the vouch right (made once)."""
    voucher = state.get("voucher")
    if voucher is None:
        voucher = {"name": f"bench-{run}-voucher", "password": secrets.token_urlsafe(24)}
        await stub.CreateAccount(
            pb.CreateAccountRequest(
                username=voucher["name"],
                kind=enums_pb2.ACCOUNT_KIND_INTERNAL,
                password=voucher["password"],
                exclude_from_two_factor=True,
            ),
            metadata=_auth(token),
        )
        await stub.GrantRight(
            pb.GrantRightRequest(username=voucher["name"], right=VOUCH_RIGHT), metadata=_auth(token)
        )
        state["voucher"] = voucher
    return await _sign_in(stub, voucher["name"], voucher["password"])


async def _enrolled(
    stub: pb_grpc.TwoFactorServiceAsyncStub, admin_token: str, voucher_token: str, name: str
) -> str:
    """A DOMAIN account with its key set up; returns the key's base32 secret."""
    await stub.CreateAccount(
        pb.CreateAccountRequest(username=name, kind=enums_pb2.ACCOUNT_KIND_DOMAIN),
        metadata=_auth(admin_token),
    )
    started = await stub.SignInDomainAccount(
        pb.SignInDomainAccountRequest(username=name), metadata=_auth(voucher_token)
    )
    secret = str(started.enrollment.pending_key.secret_base32)
    await stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=started.enrollment.enrollment_ticket, code=pyotp.TOTP(secret).now()
        )
    )
    return secret
