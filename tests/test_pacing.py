"""Pacing arithmetic with an injected clock: concurrency, rate, dead-destination backoff."""

from __future__ import annotations

import pytest

from relay.pacing import Limits, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pacer(clock: Clock, limits: dict[str, Limits] | None = None, **kwargs: float) -> Pacer:
    table = limits or {}
    default = Limits(max_connections=3)
    return Pacer(lambda d: table.get(d, default), default, table, clock=clock, **kwargs)


def test_concurrency_cap_per_destination():
    clock = Clock()
    p = pacer(clock)
    assert p.room("a.test") == 3
    for _ in range(3):
        p.started("a.test")
    assert p.room("a.test") == 0
    assert p.room("b.test") == 3  # one busy destination does not limit another
    p.finished("a.test", is_unreachable=False)
    assert p.room("a.test") == 1


def test_rooms_lists_known_and_overridden_destinations():
    clock = Clock()
    p = pacer(clock, {"gmail.test": Limits(max_connections=1)})
    p.started("a.test")
    rooms, default = p.rooms()
    assert rooms == {"a.test": 2, "gmail.test": 1}
    assert default == 3
    p.finished("a.test", is_unreachable=False)
    rooms, _ = p.rooms()
    assert "a.test" not in rooms  # idle destinations are forgotten: memory stays bounded


@pytest.mark.parametrize(
    ("elapsed", "room"),
    [(0.0, 0), (0.5, 0), (1.0, 1), (2.5, 2), (100.0, 3)],  # 1 msg/s, burst = max_connections
)
def test_message_rate_token_bucket(elapsed: float, room: int):
    clock = Clock()
    p = pacer(clock, {"slow.test": Limits(max_connections=3, message_rate=1.0)})
    for _ in range(3):
        p.started("slow.test")
        p.finished("slow.test", is_unreachable=False)
    clock.now += elapsed
    assert p.room("slow.test") == room


@pytest.mark.parametrize(
    ("failures", "paused_for"),
    [(1, 10.0), (2, 20.0), (3, 25.0), (6, 25.0)],  # doubling, capped at the first retry step
)
def test_dead_destination_backoff(failures: int, paused_for: float):
    clock = Clock()
    p = pacer(clock, backoff=10.0, backoff_cap=25.0)
    for _ in range(failures):
        p.started("dead.test")
        p.finished("dead.test", is_unreachable=True)
    assert p.room("dead.test") == 0 and p.is_backed_off("dead.test")
    clock.now += paused_for - 0.001
    assert p.room("dead.test") == 0
    clock.now += 0.002
    assert p.room("dead.test") == 3


def test_reaching_a_host_clears_the_backoff():
    clock = Clock()
    p = pacer(clock, backoff=10.0, backoff_cap=60.0)
    p.started("x.test")
    p.finished("x.test", is_unreachable=True)
    clock.now += 10.0
    p.started("x.test")
    p.finished("x.test", is_unreachable=False)
    p.started("x.test")
    p.finished("x.test", is_unreachable=True)
    clock.now += 10.0  # back to the first step, not 20 s
    assert p.room("x.test") == 3
