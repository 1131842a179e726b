"""Who is calling, without a query per call: the actors resolved from session tokens (and from
client certificates, transport/client_certificates.py) are cached in each process, and dropped
as soon as PostgreSQL says they changed.

Every change that can alter an actor (a session ended, a right granted or revoked, an active
key made or deleted, an account's name, kind or protection changed) makes PostgreSQL NOTIFY the
channel `twofactor_identity` with the account's id (migration 004), delivered at commit to
every process that listens. So a change is seen:

- by the replica that made it, before the call that made it answers: the authentication
  step drops the account that a changing call acted on;
- by every other replica within the notification's delivery (milliseconds), and at worst
  within `ttl_seconds` (TWOFACTOR_IDENTITY_CACHE_SECONDS, 2 s by default): an entry older than
  that is resolved again from PostgreSQL, whatever was heard;
- while a process's listening connection is down, the cache is not used at all: it is emptied
  when the connection drops, bypassed until LISTEN is back, and emptied again then (what
  changed in the gap was not heard).

A read that began before a drop does not store what it found (the epoch moved meanwhile), so
a drop is never undone by a slow read of the old state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from twofactor_service.rules import Actor

log = logging.getLogger(__name__)

CHANNEL = "twofactor_identity"
# Past this many entries the cache starts afresh: a bound on memory, not a tuning knob.
MAX_ENTRIES = 100_000
RECONNECT_SECONDS = 1.0

# A session token's hash, or ("certificate", account name) for a client certificate's account.
Key = bytes | tuple[str, str]


@dataclass(frozen=True)
class _Entry:
    actor: Actor
    cached_at: float
    # The session's own end (wall clock), None for a certificate's account.
    expires_at: float | None


class IdentityCache:
    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[Key, _Entry] = {}
        self._keys_of_account: dict[int, set[Key]] = {}
        self._account_named: dict[str, int] = {}
        # Moves on every drop: a read begun before it must not store what it saw.
        self.epoch = 0
        # Entries are served only while this process hears PostgreSQL's notifications.
        self.listening = False

    def get(self, key: Key) -> Actor | None:
        if not self.listening:
            return None
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry.cached_at > self._ttl:
            return None
        if entry.expires_at is not None and entry.expires_at <= time.time():
            return None
        return entry.actor

    def put(self, key: Key, actor: Actor, *, epoch: int, expires_at: float | None) -> None:
        """Keeps what a read begun at `epoch` found, unless something was dropped since."""
        if epoch != self.epoch or not self.listening or self._ttl <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self.clear()
            return
        self._entries[key] = _Entry(actor, self._clock(), expires_at)
        self._keys_of_account.setdefault(actor.account_id, set()).add(key)
        self._account_named[actor.username.casefold()] = actor.account_id

    def drop_account(self, account_id: int) -> None:
        self.epoch += 1
        for key in self._keys_of_account.pop(account_id, ()):
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._account_named.pop(entry.actor.username.casefold(), None)

    def drop_named(self, username: str) -> None:
        """Drops the account of that name (in any case), cached or not yet."""
        account_id = self._account_named.get(username.casefold())
        if account_id is None:
            self.epoch += 1
        else:
            self.drop_account(account_id)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._keys_of_account.clear()
        self._account_named.clear()


def _set(event: asyncio.Event, *_: object) -> None:
    event.set()


def _heard(cache: IdentityCache, payload: str) -> None:
    try:
        account_id = int(payload)
    except ValueError:
        cache.clear()  # not ours to read: drop everything rather than guess
        return
    cache.drop_account(account_id)


async def listen(cache: IdentityCache, pool: asyncpg.Pool) -> None:
    """Holds one pooled connection that LISTENs, until cancelled; the cache is served only while
    it does. A lost connection (a PostgreSQL restart, a failover) is replaced."""

    def heard(connection: object, pid: int, channel: str, payload: object) -> None:
        _heard(cache, str(payload))

    while True:
        try:
            async with pool.acquire() as conn:
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(CHANNEL, heard)
                cache.clear()  # whatever changed before LISTEN was not heard
                cache.listening = True
                log.info("identity cache listening")
                try:
                    await lost.wait()
                finally:
                    cache.listening = False
                    cache.clear()
                    if not conn.is_closed():  # stopping: UNLISTEN before the pool has it back
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(CHANNEL, heard)
            log.warning("identity cache listener lost its connection; cache bypassed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the database may be down: try again soon
            log.warning("identity cache cannot listen", extra={"error": type(exc).__name__})
        await asyncio.sleep(RECONNECT_SECONDS)
