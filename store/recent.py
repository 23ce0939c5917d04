"""Small reads every request makes, kept for a moment: a key's principal, a domain's sender name.

Every API request looks its key up and every send its sender's default name. Each lookup is a
point read of a few microseconds, but it is made on the service's loop, where SQLite lets go of
the interpreter lock at each step and the loop then waits for the spool writer's thread to hand
it back: under load that wait, not the read, is most of what a lookup costs (23 µs of the loop's
time on average, 184 µs at the 99th percentile, for a read of 9 µs of CPU). `Recent` keeps what a
read found for at most `api.lookup_cache_ttl` (one second by default).

What this process writes itself drops what it kept before it answers (`Recent.drop`): a key
revoked through the API fails at its next use. What another process writes (`postroom keys
revoke`, the CLI's domain commands) is seen within that time. Only what a read found is kept:
an unknown or revoked key is looked up every time, so a key made meanwhile works at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

class Recent(Generic[K, V]):
    """What reads found, each kept for `ttl` seconds; at most `limit` of them (all dropped when
    full: they are read again soon anyway)."""

    def __init__(
        self, ttl: float, limit: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._kept: dict[K, tuple[float, V]] = {}
        #: Counts `drop`s: a read that began before one does not keep what it found.
        self.generation = 0

    def get(self, key: K) -> tuple[bool, V | None]:
        """(True, the value) while it is kept, else (False, None)."""
        kept = self._kept.get(key)
        if kept is None:
            return False, None
        until, value = kept
        if self._clock() >= until:
            del self._kept[key]
            return False, None
        return True, value

    def keep(self, key: K, value: V, generation: int) -> None:
        """Keep what a read found, unless a `drop` came since `generation` (taken before it)."""
        if generation != self.generation:
            return
        if len(self._kept) >= self._limit and key not in self._kept:
            self._kept.clear()
        self._kept[key] = (self._clock() + self._ttl, value)

    def drop(self) -> None:
        """Forget everything: this process changed what was read."""
        self._kept.clear()
        self.generation += 1
