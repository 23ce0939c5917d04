"""Coarse deadlines: the delivery engine's many timeouts served by one timer per loop.

`asyncio.timeout` arms a loop timer when it is entered, and moving or leaving it cancels that
timer. The engine opens two deadlines per message (the attempt, and the pipelined exchange, moved
on for the reply after the final dot): in a drain that was 12% of the service loop's time. Here a
deadline is an `asyncio.Timeout` without a timer of its own, and one timer, run every `TICK`
seconds while any deadline is open, expires those whose time has passed through the Timeout's own
`reschedule`, so asyncio cancels the task and turns that into `TimeoutError` exactly as for
`asyncio.timeout` (an outside cancellation stays a cancellation, nesting works). A deadline fires
up to one tick late: fine for SMTP timeouts counted in seconds.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: How often open deadlines are checked, in seconds: how late one may fire at most.
TICK = 0.1


class Deadlines:
    """The open deadlines of one event loop, and the timer that expires them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._open: dict[asyncio.Timeout, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def open_count(self) -> int:
        return len(self._open)

    def is_ticking(self) -> bool:
        return self._timer is not None

    def _add(self, timeout: asyncio.Timeout, when: float) -> None:
        self._open[timeout] = when
        if self._timer is None:
            self._timer = self._loop.call_later(TICK, self._expire)

    def _remove(self, timeout: asyncio.Timeout) -> None:
        self._open.pop(timeout, None)

    def _expire(self) -> None:
        now = self._loop.time()
        passed = [timeout for timeout, when in self._open.items() if when <= now]
        for timeout in passed:
            del self._open[timeout]
            timeout.reschedule(now)  # asyncio cancels the task on the loop's next turn
        # The timer runs only while a deadline is open: an idle service is not woken for it.
        self._timer = self._loop.call_later(TICK, self._expire) if self._open else None


_current: Deadlines | None = None


def deadlines() -> Deadlines:
    """The running loop's deadlines: a process runs one loop, so one object is kept, and a new
    one made when the loop changes (tests). A deadline keeps the object it was entered with, so
    one still open on an earlier loop is expired by that loop's own timer."""
    global _current
    loop = asyncio.get_running_loop()
    if _current is None or _current._loop is not loop:
        _current = Deadlines(loop)
    return _current


class Deadline:
    """`async with Deadline(delay):` as `async with asyncio.timeout(delay):`, on the shared
    timer; `move_to` is `Timeout.reschedule` (a loop time)."""

    __slots__ = ("_delay", "_owner", "_timeout")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._timeout = asyncio.Timeout(None)  # no timer of its own: the shared one expires it
        self._owner: Deadlines | None = None

    async def __aenter__(self) -> Deadline:
        owner = self._owner = deadlines()
        await self._timeout.__aenter__()
        owner._add(self._timeout, owner._loop.time() + self._delay)
        return self

    def move_to(self, when: float) -> None:
        """Let the deadline pass at loop time `when` instead."""
        assert self._owner is not None, "the deadline was not entered"
        if self._timeout in self._owner._open:  # not already expiring
            self._owner._add(self._timeout, when)

    def expired(self) -> bool:
        return self._timeout.expired()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._owner is not None
        self._owner._remove(self._timeout)
        await self._timeout.__aexit__(exc_type, exc, traceback)  # raises TimeoutError if it expired
