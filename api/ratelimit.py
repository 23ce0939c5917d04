"""Rate limits: token buckets per API key and per client address, and the headers they show.

Owns the pure arithmetic (a bucket of `per_minute` tokens refilled continuously, clock injected),
the bounded tables of buckets (per key, and per client address for failed authentication), and a
pure-ASGI middleware that adds the `X-RateLimit-*` headers `api/auth.py` decided on to whatever
response the request ends with — an error included. Buckets live in memory: a restart refills
them, which suits limits meant to stop runaway clients rather than to bill.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import pickled_by_fields

#: Where `authenticate` leaves the headers for the middleware, in the ASGI scope.
SCOPE_KEY = "postroom.ratelimit"
_WINDOW = 60.0


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Decision:
    """One request against a bucket: allowed or not, and what the headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until one request is allowed again (0 when allowed)

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class TokenBucket:
    """`per_minute` requests a minute, with bursts up to `per_minute`, refilled continuously."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self._tokens = float(per_minute)
        self._at = now

    def _refill(self, now: float) -> None:
        rate = self.per_minute / _WINDOW
        self._tokens = min(float(self.per_minute), self._tokens + max(0.0, now - self._at) * rate)
        self._at = max(self._at, now)

    def take(self, now: float) -> Decision:
        """Spend one token if there is one."""
        self._refill(now)
        allowed = self._tokens >= 1.0
        if allowed:
            self._tokens -= 1.0
        return self._decision(allowed)

    def peek(self, now: float) -> Decision:
        """Whether a request would be allowed, spending nothing."""
        self._refill(now)
        return self._decision(self._tokens >= 1.0)

    @property
    def is_full(self) -> bool:
        return self._tokens >= self.per_minute

    def _decision(self, allowed: bool) -> Decision:
        rate = self.per_minute / _WINDOW
        missing = self.per_minute - self._tokens
        return Decision(
            allowed=allowed,
            limit=self.per_minute,
            remaining=int(self._tokens),
            reset=math.ceil(missing / rate - 1e-9) if missing > 0 else 0,
            retry_after=0 if allowed else max(1, math.ceil((1.0 - self._tokens) / rate)),
        )


class Buckets:
    """Buckets by name (a key id, a client address), at most `capacity`, least recent dropped.

    Dropping a bucket forgets its debt; the table is sized so that only an attacker cycling
    through very many addresses reaches the bound, and then each address starts afresh.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, name: str, per_minute: int, now: float) -> TokenBucket:
        found = self._buckets.get(name)
        if found is None or found.per_minute != per_minute:  # new, or the limit changed
            found = TokenBucket(per_minute, now)
            self._buckets[name] = found
        self._buckets.move_to_end(name)
        while len(self._buckets) > self._capacity:
            self._buckets.popitem(last=False)
        return found

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimits:
    """The API's limits: requests per key, and failed authentications per client address."""

    def __init__(
        self,
        auth_failures_per_minute: int,
        clock: Callable[[], float],
        capacity: int = 10_000,
    ) -> None:
        self.clock = clock
        self.auth_failures_per_minute = auth_failures_per_minute
        self._keys = Buckets(capacity)
        self._failures = Buckets(capacity)

    def take(self, key_id: str, per_minute: int) -> Decision:
        return self._keys.bucket(key_id, per_minute, self.clock()).take(self.clock())

    def auth_allowed(self, client: str) -> Decision:
        """Whether `client` may try a key now (checked before any lookup)."""
        bucket = self._failures.bucket(client, self.auth_failures_per_minute, self.clock())
        return bucket.peek(self.clock())

    def auth_failed(self, client: str) -> None:
        self._failures.bucket(client, self.auth_failures_per_minute, self.clock()).take(
            self.clock()
        )


class RateLimitHeaders:
    """Pure-ASGI middleware: add the headers left in the scope by `authenticate` to the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            extra: dict[str, str] | None = scope.get(SCOPE_KEY)
            if message["type"] == "http.response.start" and extra:
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in extra.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
