"""Bounded waits that never lose a cancellation, on every Python the project supports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def wait_at_most(awaitable: Awaitable[object], timeout: float | None) -> bool:
    """Await `awaitable` for at most `timeout` seconds (None: no limit); True if it finished.

    Built on asyncio.wait, which ends by itself at the timeout without cancelling anything
    and lets a cancellation of the caller through. The two obvious tools do not, on 3.11:
    asyncio.wait_for can swallow a cancellation that meets its own end (a quit that hangs),
    and asyncio.timeout counts on the task's cancellation count, which a failed TaskGroup
    leaves off by one on early 3.11 releases such as Debian 12's 3.11.2 (the timeout then
    raised CancelledError instead of TimeoutError and ended the engine after a dropped
    connection). Whatever is still pending at the timeout is cancelled.
    """
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    finally:
        if not future.done():
            future.cancel()
    return bool(done)
