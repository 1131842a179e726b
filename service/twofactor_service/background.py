"""Ending the server's background tasks (the health watcher, the sealer, housekeeping, the
identity listener, the console's supervisor, the SIEM export)."""

from __future__ import annotations

import asyncio
from typing import Any

# How long a cancelled task gets before it is cancelled again.
CANCEL_AGAIN_SECONDS = 0.5


async def end(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and waits until it has ended; raises what it failed with, if anything
    but the cancellation.

    The cancellation is repeated while the task runs on: on Python 3.11 one can be lost inside
    a library (one that meets an inner wait just finishing), and a loop such as the sealer's
    then goes on to its next round. Seen once in a few runs of the suite: a server's stop()
    waited forever on its sealer."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN_SECONDS)
    if not task.cancelled():
        task.result()
