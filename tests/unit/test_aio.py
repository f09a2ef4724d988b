"""engine.aio.wait_at_most: bounded waits that neither lose nor invent a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from hivemind_worker.engine.aio import wait_at_most


async def test_it_says_whether_the_wait_finished() -> None:
    event = asyncio.Event()
    assert await wait_at_most(event.wait(), 0.05) is False
    event.set()
    assert await wait_at_most(event.wait(), 5) is True


async def test_a_cancel_of_the_caller_goes_through() -> None:
    started = asyncio.Event()

    async def waiter() -> None:
        started.set()
        await wait_at_most(asyncio.Event().wait(), None)

    task = asyncio.create_task(waiter())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timed_wait_after_a_failed_task_group_ends_at_its_timeout() -> None:
    """What the engine does after a dropped connection: its session's TaskGroup failed, then
    it waits before reconnecting. On Debian 12's 3.11.2 asyncio.timeout raised CancelledError
    there (the group left the task's cancellation count off), and the engine ended."""

    async def fails() -> None:
        raise ConnectionError("dropped")

    async def session_then_wait() -> bool:
        with pytest.raises(ExceptionGroup):
            async with asyncio.TaskGroup() as group:
                group.create_task(fails())
                group.create_task(asyncio.sleep(10))
        return await wait_at_most(asyncio.Event().wait(), 0.05)

    assert await asyncio.create_task(session_then_wait()) is False
