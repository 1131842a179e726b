"""The operator's `twofactor` commands, run as a subprocess against the suite's database, as an
operator would: output, JSON, exit codes, the rules of the RPCs, and the audit log."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import grpc
import pyotp
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import TEST_ENCRYPTION_KEYS, Actors, audit_events
from twofactor_service import cli
from twofactor_service.rules import AccountKind

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4, 5
OPERATOR = f"cli:{getpass.getuser()}"
RUN_WITHIN_SECONDS = 60


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {
        "TWOFACTOR_DATABASE_URL": database_url,
        # The in-process runtime's key ring: each side reads the secrets the other wrote.
        "TWOFACTOR_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "TWOFACTOR_LOG_LEVEL": "WARNING",
    }
    return env | extra


@pytest.fixture
def twofactor(database_url: str) -> Any:
    async def run(*args: str, stdin: str = "", **env: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twofactor_service.cli",
            *args,
            env=cli_env(database_url, **env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(RUN_WITHIN_SECONDS):
            out, err = await process.communicate(stdin.encode())
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())

    return run


async def audit_actors(
    actors: Actors, stub: pb_grpc.TwoFactorServiceAsyncStub, target: str
) -> list[tuple[str, str, bool]]:
    """(actor, operation, success) of the target's audit events, read through the API."""
    reader = await actors.admin()
    events = await audit_events(stub, reader, target_username=target)
    return [(e.actor, e.operation, e.outcome == enums_pb2.AUDIT_OUTCOME_SUCCESS) for e in events]


COMMANDS = [
    ["status"],
    ["allowlist"],
    ["allowlist", "list"],
    ["allowlist", "add"],
    ["allowlist", "remove"],
    ["exclusion"],
    ["exclusion", "list"],
    ["exclusion", "add"],
    ["exclusion", "remove"],
    ["reset-key"],
    ["delete-key"],
    ["set-protection"],
    ["enroll"],
    ["import"],
    ["create-user"],
    ["grant"],
    ["revoke"],
    ["serve"],
    ["migrate"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: argparse answers --help before any configuration or database is read.
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])

    assert done.value.code == EXIT_OK
    assert capsys.readouterr().out.startswith(f"usage: twofactor {' '.join(command)}")


async def test_the_help_lists_the_commands_and_exit_codes(twofactor: Any) -> None:
    top = await twofactor("--help")

    assert top.code == EXIT_OK
    assert "exit codes:" in top.out
    for command in ("status", "allowlist", "exclusion", "reset-key", "delete-key", "enroll"):
        assert command in top.out


async def test_status_shows_the_state_as_text_and_json(actors: Actors, twofactor: Any) -> None:
    alice = await actors.create("alice", protected=True)

    text, as_json = await asyncio.gather(
        twofactor("status", alice.username), twofactor("status", alice.username, "--json")
    )

    assert text.code == EXIT_OK, text.err
    assert text.out.startswith(f"{alice.username}: ALLOWLISTED (internal account)")
    assert "protected: yes" in text.out
    assert as_json.code == EXIT_OK
    status = as_json.json()
    assert status["username"] == alice.username
    assert status["state"] == "ALLOWLISTED"
    assert status["protected"] is True
    assert status["key_created_at"] is None
    assert status["locked_until"] is None


async def test_bad_input_unknown_accounts_and_bad_configuration_have_their_exit_codes(
    actors: Actors, twofactor: Any
) -> None:
    unknown, empty, usage, bad_setting, config = await asyncio.gather(
        twofactor("status", f"nobody-{actors.prefix}"),
        twofactor("status", ""),
        twofactor("allowlist", "frobnicate"),
        twofactor("set-protection", "someone", "maybe"),
        twofactor("status", "someone", TWOFACTOR_LOG_LEVEL="LOUD"),
    )

    assert unknown.code == EXIT_NOT_FOUND
    assert "nobody-" in unknown.err
    assert empty.code == EXIT_USAGE
    assert "username" in empty.err
    assert usage.code == EXIT_USAGE
    assert bad_setting.code == EXIT_USAGE
    assert config.code == EXIT_CONFIG
    assert "TWOFACTOR_LOG_LEVEL" in config.err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_on_a_busy_port_names_the_address_and_the_variable(
    twofactor: Any, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        run = await twofactor("serve", TWOFACTOR_LISTEN_ADDRESS=address, TWOFACTOR_WORKERS=workers)

    assert run.code == EXIT_USAGE, run.err
    # One line saying what is wrong and what to change: no traceback, no raw gRPC log line.
    assert run.err.splitlines() == [run.err.strip()], run.err
    assert run.err.startswith(f"error: cannot listen on {address}: address already in use.")
    assert "set TWOFACTOR_LISTEN_ADDRESS to a free host:port" in run.err
    assert "Traceback" not in run.err


async def test_reset_key_puts_the_account_on_the_allowlist_and_is_audited(
    actors: Actors, twofactor: Any, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    bob = await actors.user()

    run = await twofactor("reset-key", bob.username, "--json")

    assert run.code == EXIT_OK, run.err
    assert run.json()["state"] == "ALLOWLISTED"
    # Its sessions were ended, as with ResetSecret.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=bob.metadata())
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (OPERATOR, "ResetSecret", True) in await audit_actors(actors, stub, bob.username)


async def test_delete_key_blocks_the_account(actors: Actors, twofactor: Any) -> None:
    bob = await actors.user()
    directory_user = await actors.create("domain", kind=AccountKind.DOMAIN)

    deleted, refused = await asyncio.gather(
        twofactor("delete-key", bob.username, "--json"),
        twofactor("delete-key", directory_user.username),
    )

    assert deleted.code == EXIT_OK, deleted.err
    assert deleted.json()["state"] == "BLOCKED"
    # The rule of DeleteSecret holds here too: only internal accounts' keys.
    assert refused.code == EXIT_REFUSED
    assert "domain account" in refused.err


async def test_allowlist_commands_follow_the_list_rules(
    actors: Actors, twofactor: Any, stub: pb_grpc.TwoFactorServiceAsyncStub
) -> None:
    enrolled = await actors.user()
    blocked = await actors.user()
    await twofactor("delete-key", blocked.username)

    refused = await twofactor("allowlist", "add", enrolled.username)
    added = await twofactor("allowlist", "add", blocked.username, "--json")
    listed = await twofactor("allowlist", "list", "--json")
    listed_text = await twofactor("allowlist", "list")

    assert refused.code == EXIT_REFUSED
    assert "already has a secret key" in refused.err
    assert added.code == EXIT_OK, added.err
    assert added.json()["state"] == "ALLOWLISTED"
    assert blocked.username in [member["username"] for member in listed.json()]
    assert enrolled.username not in [member["username"] for member in listed.json()]
    assert blocked.username in listed_text.out.splitlines()

    removed = await twofactor("allowlist", "remove", blocked.username, "--json")

    assert removed.code == EXIT_OK, removed.err
    assert removed.json()["state"] == "BLOCKED"
    events = await audit_actors(actors, stub, blocked.username)
    assert (OPERATOR, "AddToAllowlist", True) in events
    assert (OPERATOR, "RemoveFromAllowlist", True) in events


async def test_exclusion_commands(actors: Actors, twofactor: Any) -> None:
    bob = await actors.user()

    added = await twofactor("exclusion", "add", bob.username, "--json")
    listed = await twofactor("exclusion", "list", "--json")
    removed = await twofactor("exclusion", "remove", bob.username, "--json")
    again = await twofactor("exclusion", "remove", bob.username)

    assert added.code == EXIT_OK, added.err
    # Excluding deletes the key.
    assert added.json()["state"] == "EXCLUDED"
    assert added.json()["key_created_at"] is None
    assert bob.username in [member["username"] for member in listed.json()]
    assert removed.code == EXIT_OK
    assert removed.json()["state"] == "BLOCKED"
    assert again.code == EXIT_REFUSED
    assert "not on the exclusion list" in again.err


async def test_set_protection_on_and_off(actors: Actors, twofactor: Any) -> None:
    bob = await actors.create("bob")

    on = await twofactor("set-protection", bob.username, "on", "--json")
    off = await twofactor("set-protection", bob.username, "off", "--json")

    assert on.code == EXIT_OK, on.err
    assert on.json()["protected"] is True
    assert off.json()["protected"] is False


async def test_enroll_shows_the_key_once_and_activates_it_with_a_code(
    actors: Actors,
    database_url: str,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
) -> None:
    alice = await actors.create("alice")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twofactor_service.cli",
        "enroll",
        alice.username,
        "--json",
        env=cli_env(database_url),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    async with asyncio.timeout(RUN_WITHIN_SECONDS):
        pending = json.loads(await process.stdout.readline())
        assert pending["provisioning_uri"].startswith("otpauth://totp/")
        assert pending["secret_base32"] in pending["provisioning_uri"]
        # The CLI runs on the real clock; the authenticator app would show this code now.
        process.stdin.write(f"{pyotp.TOTP(pending['secret_base32']).now()}\n".encode())
        await process.stdin.drain()
        out, err = await process.communicate()

    assert process.returncode == EXIT_OK, err.decode()
    assert json.loads(out)["state"] == "ENROLLED"
    assert "█" in err.decode() or "▀" in err.decode()  # the QR code, drawn on stderr with --json
    # The key works for signing in through the API.
    alice.secret = pending["secret_base32"]
    await actors.sign_in(alice)
    status = await stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=alice.metadata())
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert not status.status.allowlisted
    operations = await audit_actors(actors, stub, alice.username)
    assert (OPERATOR, "BeginEnrollment", True) in operations
    assert (OPERATOR, "CompleteEnrollment", True) in operations


async def test_enroll_retries_a_wrong_code_then_gives_up(actors: Actors, twofactor: Any) -> None:
    alice = await actors.create("alice")

    run = await twofactor("enroll", alice.username, "--no-qr", stdin="000000\n12\n999999\n")

    assert run.code == EXIT_REFUSED
    assert "otpauth://totp/" in run.out
    assert run.err.count("error:") == 3
    status = await twofactor("status", alice.username, "--json")
    assert status.json()["state"] == "ALLOWLISTED"


async def test_enroll_is_refused_for_an_account_that_is_not_allowlisted(
    actors: Actors, twofactor: Any
) -> None:
    bob = await actors.user()
    svc = await actors.create("svc", excluded=True)

    enrolled, excluded = await asyncio.gather(
        twofactor("enroll", bob.username), twofactor("enroll", svc.username)
    )

    assert enrolled.code == EXIT_REFUSED
    assert "reset it first" in enrolled.err
    assert excluded.code == EXIT_REFUSED
    assert "exclusion list" in excluded.err
    assert "otpauth://" not in enrolled.out + excluded.out
