"""Polling helper for tests: wait until a (sync or async) condition holds."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that value.

    The predicate may be a plain function or a coroutine function. Raises AssertionError with
    `message` (and the last value seen) once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (after {timeout}s; last value: {value!r})")
        await asyncio.sleep(interval)
