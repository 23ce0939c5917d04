"""Throttles for the SMTP front door: concurrent sessions and failed AUTH attempts, per client.

Owns two pure decisions with an injected clock and no I/O: whether a new session may start
(`SessionLimits`, Postfix's anvil connection counts) and how a client that keeps failing AUTH is
slowed down and then locked out for a while (`AuthThrottle`). Clients are counted by `client_key`:
an IPv4 address, or the /64 an IPv6 address belongs to (one subscriber's usual allocation, so
rotating addresses inside it gains nothing). `relay/submission.py` asks and acts on the answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

Clock = Callable[[], float]
V = TypeVar("V")

# Clients tracked at most, per table; past this the least recently failing go first. Measured:
# about 300 bytes per client, so this bounds the throttle near 15 MB whatever a botnet does.
MAX_TRACKED_CLIENTS = 50_000


def client_key(host: str) -> str:
    """The unit a client is counted in: its IPv4 address or its IPv6 /64 (mapped IPv4 unwrapped)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SessionLimits:
    """Counts open sessions in all and per client; refuses past `max_total` / `max_per_client`."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._per_client: dict[str, int] = {}

    def admit(self, client: str, *, is_exempt_per_client: bool = False) -> bool:
        """Count a new session if the limits allow it; False means refuse it."""
        if self.total >= self.max_total:
            return False
        count = self._per_client.get(client, 0)
        if not is_exempt_per_client and count >= self.max_per_client:
            return False
        self.total += 1
        self._per_client[client] = count + 1
        return True

    def release(self, client: str) -> None:
        """Forget one session of `client` (call once per admitted session)."""
        self.total = max(0, self.total - 1)
        count = self._per_client.get(client, 0) - 1
        if count > 0:
            self._per_client[client] = count
        else:
            self._per_client.pop(client, None)

    def open_sessions(self, client: str) -> int:
        return self._per_client.get(client, 0)


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """After a failed AUTH: wait `delay` seconds, then answer; lock out the client if locked."""

    delay: float
    is_locked: bool


class AuthThrottle:
    """Failed AUTH attempts per client: each failure is answered more slowly, and the
    `max_failures`-th within `window` seconds of the first locks the client out for `lockout`.

    The n-th failure in the window waits `delay * n` before its reply (a guesser gets fewer tries
    per connection and per minute); a lock-out ends on its own, and a success clears the history.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        delay: float,
        lockout: float,
        clock: Clock,
        max_tracked: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.delay = delay
        self.lockout = lockout
        self._clock = clock
        self._max_tracked = max_tracked
        # client → (start of its window, failures in it): a fixed window from the first failure,
        # a few dozen bytes per client where a list of timestamps would be hundreds.
        self._failures: dict[str, tuple[float, int]] = {}
        self._locked_until: dict[str, float] = {}

    def is_locked(self, client: str) -> bool:
        until = self._locked_until.get(client)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._locked_until[client]
        return False

    def record_failure(self, client: str) -> AuthVerdict:
        now = self._clock()
        since, count = self._failures.pop(client, (now, 0))
        if now - since >= self.window:
            since, count = now, 0
        count += 1
        if count >= self.max_failures:
            self._locked_until[client] = now + self.lockout
            _trim(self._locked_until, self._max_tracked)
            return AuthVerdict(delay=self.delay * count, is_locked=True)
        self._failures[client] = (since, count)  # re-inserted: ordered by last failure
        _trim(self._failures, self._max_tracked)
        return AuthVerdict(delay=self.delay * count, is_locked=False)

    def record_success(self, client: str) -> None:
        self._failures.pop(client, None)


def _trim(table: dict[str, V], limit: int) -> None:
    # Oldest first: dicts keep insertion order, and entries are re-inserted when touched.
    while len(table) > limit:
        del table[next(iter(table))]
