"""Benchmark: Postroom's memory with a large queue that is not due yet.

For each size S (default: 10,000; the issue's full run: 10,000 100,000 1,000,000) it pre-queues
S delivery units — messages of R recipients each (default 100, the default per-message limit),
scheduled a day ahead, straight into the spool through intake (bench/_prequeue.py) — then starts
`postroom serve` on that spool, lets it run for a while (the engine polls, /metrics reads the
queue summary every second), and reports its RSS then and its peak RSS (VmHWM) since start.
Memory must not grow with the queue: everything is read in bounded batches through indexes.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/memory.py                              # 10,000 units
    .venv/bin/python bench/memory.py --sizes 10000 100000 1000000 # full size (minutes, ~1 GB disk)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom
import _prequeue

BODY = "A small message: the units are what is measured, not the bytes.\r\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure Postroom's RSS with a large queue.")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000], help="queued units (10000)"
    )
    parser.add_argument(
        "--recipients", type=int, default=100, help="recipients (units) per message (100)"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds serve runs before measuring (10)"
    )
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.sizes) or not 1 <= args.recipients <= 100:
        parser.error("sizes must be at least 1; --recipients from 1 to 100")
    return args


def measure(args: argparse.Namespace, units: int) -> tuple[int | None, int | None]:
    per = args.recipients
    messages = -(-units // per)
    due = time.time() + 86400

    def make(i: int) -> _prequeue.Submission:
        count = min(per, units - i * per)
        recipients = tuple(f"u{i}-{j}@d{j % 100:03d}.bench.test" for j in range(count))
        return _prequeue.Submission(
            "bench@acme.test",
            recipients,
            _prequeue.message_bytes(i, recipients[0], BODY),
            _prequeue.Source.API,
            scheduled_at=due,
        )

    def prepare(server: _postroom.PrivatePostroom) -> None:
        started = time.perf_counter()
        _prequeue.prequeue(server.config_path, messages, make, progress=units >= 100_000)
        print(
            f"  {units} units ({messages} messages) queued in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )

    with _postroom.PrivatePostroom(prepare=prepare) as server:
        rss_at_start = _postroom.read_status_kib(server.pid, "VmRSS")
        deadline = time.monotonic() + args.settle
        headers = {"Authorization": f"Bearer {server.key}"}
        with httpx.Client(base_url=server.api_url, headers=headers, timeout=60) as client:
            while time.monotonic() < deadline:
                # What a monitoring system does: the metrics (with the queue summary), readiness.
                client.get("/metrics").raise_for_status()
                client.get("/readyz").raise_for_status()
                time.sleep(1.0)
        rss = _postroom.read_status_kib(server.pid, "VmRSS")
        workers = [
            _postroom.read_status_kib(pid, "VmRSS") or 0
            for pid in _postroom.family(server.pid)[1:]
        ]
        peak = server.peak_rss_kib()
        print(
            f"  {units:>9} units: RSS {_postroom.mib(rss)} after {args.settle:g} s "
            f"(at start {_postroom.mib(rss_at_start)}), SMTP workers "
            f"{' + '.join(_postroom.mib(w) for w in workers) or 'none'}; "
            f"peak (VmHWM, service + workers) {_postroom.mib(peak)}",
            flush=True,
        )
    return rss, peak


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"memory: sizes {', '.join(map(str, args.sizes))} units, {args.recipients} per message, "
        f"scheduled a day ahead; machine: {os.cpu_count()} CPUs"
    )
    results = [(size, *measure(args, size)) for size in args.sizes]
    print("summary (target: peak <= 150 MB at 1,000,000 units, flat as the queue grows):")
    for size, rss, peak in results:
        print(f"  {size:>9} units: service RSS {_postroom.mib(rss)}, peak with the workers "
              f"{_postroom.mib(peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
