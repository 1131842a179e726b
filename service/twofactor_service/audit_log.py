"""O9: reading and following the audit log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from twofactor_service import errors, rules
from twofactor_service.runtime import Runtime
from twofactor_service.store import audit
from twofactor_service.store.audit import AuditFilter, AuditRow

# How often a follower looks for new events. Polling keeps NOTIFY's commit-time global lock
# off the hot path (every verify writes an event).
WATCH_POLL_SECONDS = 0.2
WATCH_BATCH = 500


def _decode_page_token(token: str) -> int | None:
    if not token:
        return None
    # A sequence number: ASCII digits only (str.isdigit also accepts "²"), within bigint.
    if not (token.isascii() and token.isdigit()) or len(token) > 19 or int(token) >= 2**63:
        raise errors.InvalidArgument(
            "page_token", "is not a token this server returned; start again without it"
        )
    return int(token)


async def list_events(
    runtime: Runtime, where: AuditFilter, page_size: int, page_token: str
) -> tuple[list[AuditRow], str]:
    limit = rules.validate_page_size(page_size)
    before = _decode_page_token(page_token)
    for name, value in (("target_username", where.target), ("actor_username", where.actor)):
        if len(value) > rules.MAX_USERNAME_LENGTH:
            raise errors.InvalidArgument(
                name, f"must be at most {rules.MAX_USERNAME_LENGTH} characters"
            )
    if len(where.operation) > 64:
        raise errors.InvalidArgument("operation", "must be at most 64 characters")
    for name, value in (
        ("target_username", where.target),
        ("actor_username", where.actor),
        ("operation", where.operation),
    ):
        # PostgreSQL text cannot hold NUL, so no event can match it.
        if "\x00" in value:
            raise errors.InvalidArgument(name, "must not contain NUL characters")
    async with runtime.pool.acquire() as conn:
        rows = await audit.page(conn, where, before_sequence=before, limit=limit + 1)
    next_token = str(rows[limit - 1].sequence) if len(rows) > limit else ""
    return rows[:limit], next_token


async def follow(runtime: Runtime, after_sequence: int) -> AsyncIterator[AuditRow]:
    """Events after `after_sequence` (0: only new ones), then each new one, until cancelled."""
    if after_sequence < 0:
        raise errors.InvalidArgument("after_sequence", "must not be negative")
    async with runtime.pool.acquire() as conn:
        cursor = await audit.cursor_at(conn, after_sequence)
    while True:
        async with runtime.pool.acquire() as conn:
            rows, cursor = await audit.after(conn, cursor, WATCH_BATCH)
        for row in rows:
            yield row
        if len(rows) < WATCH_BATCH:
            await asyncio.sleep(WATCH_POLL_SECONDS)
