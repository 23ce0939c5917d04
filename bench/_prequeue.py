"""Fill a Postroom spool directly, before `postroom serve` runs: the benchmarks' pre-queued work.

Goes through the same intake as both front doors (`Spool.accept_many`: policy, units, events,
group commits), in chunks, so a million units need neither HTTP nor SMTP round trips.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import _postroom

from config import Settings, load_settings
from store import Source, Spool, Submission

CHUNK = 1000


async def _fill(
    config_path: Path, messages: int, make: Callable[[int], Submission], progress: bool
) -> None:
    spool = await Spool.open(private_settings(config_path))
    try:
        started = time.perf_counter()
        for first in range(0, messages, CHUNK):
            batch = [make(i) for i in range(first, min(messages, first + CHUNK))]
            results = await spool.accept_many(batch)
            refused = [r for r in results if isinstance(r, Exception)]
            if refused:
                raise RuntimeError(f"intake refused {len(refused)} message(s): {refused[0]!r}")
            if progress and (first // CHUNK) % 10 == 9:
                done = first + len(batch)
                rate = done / (time.perf_counter() - started)
                print(f"  queued {done}/{messages} messages ({rate:.0f}/s)", flush=True)
    finally:
        await spool.close()


def private_settings(config_path: Path) -> Settings:
    """The settings of a benchmark's own config file, read in this process with no POSTROOM_*
    variable of the caller's environment over them (which would point the benchmark at another
    spool): those `_postroom.child_env` leaves out of the private server's environment."""
    kept = _postroom.child_env()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k not in kept}
    try:
        return load_settings(config_path, must_exist=True)
    finally:
        os.environ.update(saved)


def prequeue(
    config_path: Path, messages: int, make: Callable[[int], Submission], progress: bool = False
) -> None:
    """Accept `messages` submissions `make(0)`, `make(1)`, ... into the spool of that config."""
    asyncio.run(_fill(config_path, messages, make, progress))


def domain(i: int) -> str:
    """The benchmarks' i-th destination domain."""
    return f"d{i:03d}.bench.test"


def spread(domains: int, body: str, sender: str) -> Callable[[int], Submission]:
    """`make` for `prequeue`: message i has one recipient, at `domain(i % domains)`, as the
    drain benchmarks queue them."""

    def make(i: int) -> Submission:
        recipient = f"user{i}@{domain(i % domains)}"
        return Submission(
            sender, (recipient,), message_bytes(i, recipient, body, sender), Source.API
        )

    return make


def message_bytes(i: int, recipient: str, body: str, sender: str = "bench@acme.test") -> bytes:
    return (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: bench #{i}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <bench-{i}-{time.time_ns()}@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n" + body
    ).encode("ascii")


__all__ = ["Source", "Submission", "domain", "message_bytes", "prequeue", "spread"]
