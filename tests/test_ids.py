"""Public identifiers: 26 Crockford base32 characters of milliseconds and randomness."""

from __future__ import annotations

import os
import time

from store import ids


def _by_arithmetic(value: int) -> str:
    """The id's body as its definition states it: 130 bits, 5 at a time, most significant first."""
    return "".join(ids._ALPHABET[(value >> shift) & 31] for shift in range(125, -5, -5))


def test_an_id_is_its_time_and_randomness_in_base32(monkeypatch):
    monkeypatch.setattr(ids.time, "time", lambda: 1_700_000_000.123)
    randomness = bytes(range(246, 256))
    monkeypatch.setattr(ids.os, "urandom", lambda n: randomness * (n // len(randomness)))
    monkeypatch.setattr(ids, "_pool", b"")
    value = (1_700_000_000_123 << 80) | int.from_bytes(randomness, "big")
    assert ids.new_id("msg") == f"msg_{_by_arithmetic(value)}"


def test_ids_sort_by_creation_time():
    first = ids.new_id("msg")
    time.sleep(0.002)
    second = ids.new_id("msg")
    assert first < second
    assert len(first) == len("msg_") + 26


def test_ids_are_unique_and_a_forked_child_does_not_repeat_its_parents():
    made = {ids.new_id("msg") for _ in range(5000)}  # more than one pool of randomness
    assert len(made) == 5000
    ids.new_id("msg")  # the parent's pool holds randomness the child must not hand out again
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        os.write(write, ",".join(ids.new_id("msg") for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [ids.new_id("msg") for _ in range(3)]
    # The last 16 characters are randomness only (80 bits).
    assert not {i[-16:] for i in child} & {i[-16:] for i in parent}
