"""TwoFactorService replicas (`twofactor serve` processes) on the cluster's multi-host URL, the
`twofactor` command line, and the accounts the load uses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ha.cluster import free_port
from twofactor_service.code_checks import SECRET_PURPOSE
from twofactor_service.encryption import KeyRing, parse_keys
from twofactor_service.passwords import hash_password
from twofactor_service.store import accounts
from twofactor_service.totp import SecretKey

TWOFACTOR = Path(sys.executable).with_name("twofactor")
VERIFY_RIGHT = ("Two-factor authentication service", "VERIFY_CODES")
STOP_WITHIN_SECONDS = 20.0


@dataclass
class Replica:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path


def service_env(database_url: str, encryption_keys: str, **settings: str) -> dict[str, str]:
    """The environment of a replica or of the command line: the operator's configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {"TWOFACTOR_DATABASE_URL": database_url, "TWOFACTOR_ENCRYPTION_KEYS": encryption_keys}
    env |= {f"TWOFACTOR_{k.upper()}": v for k, v in settings.items()}
    return env


def start_replica(
    name: str,
    log_dir: Path,
    database_url: str,
    encryption_keys: str,
    address: str | None = None,
    **settings: str,
) -> Replica:
    """`twofactor serve` on `address` (default: a free local port), with TWOFACTOR_`settings`."""
    address = address or f"127.0.0.1:{free_port()}"
    log = log_dir / f"replica-{name}.log"
    env = service_env(database_url, encryption_keys, listen_address=address, **settings)
    with log.open("wb") as sink:
        process = subprocess.Popen(  # noqa: S603 - our own command
            [str(TWOFACTOR), "serve"], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    return Replica(name, address, process, log)


async def wait_serving(replica: Replica, within: float = 60.0) -> None:
    """Until the replica's health check says SERVING (it can write)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with grpc.aio.insecure_channel(replica.address) as channel:
        # The generated health stub has no type hints for its methods.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            if replica.process.poll() is not None:
                raise RuntimeError(f"replica {replica.name} exited:\n{replica.log.read_text()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if loop.time() > deadline:
                raise RuntimeError(f"replica {replica.name} not SERVING within {within:.0f} s")
            await asyncio.sleep(0.1)


def stop_replica(replica: Replica) -> int | None:
    """SIGTERM by PID, as an orchestrator stops a replica; SIGKILL if it does not stop."""
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
    try:
        return replica.process.wait(timeout=STOP_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        replica.process.kill()
        replica.process.wait()
        return None


async def twofactor(env: dict[str, str], *args: str, within: float = 120.0) -> tuple[int, str]:
    """`twofactor ARGS` (the operator's command line); its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        str(TWOFACTOR),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def secret_of(username: str) -> bytes:
    """The 160-bit secret of a seeded account, derived from its name (as bench/seed.py does),
    so the load generator knows every key without a file of secrets."""
    return hashlib.sha1(b"twofactor-ha-secret:" + username.encode()).digest()  # noqa: S324


async def seed_enrolled_accounts(
    url: str, encryption_keys: str, names: list[str], password: str
) -> None:
    """Enrolled INTERNAL accounts written straight through SQL, the way bench/seed.py seeds
    the bench: thousands of enrollments through SignIn would take minutes. Each secret is
    sealed with the service's key ring, as the service would seal it."""
    key_ring = KeyRing(parse_keys(encryption_keys, "TWOFACTOR_ENCRYPTION_KEYS"))
    password_hash = hash_password(password)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            rows = await conn.fetch(
                "INSERT INTO accounts (username, username_key, kind, password_hash)"
                " SELECT n, k, 'INTERNAL', $3 FROM unnest($1::text[], $2::text[]) AS u(n, k)"
                " RETURNING id, username",
                names,
                [accounts.username_key(n) for n in names],
                password_hash,
            )
            records = []
            for row in rows:
                sealed = key_ring.seal(
                    SecretKey(secret_of(row["username"])),
                    account_id=row["id"],
                    purpose=SECRET_PURPOSE,
                )
                records.append(
                    (
                        row["id"],
                        "ACTIVE",
                        sealed.key_id,
                        sealed.nonce,
                        sealed.ciphertext,
                        "SHA1",
                        6,
                        30,
                    )
                )
            await conn.copy_records_to_table(
                "secret_keys",
                records=records,
                columns=[
                    "account_id",
                    "state",
                    "encryption_key_id",
                    "nonce",
                    "ciphertext",
                    "algorithm",
                    "digits",
                    "period_seconds",
                ],
            )
    finally:
        await conn.close()
