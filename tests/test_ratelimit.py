"""Rate limits: the token bucket's arithmetic (clock injected), headers and 429 over HTTP."""

from __future__ import annotations

import pytest

from api.ratelimit import Buckets, RateLimits, TokenBucket
from store import Scope
from tests.conftest import Running


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("name", "per_minute", "steps", "expected"),
    [
        # steps: (seconds to advance, take?) → (allowed, remaining, reset, retry_after) of the last
        ("first request", 60, [(0, True)], (True, 59, 1, 0)),
        ("burst spends the bucket", 3, [(0, True)] * 3, (True, 0, 60, 0)),
        ("over the limit", 3, [(0, True)] * 4, (False, 0, 60, 20)),
        ("refill after a third of a minute", 3, [(0, True)] * 3 + [(20, True)], (True, 0, 60, 0)),
        ("partly refilled", 3, [(0, True)] * 3 + [(10, True)], (False, 0, 50, 10)),
        ("full again after a minute", 3, [(0, True)] * 3 + [(60, False)], (True, 3, 0, 0)),
        ("never above the limit", 2, [(0, True), (600, False)], (True, 2, 0, 0)),
        ("a clock going back adds nothing", 2, [(0, True), (-30, True)], (True, 0, 60, 0)),
    ],
)
def test_token_bucket(name: str, per_minute: int, steps: list[tuple[float, bool]],
                      expected: tuple[bool, int, int, int]):
    clock = Clock()
    bucket = TokenBucket(per_minute, clock.now)
    decision = None
    for advance, take in steps:
        clock.now += advance
        decision = bucket.take(clock.now) if take else bucket.peek(clock.now)
    assert decision is not None
    got = (decision.allowed, decision.remaining, decision.reset, decision.retry_after)
    assert got == expected, name


def test_bucket_table_is_bounded_and_follows_limit_changes():
    table = Buckets(capacity=2)
    first = table.bucket("a", 5, 0.0)
    first.take(0.0)
    table.bucket("b", 5, 0.0)
    table.bucket("c", 5, 0.0)
    assert len(table) == 2
    assert table.bucket("a", 5, 0.0).is_full  # "a" was dropped: a fresh bucket
    assert table.bucket("a", 7, 0.0).per_minute == 7


def test_failed_authentications_close_the_gate_per_address():
    clock = Clock()
    limits = RateLimits(auth_failures_per_minute=2, clock=clock)
    for _ in range(2):
        assert limits.auth_allowed("192.0.2.1").allowed
        limits.auth_failed("192.0.2.1")
    assert not limits.auth_allowed("192.0.2.1").allowed
    assert limits.auth_allowed("192.0.2.2").allowed
    clock.now += 30
    assert limits.auth_allowed("192.0.2.1").allowed


async def test_a_limited_key_gets_headers_and_then_429(postroom: Running):
    limited = await postroom.spool.create_key("limited", Scope.FULL, rate_limit=2)
    async with postroom.http(limited.secret) as client:
        first = await client.get("/v1/messages")
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit"] == "2"
        assert first.headers["x-ratelimit-remaining"] == "1"
        assert int(first.headers["x-ratelimit-reset"]) in range(1, 61)
        missing = await client.get("/v1/messages/msg_nope")  # errors carry them too
        assert missing.status_code == 404 and missing.headers["x-ratelimit-remaining"] == "0"
        over = await client.get("/v1/messages")
    assert over.status_code == 429
    assert over.json()["error"] == "too_many_requests"
    assert int(over.headers["retry-after"]) >= 1
    assert over.headers["x-ratelimit-remaining"] == "0"
    async with postroom.http(await postroom.new_key()) as client:
        unlimited = await client.get("/v1/messages")
    assert unlimited.status_code == 200 and "x-ratelimit-limit" not in unlimited.headers


async def test_the_global_limit_and_a_key_that_opts_out(start):
    postroom = await start(api={"rate_limit_per_minute": 1})
    free = await postroom.spool.create_key("free", Scope.FULL, rate_limit=0)
    async with postroom.http(await postroom.new_key()) as client:
        assert (await client.get("/v1/messages")).headers["x-ratelimit-limit"] == "1"
        assert (await client.get("/v1/messages")).status_code == 429
    async with postroom.http(free.secret) as client:
        for _ in range(3):
            r = await client.get("/v1/messages")
            assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers


async def test_failed_authentication_is_limited_before_any_lookup(start):
    postroom = await start(api={"auth_failures_per_minute": 2})
    good = await postroom.new_key()
    async with postroom.http("pr_wrong") as client:
        for _ in range(2):
            assert (await client.get("/v1/messages")).status_code == 401
        blocked = await client.get("/v1/messages")
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    async with postroom.http(good) as client:  # the address is blocked, whatever the key
        assert (await client.get("/v1/messages")).status_code == 429
