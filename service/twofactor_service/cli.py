"""The `twofactor` command: serve, migrate, and the operator's bootstrap commands."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from twofactor_service import administration, errors, logs, rules
from twofactor_service.caller import Caller
from twofactor_service.config import Config, ConfigError, load_config
from twofactor_service.encryption import load_key_ring, new_key_line
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.server import start_server
from twofactor_service.store import database
from twofactor_service.store.accounts import AccountRecord
from twofactor_service.store.migrations import migrate

log = logging.getLogger("twofactor_service")

# Exit codes scripts can rely on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4, 5


def database_url(config: Config) -> str:
    if config.database_url:
        return config.database_url
    return database.start_embedded(config.data_dir)


async def _open_runtime(config: Config) -> Runtime:
    key_ring, notice = load_key_ring(config)
    if notice:
        log.warning(notice)
    pool = await database.create_pool(database_url(config), config.database_pool_size)
    async with pool.acquire() as conn:
        applied = await migrate(conn)
    if applied:
        log.info("database migrated", extra={"migrations": applied})
    return Runtime(config=config, pool=pool, key_ring=key_ring)


async def _serve(config: Config) -> None:
    runtime = await _open_runtime(config)
    running = await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)
    log.info("serving", extra={"address": config.listen_address, "port": running.port})
    print(
        f"TwoFactorService listening on {config.listen_address}.\n"
        "Create the first administrator (in another terminal):\n"
        "  .venv/bin/twofactor create-user admin --password 'choose-a-long-one' --admin\n"
        "then sign in with SignIn and set up the key it hands out.",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop(grace=10)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twofactor",
        description="TwoFactorService: serve the gRPC API, or administer accounts from the shell. "
        "Configuration comes from TWOFACTOR_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="migrate the database and serve the gRPC API")
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
    return parser


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
            _install_uvloop()
            asyncio.run(_serve(config))
            return EXIT_OK
        if args.command == "new-encryption-key":
            print(new_key_line(f"k{uuid.uuid4().hex[:8]}"))
            return EXIT_OK
        work: dict[str, Callable[[Runtime], Awaitable[int]]] = {
            "migrate": lambda runtime: _done(),
            "create-user": lambda runtime: _create_user(runtime, args),
            "grant": lambda runtime: _change_right(runtime, args, True),
            "revoke": lambda runtime: _change_right(runtime, args, False),
        }
        return asyncio.run(_with_runtime(config, work[args.command]))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except errors.AccountNotFound as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except errors.TwoFactorError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
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
