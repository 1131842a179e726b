"""Background tasks end when the server stops, even one that loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from twofactor_service import background


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again_and_ends() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as a library racing with an inner wait can do on Python 3.11
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # it runs up to its first wait
    async with asyncio.timeout(10):  # one cancellation only would wait forever
        await background.end(task)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_what_a_task_failed_with_is_raised() -> None:
    async def failing() -> None:
        raise LookupError("broken")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(LookupError, match="broken"):
        await background.end(task)
