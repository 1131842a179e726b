"""The `twofactor` command: serve, migrate, and the operator's bootstrap commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import asyncpg

from twofactor_service import (
    administration,
    audit_chain,
    errors,
    key_files,
    key_import,
    key_rotation,
    logs,
    rules,
    secret_keys,
    siem_export,
    sign_in,
    totp,
)
from twofactor_service.caller import Caller
from twofactor_service.config import Config, ConfigError, load_config
from twofactor_service.encryption import load_key_ring, new_key_line
from twofactor_service.listen import AddressUnavailable, ensure_can_listen
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.server import LISTEN_VARIABLE, start_server
from twofactor_service.store import database
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.migrations import migrate
from twofactor_service.workers import run_workers

if TYPE_CHECKING:
    from twofactor_service.tracing import Tracing

log = logging.getLogger("twofactor_service")

# Exit codes scripts can rely on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4, 5
EXIT_CODES_HELP = """exit codes:
  0  done
  1  failed (database unreachable, or another failure)
  2  usage error, invalid input, or the listening address is taken
  3  configuration error (a TWOFACTOR_* variable)
  4  account not found
  5  refused by a rule (e.g. allowlisting an account that has a key)
  6  verify-audit: the audit log was tampered with
siem-test: 0 when the receiver took the test event, 1 when a step failed, 3 when the
  TWOFACTOR_SIEM_* settings are missing or malformed"""


def database_url(config: Config) -> str:
    if config.database_url:
        return config.database_url
    return database.start_embedded(config.data_dir)


async def _open_runtime(
    config: Config, url: str | None = None, tracing: Tracing | None = None
) -> Runtime:
    key_ring, notice = load_key_ring(config)
    if notice:
        log.warning(notice)
    pool = await database.create_pool(url or database_url(config), config.database_pool_size)
    async with pool.acquire() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("database migrated", extra={"migrations": applied})
    return Runtime(config=config, pool=pool, key_ring=key_ring, tracing=tracing)


def _console_url(config: Config) -> str | None:
    """The console's address as configured (workers share it)."""
    if not config.console_address:
        return None
    return f"{'https' if config.tls else 'http'}://{config.console_address}/"


def _announce(config: Config, console_url: str | None = None) -> None:
    """For the person at the terminal, on stdout: stderr carries the JSON log alone."""
    workers = f" ({config.workers} worker processes)" if config.workers > 1 else ""
    console = console_url or _console_url(config)
    where = f"open the console at {console} and sign in" if console else "sign in with SignIn"
    print(
        f"TwoFactorService listening on {config.listen_address}{workers}.\n"
        + (f"Web console: {console}\n" if console else "")
        + "Create the first administrator (in another terminal):\n"
        "  .venv/bin/twofactor create-user admin --password 'choose-a-long-one' --admin\n"
        f"then {where}, and set up the key it hands out (or follow the README's walk-through).",
        flush=True,
    )


def _start_tracing(config: Config) -> Tracing | None:
    """Per serving process (a worker sets up its own after it is spawned)."""
    if not config.tracing:
        return None
    # Imported only now: without tracing no OpenTelemetry code is loaded at all.
    from twofactor_service.tracing import start_tracing

    return start_tracing()


async def _serve(config: Config, url: str | None = None, ready: Connection | None = None) -> None:
    url = url or database_url(config)
    tracing = _start_tracing(config)
    runtime = await _open_runtime(config, url, tracing)
    running = await start_server(
        config, runtime.pool, runtime.key_ring, runtime=runtime, database_url=url
    )
    log.info("serving", extra={"address": config.listen_address, "port": running.port})
    if ready is None:
        _announce(config, running.console.url if running.console else None)
    else:  # a worker of `serve --workers N`: the parent announces once all are serving
        ready.send("ready")
        ready.close()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop(grace=10)
    await runtime.pool.close()
    if tracing is not None:
        tracing.stop()  # the last calls' spans, exported within a bounded wait


def _serve_worker(config: Config, url: str, ready: Connection) -> None:
    """One process of `serve --workers N` (started by workers.run_workers)."""
    logs.configure(config.log_level)
    _install_uvloop()
    asyncio.run(_serve(config, url, ready))


def _serve_with_workers(config: Config) -> int:
    """The embedded PostgreSQL, the development key and the migrations once, here; then the
    workers, each a whole server on the shared port."""
    if config.listen_address.rsplit(":", 1)[-1] == "0":
        raise ConfigError("TWOFACTOR_WORKERS > 1 needs a fixed port in TWOFACTOR_LISTEN_ADDRESS")
    if config.console_address and config.console_address.rsplit(":", 1)[-1] == "0":
        # Each worker serves the console on the shared port (SO_REUSEPORT), as it does gRPC.
        raise ConfigError("TWOFACTOR_WORKERS > 1 needs a fixed port in TWOFACTOR_CONSOLE_ADDRESS")
    url = database_url(config)
    asyncio.run(_prepare(config, url))
    clean = run_workers(config, url, _serve_worker, lambda: _announce(config))
    return EXIT_OK if clean else EXIT_FAILED


async def _prepare(config: Config, url: str) -> None:
    runtime = await _open_runtime(config, url)
    await runtime.pool.close()


def _cli_caller(operation: str) -> Caller:
    return Caller(
        actor=None,
        actor_name=f"cli:{getpass.getuser()}",
        operation=operation,
        request_id=uuid.uuid4().hex,
        peer="cli",
    )


def _status_json(record: AccountRecord) -> dict[str, Any]:
    return {
        "username": record.username,
        "kind": record.kind.value,
        "state": record.state.value,
        "key_created_at": record.key_created_at.isoformat() if record.key_created_at else None,
        "allowlisted": record.allowlisted,
        "excluded": record.excluded,
        "protected": record.protected,
        "consecutive_failures": record.failed_attempts,
        "recovery_codes_remaining": record.recovery_codes_remaining,
        "rights": [{"functional_area": a, "permission": p} for a, p in record.rights],
    }


def _print_status(record: AccountRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_status_json(record)))
        return
    print(f"{record.username}: {record.state.value} ({record.kind.value.lower()} account)")
    for area, permission in record.rights:
        print(f"  right: {permission} in {area!r}")


async def _with_runtime(config: Config, work: Callable[[Runtime], Awaitable[int]]) -> int:
    runtime = await _open_runtime(config)
    try:
        return await work(runtime)
    finally:
        await runtime.pool.close()


def _right(args: argparse.Namespace) -> rules.Right:
    if args.admin:
        return rules.ADMIN_RIGHT
    if not (args.area and args.permission):
        raise errors.InvalidArgument("right", "give --admin, or --area and --permission")
    return (args.area, args.permission)


async def _create_user(runtime: Runtime, args: argparse.Namespace) -> int:
    password = args.password
    if args.kind == "internal" and password is None:
        password = os.environ.get("TWOFACTOR_NEW_PASSWORD") or getpass.getpass("Password: ")
    record = await administration.create_account(
        runtime,
        _cli_caller("CreateAccount"),
        username=args.username,
        kind=AccountKind[args.kind.upper()],
        password=password or "",
        protected=args.protected,
        excluded=args.exclude,
    )
    if args.admin:
        record = await administration.change_right(
            runtime, _cli_caller("GrantRight"), args.username, rules.ADMIN_RIGHT, grant=True
        )
    for area, permission in args.right or ():
        record = await administration.change_right(
            runtime, _cli_caller("GrantRight"), args.username, (area, permission), grant=True
        )
    _print_status(record, args.json)
    return EXIT_OK


async def _change_right(runtime: Runtime, args: argparse.Namespace, grant: bool) -> int:
    record = await administration.change_right(
        runtime,
        _cli_caller("GrantRight" if grant else "RevokeRight"),
        args.username,
        _right(args),
        grant=grant,
    )
    _print_status(record, args.json)
    return EXIT_OK


def _full_status_json(record: AccountRecord) -> dict[str, Any]:
    locked = record.locked_until
    return {**_status_json(record), "locked_until": locked.isoformat() if locked else None}


async def _status(runtime: Runtime, args: argparse.Namespace) -> int:
    rules.validate_username(args.username)  # an empty one would mean "my own" to the RPC
    record = await administration.account_status(
        runtime, _cli_caller("GetAccountStatus"), args.username
    )
    if args.json:
        print(json.dumps(_full_status_json(record)))
        return EXIT_OK
    _print_status(record, False)
    created = record.key_created_at.isoformat() if record.key_created_at else "no key"
    print(f"  key created: {created}")
    yes = {True: "yes", False: "no"}
    print(
        f"  allowlisted: {yes[record.allowlisted]}, excluded: {yes[record.excluded]}, "
        f"protected: {yes[record.protected]}"
    )
    locked = f", locked until {record.locked_until.isoformat()}" if record.locked_until else ""
    print(f"  consecutive failures: {record.failed_attempts}{locked}")
    print(f"  recovery codes left: {record.recovery_codes_remaining}")
    return EXIT_OK


# The list commands: (list column, add, remove, the RPCs' names for the audit log).
_LISTS = {
    "allowlist": (
        "allowlisted",
        administration.add_to_allowlist,
        administration.remove_from_allowlist,
        ("AddToAllowlist", "RemoveFromAllowlist"),
    ),
    "exclusion": (
        "excluded",
        administration.add_to_exclusion_list,
        administration.remove_from_exclusion_list,
        ("AddToExclusionList", "RemoveFromExclusionList"),
    ),
}


async def _list_command(runtime: Runtime, args: argparse.Namespace) -> int:
    column, add, remove, (add_operation, remove_operation) = _LISTS[args.command]
    if args.action == "list":
        members: list[AccountRecord] = []
        token = ""
        while True:
            page, token = await administration.list_members(runtime, column, 1000, token)
            members.extend(page)
            if not token:
                break
        if args.json:
            print(json.dumps([_status_json(member) for member in members]))
        else:
            for member in members:
                print(member.username)
        return EXIT_OK
    if args.action == "add":
        record = await add(runtime, _cli_caller(add_operation), args.username)
    else:
        record = await remove(runtime, _cli_caller(remove_operation), args.username)
    _print_status(record, args.json)
    return EXIT_OK


async def _reset_key(runtime: Runtime, args: argparse.Namespace) -> int:
    record = await secret_keys.reset_secret(runtime, _cli_caller("ResetSecret"), args.username)
    _print_status(record, args.json)
    return EXIT_OK


async def _delete_key(runtime: Runtime, args: argparse.Namespace) -> int:
    record = await secret_keys.delete_secret(runtime, _cli_caller("DeleteSecret"), args.username)
    _print_status(record, args.json)
    return EXIT_OK


async def _set_protection(runtime: Runtime, args: argparse.Namespace) -> int:
    record = await administration.set_protection(
        runtime, _cli_caller("SetAccountProtection"), args.username, args.setting == "on"
    )
    _print_status(record, args.json)
    return EXIT_OK


ENROLL_ATTEMPTS = 3


async def _read_code(prompt: str) -> str:
    print(prompt, end="", file=sys.stderr, flush=True)
    line: str = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise errors.InvalidArgument("code", "no code was entered")
    return line.strip()


async def _enroll(runtime: Runtime, args: argparse.Namespace) -> int:
    """Sets up an allowlisted account's key at this terminal: the QR code and the otpauth://
    URI are shown once, then a code from the authenticator app activates the key."""
    started = await sign_in.begin_enrollment_at_terminal(
        runtime, _cli_caller("BeginEnrollment"), args.username
    )
    key = started.pending_key
    # With --json, stdout carries JSON lines only (the pending key, then the account); the QR
    # code and the prompt go to stderr.
    shown = sys.stderr if args.json else sys.stdout
    if not args.no_qr:
        print(await asyncio.to_thread(totp.qr_terminal, key.provisioning_uri), file=shown)
    if args.json:
        pending = {
            "secret_base32": key.secret.base32(),
            "provisioning_uri": key.provisioning_uri,
            "expires_at": key.expires_at.isoformat(),
        }
        print(json.dumps(pending), flush=True)
    else:
        print(
            "Scan the QR code with the authenticator app, or type in the key.\n"
            f"  key: {key.secret.base32()}\n"
            f"  uri: {key.provisioning_uri}\n"
            f"  expires: {key.expires_at.isoformat()}",
            flush=True,
        )
    for attempt in range(1, ENROLL_ATTEMPTS + 1):
        code = await _read_code("Code from the authenticator app: ")
        try:
            await sign_in.complete_enrollment_at_terminal(
                runtime, _cli_caller("CompleteEnrollment"), started.ticket, code
            )
        except (errors.InvalidArgument, errors.RuleViolation) as exc:
            retry = isinstance(exc, errors.InvalidArgument) or exc.reason == "CODE_INVALID"
            if not retry or attempt == ENROLL_ATTEMPTS:
                raise
            print(f"error: {exc.message}", file=sys.stderr)
            continue
        break
    record = await administration.account_status(
        runtime, _cli_caller("GetAccountStatus"), args.username
    )
    _print_status(record, args.json)
    return EXIT_OK


def _read_import_file(path: str, what: str) -> bytes:
    """A file named on the command line ("-": standard input), read up to one byte past the
    import's bound, so an oversized one is refused without being read whole."""
    limit = key_files.MAX_FILE_BYTES + 1
    try:
        if path == "-":
            return sys.stdin.buffer.read(limit)
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise errors.InvalidArgument(what, f"cannot read {path}: {exc.strerror}") from None


def _pre_shared_key(path: str) -> bytes:
    """A PSKC pre-shared key file: the key in hex (as vendors send it), or its raw bytes."""
    data = _read_import_file(path, "--psk-file")
    text = data.decode("ascii", "replace").strip().replace(" ", "").replace(":", "")
    try:
        return bytes.fromhex(text)
    except ValueError:
        return data


def _key_map(path: str) -> dict[str, str]:
    """`KeyId,username` lines: the accounts of PSKC keys that carry no UserId."""
    mapping: dict[str, str] = {}
    text = _read_import_file(path, "--key-map").decode("utf-8", "replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key_id, sep, username = line.partition(",")
        if not sep or not key_id.strip() or not username.strip():
            raise errors.InvalidArgument("--key-map", f"line {number}: write KeyId,username")
        mapping[key_id.strip()] = username.strip()
    return mapping


def _detect_format(content: bytes) -> key_files.KeyFileFormat:
    """A PSKC file is XML; anything else is read as otpauth:// URIs."""
    xml = content.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")
    return key_files.KeyFileFormat.PSKC if xml else key_files.KeyFileFormat.OTPAUTH


async def _import(runtime: Runtime, args: argparse.Namespace) -> int:
    """`twofactor import`: the same operation as ImportSecrets, by the operator at the
    database's side (no step-up: no session, as with reset-key)."""
    content = _read_import_file(args.file, "file")
    file_format = key_files.KeyFileFormat(args.format) if args.format else _detect_format(content)
    passphrase = ""
    if args.passphrase:
        passphrase = os.environ.get("TWOFACTOR_IMPORT_PASSPHRASE") or getpass.getpass(
            "PSKC passphrase: "
        )
    report = await key_import.import_secrets(
        runtime,
        _cli_caller("ImportSecrets"),
        key_import.ImportRequest(
            file_format=file_format,
            content=content,
            validate_only=args.dry_run,
            replace_existing_keys=args.replace,
            pskc=key_files.PskcKeys(
                pre_shared_key=_pre_shared_key(args.psk_file) if args.psk_file else b"",
                passphrase=passphrase,
                key_accounts=_key_map(args.key_map) if args.key_map else None,
            ),
        ),
    )
    if args.json:
        entries = [
            {
                "location": entry.location,
                "username": entry.username,
                "algorithm": entry.parameters.algorithm,
                "digits": entry.parameters.digits,
                "period_seconds": entry.parameters.period_seconds,
                "replaces_existing_key": entry.replaces_existing_key,
                "protected": entry.protected,
            }
            for entry in report.keys
        ]
        print(json.dumps({"validate_only": report.validate_only, "secrets": entries}))
        return EXIT_OK
    for entry in report.keys:
        parameters = entry.parameters
        what = "replaces its key" if entry.replaces_existing_key else "new key"
        print(
            f"{entry.location}: {entry.username}: {parameters.algorithm}, "
            f"{parameters.digits} digits, {parameters.period_seconds} s ({what})"
        )
    count = len(report.keys)
    if report.validate_only:
        print(f"dry run: {count} keys would be imported; nothing was changed")
    else:
        print(f"imported {count} keys ({file_format.value}); the accounts are ENROLLED")
    return EXIT_OK


def _worker_count(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 64")
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twofactor",
        description="TwoFactorService: serve the gRPC API, or administer accounts from the shell. "
        "Configuration comes from TWOFACTOR_* environment variables (see docs/operations.md).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="migrate the database and serve the gRPC API")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="server processes sharing the port (SO_REUSEPORT); default TWOFACTOR_WORKERS or 1",
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    sub.add_parser("new-encryption-key", help="print a new key line for TWOFACTOR_ENCRYPTION_KEYS")

    create = sub.add_parser("create-user", help="create an account (bootstraps the first admin)")
    create.add_argument("username")
    create.add_argument("--kind", choices=["internal", "domain"], default="internal")
    create.add_argument(
        "--password",
        help="the password (internal accounts); else TWOFACTOR_NEW_PASSWORD or a prompt",
    )
    create.add_argument("--protected", action="store_true", help="protect against modification")
    create.add_argument(
        "--exclude", action="store_true", help="exclude from 2FA (service accounts)"
    )
    create.add_argument("--admin", action="store_true", help="grant MODIFY_OBJECT_ACLS")
    create.add_argument(
        "--right", nargs=2, action="append", metavar=("AREA", "PERMISSION"), help="grant a right"
    )
    create.add_argument("--json", action="store_true", help="print the account as JSON")

    for name, verb in (("grant", "grant"), ("revoke", "revoke")):
        cmd = sub.add_parser(name, help=f"{verb} a right")
        cmd.add_argument("username")
        cmd.add_argument("--admin", action="store_true", help="the right MODIFY_OBJECT_ACLS")
        cmd.add_argument("--area", help="functional area")
        cmd.add_argument("--permission", help="permission")
        cmd.add_argument("--json", action="store_true", help="print the account as JSON")

    rotate = sub.add_parser(
        "rotate-keys",
        help="re-encrypt every stored secret under the first key of the ring, while serving",
    )
    rotate.add_argument(
        "--batch-size",
        type=key_rotation.batch_size_argument,
        default=key_rotation.DEFAULT_BATCH_SIZE,
        help="secrets per transaction (1 to 10000, default %(default)s)",
    )
    verify_audit = sub.add_parser(
        "verify-audit",
        help="seal the audit log, then recompute its hash chain; exit 6 when it was tampered with",
    )
    verify_audit.add_argument(
        "--anchor",
        type=audit_chain.anchor_argument,
        action="append",
        default=[],
        metavar="POSITION:LINK",
        help="a chain head printed by an earlier check, kept outside the database: the chain "
        "must still hold it (repeatable)",
    )
    sub.add_parser(
        "siem-test",
        help="send one test event to the SIEM as configured (TWOFACTOR_SIEM_*) and report each "
        "step: connect, TLS handshake, sent",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_account_commands(sub)
    return parser


def _add_account_commands(sub: Any) -> None:
    """The operator's commands on accounts' 2FA; they go through the functions the RPCs use, so
    the same rules hold. Audited with the actor cli:<os user>."""

    def command(name: str, help_text: str, *, username: bool = True) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if username:
            cmd.add_argument("username")
        cmd.add_argument("--json", action="store_true", help="print the result as JSON")
        return cmd

    command("status", "show an account's 2FA state, key, list memberships, protection, lockout")
    lists = (
        ("allowlist", "the 2FA allowlist: accounts that set up a key at their next sign-in"),
        ("exclusion", "the exclusion list: accounts that sign in without 2FA"),
    )
    for name, help_text in lists:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        actions = cmd.add_subparsers(dest="action", required=True)
        for action, action_help in (
            ("list", "list the accounts on it"),
            ("add", "add an account"),
            ("remove", "remove an account"),
        ):
            sub_cmd = actions.add_parser(
                action,
                help=action_help,
                description=f"{help_text}: {action_help}",
                epilog=EXIT_CODES_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            if action != "list":
                sub_cmd.add_argument("username")
            sub_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    command(
        "reset-key",
        "reset an account's key: delete it, put the account on the allowlist, end its sessions",
    )
    command(
        "delete-key",
        "delete an internal account's key and take it off the allowlist: it is blocked",
    )
    protection = command(
        "set-protection", "turn an account's protection against unauthorized modification on/off"
    )
    protection.add_argument("setting", choices=["on", "off"])
    enroll = command(
        "enroll",
        "set up an allowlisted account's key here: shows the QR code and the otpauth:// URI, "
        "then asks for a code (stdin) and activates the key",
    )
    enroll.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    imports = command(
        "import",
        "give existing accounts the keys they already hold, from otpauth:// URIs (one per line) "
        "or a PSKC (RFC 6030) file: the whole file or nothing; the accounts are then ENROLLED",
        username=False,
    )
    imports.add_argument("file", help="the file to import; - for standard input")
    imports.add_argument(
        "--format",
        choices=[f.value for f in key_files.KeyFileFormat],
        help="the file's format (default: pskc when it starts with '<', else otpauth)",
    )
    imports.add_argument(
        "--dry-run", action="store_true", help="check everything, report, change nothing"
    )
    imports.add_argument(
        "--replace",
        action="store_true",
        help="replace the key of accounts that have one (their sessions end); else refused",
    )
    imports.add_argument(
        "--psk-file",
        metavar="FILE",
        help="PSKC encrypted with a pre-shared key (RFC 6030 6.1): a file holding the key in "
        "hex, or its raw 16/24/32 bytes",
    )
    imports.add_argument(
        "--passphrase",
        action="store_true",
        help="PSKC encrypted with a passphrase (RFC 6030 6.2, PBKDF2): read from "
        "TWOFACTOR_IMPORT_PASSPHRASE, else asked at the prompt",
    )
    imports.add_argument(
        "--key-map",
        metavar="FILE",
        help="PSKC: 'KeyId,username' lines naming the account of each key without a UserId",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log_level)
    try:
        if args.command == "serve":
            if args.workers is not None:
                config = dataclasses.replace(config, workers=args.workers)
            # Before the database starts: a busy port is the commonest first-run failure.
            ensure_can_listen(config.listen_address, LISTEN_VARIABLE, reuse_port=config.workers > 1)
            if config.console_address:
                ensure_can_listen(
                    config.console_address,
                    "TWOFACTOR_CONSOLE_ADDRESS",
                    reuse_port=config.workers > 1,
                )
            if config.workers > 1:
                return _serve_with_workers(config)
            _install_uvloop()
            asyncio.run(_serve(config))
            return EXIT_OK
        if args.command == "siem-test":
            if config.siem is None:
                raise ConfigError("TWOFACTOR_SIEM_ADDRESS is not set: there is no SIEM to test")
            sent = asyncio.run(siem_export.siem_test_command(config.siem))
            return EXIT_OK if sent else EXIT_FAILED
        if args.command == "new-encryption-key":
            print(new_key_line(f"k{uuid.uuid4().hex[:8]}"))
            return EXIT_OK
        work: dict[str, Callable[[Runtime], Awaitable[int]]] = {
            "migrate": lambda runtime: _done(),
            "create-user": lambda runtime: _create_user(runtime, args),
            "grant": lambda runtime: _change_right(runtime, args, True),
            "revoke": lambda runtime: _change_right(runtime, args, False),
            "rotate-keys": lambda runtime: key_rotation.rotate_keys_command(
                runtime, _cli_caller("RotateEncryptionKeys"), args.batch_size
            ),
            "verify-audit": lambda runtime: audit_chain.verify_command(runtime.pool, args.anchor),
            "status": lambda runtime: _status(runtime, args),
            "allowlist": lambda runtime: _list_command(runtime, args),
            "exclusion": lambda runtime: _list_command(runtime, args),
            "reset-key": lambda runtime: _reset_key(runtime, args),
            "delete-key": lambda runtime: _delete_key(runtime, args),
            "set-protection": lambda runtime: _set_protection(runtime, args),
            "enroll": lambda runtime: _enroll(runtime, args),
            "import": lambda runtime: _import(runtime, args),
        }
        return asyncio.run(_with_runtime(config, work[args.command]))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AddressUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.AccountNotFound as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except errors.TwoFactorError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.reason == errors.AccountNotFound.reason:
            return EXIT_NOT_FOUND  # an import file naming an unknown account
        return EXIT_USAGE if isinstance(exc, errors.InvalidArgument) else EXIT_REFUSED
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: database unavailable ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILED


async def _done() -> int:
    return EXIT_OK


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at heart
        return
    uvloop.install()


if __name__ == "__main__":
    sys.exit(main())
