"""What every operation needs at hand: configuration, the pool, the key ring and the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

from twofactor_service.config import Config
from twofactor_service.encryption import KeyRing
from twofactor_service.passwords import PasswordChecks
from twofactor_service.rules import lockout_schedule

if TYPE_CHECKING:  # imported only with tracing on (tracing.py)
    from twofactor_service.tracing import Tracing


@dataclass(frozen=True)
class Runtime:
    config: Config
    pool: asyncpg.Pool
    key_ring: KeyRing
    clock: Callable[[], float] = time.time
    # OpenTelemetry, when config.tracing turned it on; None costs the calls nothing.
    tracing: Tracing | None = None
    # Derived from the configuration once, not per call.
    lockout_schedule: list[int] = field(init=False)
    password_checks: PasswordChecks = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lockout_schedule", lockout_schedule(self.config.lockout))
        object.__setattr__(
            self,
            "password_checks",
            PasswordChecks(
                self.config.password_checks,
                self.config.password_check_queue,
                self.config.password_hash_memory_kib,
                self.config.password_hash_passes,
            ),
        )
