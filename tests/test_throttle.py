"""The front door's throttles: session counts and AUTH failures, with a clock we move by hand."""

from __future__ import annotations

import pytest

from relay.throttle import AuthThrottle, SessionLimits, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_client_key(host: str, key: str):
    assert client_key(host) == key


def test_session_limits_count_in_all_and_per_client():
    limits = SessionLimits(max_total=3, max_per_client=2)
    assert limits.admit("a") and limits.admit("a")
    assert not limits.admit("a"), "third session of one client"
    assert limits.admit("b")
    assert not limits.admit("c"), "over the total"
    limits.release("a")
    assert limits.admit("c")
    assert limits.total == 3 and limits.open_sessions("a") == 1


def test_exempt_clients_skip_the_per_client_limit_only():
    limits = SessionLimits(max_total=3, max_per_client=1)
    assert all(limits.admit("trusted", is_exempt_per_client=True) for _ in range(3))
    assert not limits.admit("trusted", is_exempt_per_client=True), "the total still holds"


def test_release_never_goes_negative():
    limits = SessionLimits(max_total=1, max_per_client=1)
    limits.release("ghost")
    assert limits.total == 0 and limits.open_sessions("ghost") == 0


# Each case: a script of (seconds to advance, action) and the expected result of each action.
# "fail" → (delay, is_locked); "locked?" → bool; "ok" → None.
CASES = {
    "delays grow with each failure, then lock": [
        (0, "fail", (1.0, False)), (0, "fail", (2.0, False)), (0, "fail", (3.0, True)),
        (0, "locked?", True),
    ],
    "the lock ends after the lockout": [
        (0, "fail", (1.0, False)), (0, "fail", (2.0, False)), (0, "fail", (3.0, True)),
        (899, "locked?", True), (1, "locked?", False),
        (0, "fail", (1.0, False)),
    ],
    "failures older than the window are forgotten": [
        (0, "fail", (1.0, False)), (0, "fail", (2.0, False)),
        (600, "fail", (1.0, False)), (1, "fail", (2.0, False)), (0, "locked?", False),
    ],
    "a success clears the history": [
        (0, "fail", (1.0, False)), (0, "fail", (2.0, False)), (0, "ok", None),
        (0, "fail", (1.0, False)), (0, "locked?", False),
    ],
}


@pytest.mark.parametrize("script", CASES.values(), ids=CASES.keys())
def test_auth_throttle(script: list[tuple[float, str, object]]):
    clock = Clock()
    throttle = AuthThrottle(max_failures=3, window=600, delay=1.0, lockout=900, clock=clock)
    for step, (advance, action, expected) in enumerate(script):
        clock.now += advance
        if action == "fail":
            verdict = throttle.record_failure("198.51.100.1")
            assert (verdict.delay, verdict.is_locked) == expected, step
        elif action == "locked?":
            assert throttle.is_locked("198.51.100.1") is expected, step
        else:
            throttle.record_success("198.51.100.1")


def test_one_client_locked_out_leaves_the_others_alone():
    clock = Clock()
    throttle = AuthThrottle(max_failures=2, window=60, delay=0, lockout=60, clock=clock)
    throttle.record_failure("a")
    throttle.record_failure("a")
    throttle.record_failure("b")
    assert throttle.is_locked("a")
    assert not throttle.is_locked("b")


def test_tracked_clients_are_bounded():
    clock = Clock()
    throttle = AuthThrottle(
        max_failures=2, window=60, delay=0, lockout=60, clock=clock, max_tracked=3
    )
    for n in range(10):
        throttle.record_failure(f"c{n}")
    # The oldest histories were dropped: c0's next failure is its first again.
    assert throttle.record_failure("c0").is_locked is False
    assert throttle.record_failure("c9").is_locked is True
