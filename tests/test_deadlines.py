"""The delivery engine's shared-timer deadlines behave as asyncio.timeout does."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.deadlines import TICK, Deadline, deadlines


async def test_a_deadline_cuts_off_what_overruns_it():
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with Deadline(0.05) as deadline:
            await asyncio.sleep(5)
    elapsed = time.monotonic() - started
    assert deadline.expired()
    assert 0.05 <= elapsed < 0.05 + TICK + 0.5


async def test_work_within_its_deadline_finishes_and_nothing_keeps_ticking():
    async with Deadline(5) as deadline:
        await asyncio.sleep(0.01)
    assert not deadline.expired()
    assert deadlines().open_count() == 0
    await asyncio.sleep(TICK * 2.5)
    assert not deadlines().is_ticking()  # an idle loop is not woken for deadlines


async def test_a_moved_deadline_lets_the_work_finish():
    loop = asyncio.get_running_loop()
    async with Deadline(0.05) as deadline:
        deadline.move_to(loop.time() + 5)
        await asyncio.sleep(0.3)
    assert not deadline.expired()


async def test_an_outside_cancellation_stays_a_cancellation():
    async def wait() -> None:
        async with Deadline(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_inner_deadline_expires_alone():
    async with Deadline(5) as outer:
        with pytest.raises(TimeoutError):
            async with Deadline(0.05):
                await asyncio.sleep(5)
        await asyncio.sleep(0.01)  # the outer one still runs, and still holds
    assert not outer.expired()
    assert deadlines().open_count() == 0
