"""Passwords of INTERNAL accounts: argon2id (RFC 9106), off the event loop, a bounded number
at a time.

An unknown account is checked against a dummy hash, so it costs the same time as a wrong
password and sign-in reveals nothing about which accounts exist.

argon2 is meant to be expensive, so it is rationed: at most `concurrency` hashes run at once in
a process (about one per core) and at most `queue` more wait; past that a password check is
refused at once (PasswordChecksBusy: RESOURCE_EXHAUSTED with RetryInfo). The hashes run on
threads of their own in the lowest CPU class (SCHED_IDLE), so the event loop, which serves
VerifyCode and the administrators, and PostgreSQL take the CPU first and a flood of sign-ins
gets what is left. No database connection is held while a hash runs (the callers make sure of it).

Calls that come through the web console (its peer is "console:…") have a ration of their own
within that one: one hash at a time, `queue` waiting, and after each a rest of
CONSOLE_REST_FACTOR times as long as it held its place, so the console's hashes take at most a
quarter of one core's time. argon2 is memory-hard (64 MiB a hash), and the memory bandwidth and
caches it takes slow VerifyCode whatever its CPU class; the console serves people, who sign in
one at a time and seconds apart, so an anonymous flood through its port holds at most one of the
process's places a quarter of the time, and the rest stays for the backends' own sign-ins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from twofactor_service.errors import PasswordChecksBusy

T = TypeVar("T")

_hasher = PasswordHasher()
_DUMMY = "not a real password: equalises timing for unknown accounts"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


class _Hasher:
    """argon2id at one cost, with a dummy hash of that cost for unknown accounts."""

    def __init__(self, memory_kib: int, passes: int) -> None:
        self._hasher = PasswordHasher(memory_cost=memory_kib, time_cost=passes)
        self._dummy_hash = self._hasher.hash(_DUMMY)

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        try:
            matches = self._hasher.verify(stored_hash or self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return matches and stored_hash is not None


def _yield_the_cpu() -> None:
    """Puts the calling thread in Linux's SCHED_IDLE class: it runs only when no ordinary task
    wants the CPU, and gives the CPU up the moment one wakes. (At nice 19 a hash still finished
    its time slice, milliseconds, before a woken event loop or PostgreSQL backend ran; it stays
    the fallback where SCHED_IDLE is not available.)"""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, thread, 19)


class _Ration:
    """At most `concurrency` holders at once and `queue` waiting; past that, refused at once.
    With a `rest_factor`, a place held for t seconds is taken again only rest_factor * t
    seconds after it was let go (the next holder waits for it, counted as waiting)."""

    def __init__(self, concurrency: int, queue: int, rest_factor: float = 0.0) -> None:
        self._running = asyncio.Semaphore(concurrency)
        self._queue = queue
        self._waiting = 0
        self._rest_factor = rest_factor
        self._rested_at = 0.0  # event loop time

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._running.locked() and self._waiting >= self._queue:
            raise PasswordChecksBusy()
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            await self._running.acquire()
            try:
                rest = self._rested_at - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)
            except BaseException:
                self._running.release()
                raise
        finally:
            self._waiting -= 1
        taken = loop.time()
        try:
            yield
        finally:
            let_go = loop.time()
            self._rested_at = let_go + self._rest_factor * (let_go - taken)
            self._running.release()


# The calls of the web console: one hash at a time, and a rest three times as long after each,
# so they take at most a quarter of one core (see the module's docstring).
CONSOLE_CONCURRENCY = 1
CONSOLE_REST_FACTOR = 3.0


class PasswordChecks:
    """The ration of argon2 work in this process."""

    def __init__(self, concurrency: int, queue: int, memory_kib: int, passes: int) -> None:
        self._hasher = _Hasher(memory_kib, passes)
        self._process = _Ration(concurrency, queue)
        self._console = _Ration(CONSOLE_CONCURRENCY, queue, CONSOLE_REST_FACTOR)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="argon2", initializer=_yield_the_cpu
        )

    @contextlib.asynccontextmanager
    async def slot(self, *, through_console: bool = False) -> AsyncIterator[None]:
        """Holds one of the `concurrency` places for the block (and, `through_console`, the
        console's one place first); refuses at once when they are all taken and `queue`
        callers already wait."""
        async with contextlib.AsyncExitStack() as places:
            if through_console:
                await places.enter_async_context(self._console.slot())
            await places.enter_async_context(self._process.slot())
            yield

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when `password` matches; with no stored hash, spends the same time and is False.
        Call inside `slot()`."""
        return await self._run(self._hasher.verify, stored_hash, password)

    async def hash(self, password: str) -> str:
        async with self.slot():
            return await self._run(self._hasher.hash, password)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)
