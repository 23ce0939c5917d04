"""Public identifiers: 26 Crockford base32 characters of milliseconds and randomness."""

from __future__ import annotations

import time

from store import ids


def _by_arithmetic(value: int) -> str:
    """The id's body as its definition states it: 130 bits, 5 at a time, most significant first."""
    return "".join(ids._ALPHABET[(value >> shift) & 31] for shift in range(125, -5, -5))


def test_an_id_is_its_time_and_randomness_in_base32(monkeypatch):
    monkeypatch.setattr(ids.time, "time", lambda: 1_700_000_000.123)
    randomness = bytes(range(246, 256))
    monkeypatch.setattr(ids.os, "urandom", lambda n: randomness[:n])
    value = (1_700_000_000_123 << 80) | int.from_bytes(randomness, "big")
    assert ids.new_id("msg") == f"msg_{_by_arithmetic(value)}"


def test_ids_sort_by_creation_time():
    first = ids.new_id("msg")
    time.sleep(0.002)
    second = ids.new_id("msg")
    assert first < second
    assert len(first) == len("msg_") + 26
