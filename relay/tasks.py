"""Small pieces the long-lived workers share: waking on the first of several conditions, and
draining the tasks they started.

The delivery engine and the webhook dispatcher both sleep until work may be there (a spool
wake-up, a freed slot, a stop request, or a polling timeout) and both stop by letting their
running tasks finish within a deadline and cancelling the rest (which give their leases back).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable


async def first_of(awaitables: Iterable[Awaitable[object]], timeout: float) -> None:  # noqa: ASYNC109
    """Return when any of `awaitables` completes or `timeout` passes; cancel the others."""
    waiters = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def drain(running: Iterable[asyncio.Task[None]], timeout: float) -> None:  # noqa: ASYNC109
    """Let `running` tasks finish within `timeout`; cancel what is left and wait for it."""
    tasks = set(running)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)
