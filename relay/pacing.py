"""Pacing and fairness: how much delivery work each destination may start now.

Owns per-destination state (attempts in flight, a message-rate token bucket, dead-destination
backoff) and the arithmetic the engine asks before it claims: `rooms()` says how many units each
destination may start, so the spool claims only what can start now (Postfix qmgr's concurrency
and rate windows). Pure: no I/O, no asyncio; the clock is injected. The global connection limit
is the engine's (its own count of running attempts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """One destination's pacing: concurrent attempts, and messages per second (0: unlimited)."""

    max_connections: int
    message_rate: float = 0.0


@dataclass(slots=True)
class _State:
    active: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0
    failures: int = 0
    backoff_until: float = 0.0


class Pacer:
    """Per-destination concurrency, rate and dead-destination backoff."""

    def __init__(
        self,
        limits: Callable[[str], Limits],
        default: Limits,
        overridden: Mapping[str, Limits] | None = None,
        backoff: float = 30.0,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._default = default
        self._overridden = dict(overridden or {})
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._clock = clock
        self._states: dict[str, _State] = {}

    def reconfigure(
        self,
        default: Limits,
        overridden: Mapping[str, Limits],
        backoff: float,
        backoff_cap: float,
    ) -> None:
        """New limits (SIGHUP); connections held and buckets keep their state."""
        self._default = default
        self._overridden = dict(overridden)
        self._backoff = backoff
        self._backoff_cap = backoff_cap

    def _state(self, destination: str) -> _State:
        state = self._states.get(destination)
        if state is None:
            limits = self._limits(destination)
            state = _State(tokens=float(limits.max_connections), refilled_at=self._clock())
            self._states[destination] = state
        return state

    def room(self, destination: str) -> int:
        """How many attempts `destination` may start now.

        The rule: never more than `max_connections` at once; with a message rate, no more than
        the bucket's whole tokens (it refills at `message_rate` per second up to
        `max_connections`); none while the destination is backed off as dead.
        """
        state = self._states.get(destination)
        limits = self._limits(destination)
        if state is None:
            return limits.max_connections
        now = self._clock()
        if now < state.backoff_until:
            return 0
        room = limits.max_connections - state.active
        if limits.message_rate > 0:
            self._refill(state, limits, now)
            room = min(room, math.floor(state.tokens))
        return max(room, 0)

    def rooms(self) -> tuple[dict[str, int], int]:
        """(room of every destination with state or overrides, room of any other destination)."""
        for name, state in list(self._states.items()):
            if self.room(name) >= 0:  # refills the bucket
                self._forget_idle(name, state)
        names = set(self._states) | set(self._overridden)
        return {name: self.room(name) for name in names}, self._default_room()

    def _default_room(self) -> int:
        return self._default.max_connections

    def started(self, destination: str) -> None:
        """An attempt to `destination` started: it holds a connection and spends a token."""
        state = self._state(destination)
        limits = self._limits(destination)
        if limits.message_rate > 0:
            self._refill(state, limits, self._clock())
            state.tokens -= 1
        state.active += 1

    def finished(self, destination: str, is_unreachable: bool) -> None:
        """An attempt ended; `is_unreachable` when no host of the destination could be reached.

        Dead-destination backoff: after an attempt that reached no host, the destination is not
        tried for `backoff`, doubling on each further such attempt, but never for longer than
        `backoff_cap` (the first retry step: a message never waits past its own retry time
        because its destination is paused). Any attempt that reaches a host clears it.
        """
        state = self._state(destination)
        state.active = max(state.active - 1, 0)
        if is_unreachable:
            state.failures += 1
            delay = min(self._backoff * 2 ** (state.failures - 1), self._backoff_cap)
            state.backoff_until = self._clock() + delay
        else:
            state.failures = 0
            state.backoff_until = 0.0
        self._forget_idle(destination, state)

    def is_backed_off(self, destination: str) -> bool:
        state = self._states.get(destination)
        return state is not None and self._clock() < state.backoff_until

    def _refill(self, state: _State, limits: Limits, now: float) -> None:
        burst = float(limits.max_connections)
        state.tokens = min(burst, state.tokens + (now - state.refilled_at) * limits.message_rate)
        state.refilled_at = now

    def _forget_idle(self, destination: str, state: _State) -> None:
        """Memory does not grow with the number of destinations ever seen."""
        limits = self._limits(destination)
        full = limits.message_rate <= 0 or state.tokens >= limits.max_connections
        if state.active == 0 and state.failures == 0 and full:
            self._states.pop(destination, None)
