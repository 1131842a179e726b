"""What every operation needs at hand: configuration, the pool, the key ring and the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from twofactor_service.config import Config
from twofactor_service.encryption import KeyRing
from twofactor_service.rules import lockout_schedule


@dataclass(frozen=True)
class Runtime:
    config: Config
    pool: asyncpg.Pool
    key_ring: KeyRing
    clock: Callable[[], float] = time.time
    lockout_schedule: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Computed once, not per failed attempt.
        object.__setattr__(self, "lockout_schedule", lockout_schedule(self.config.lockout))
