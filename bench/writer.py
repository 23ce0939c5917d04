"""Benchmark: the spool writer's own cost a delivery unit, with no network and no engine.

Pre-queues N messages of one recipient each to D domains through intake (bench/_prequeue.py),
then drives the spool in this process the way a drain does: each round claims up to C units over
the destinations (`Spool.claim_due`) while the outcomes of the round before are recorded
(`Spool.record_outcomes`, delivered), so that claims and outcomes share group commits and each
unit's claim and outcome land in different ones, as in `postroom serve`. It prints units a
second, the CPU a unit of the spool writer's thread and of the whole process, and peak RSS.
`deliver.py` measures the drain with everything around it; this isolates what the writer does a
unit, one part of it (bench/README.md).

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/writer.py                  # 20,000 units, a few seconds
    .venv/bin/python bench/writer.py -n 100000        # the size deliver.py drains
    .venv/bin/python bench/writer.py --busy 0.45      # beside a thread that holds the lock 45%

`--busy` measures what sharing the interpreter lock costs the writer: in `postroom serve` the
service's loop holds it about 45% of a drain's time (py-spy `--gil`).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom
import _prequeue

from store import DeliveryJob, Outcome, RecipientStatus, Reply, Spool

SENDER = "bench@acme.test"
DELIVERED = Reply(250, "2.0.0", "ok: queued as bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000, help="units (20000)")
    parser.add_argument("--domains", type=int, default=100, help="destination domains (100)")
    parser.add_argument("--claim", type=int, default=50, help="units a claim asks for (50)")
    parser.add_argument("--size", type=int, default=3000, help="approx. body bytes (3000)")
    parser.add_argument(
        "--busy", type=float, default=0.0,
        help="a thread of this process runs Python this share of the time (0-0.9), as the "
        "service's loop holds the interpreter lock beside the writer in a drain (0: none)",
    )
    parser.add_argument(
        "--stretch", type=float, default=1.0, help="ms of each --busy stretch and pause (1)"
    )
    return parser.parse_args(argv)


def keep_busy(share: float, stretch: float, stop: threading.Event) -> None:
    """Hold the interpreter lock `share` of the time: Python for that share of every `stretch`
    seconds, asleep for the rest."""
    while not stop.is_set():
        until = time.perf_counter() + share * stretch
        while time.perf_counter() < until:
            pass
        time.sleep((1 - share) * stretch)


def delivered(job: DeliveryJob) -> list[Outcome]:
    return [Outcome(r.id, RecipientStatus.DELIVERED, DELIVERED) for r in job.recipients]


def writer_cpu_seconds() -> float:
    """CPU time of this process's spool writer thread (by its Python name), from /proc."""
    for thread in threading.enumerate():
        if thread.name == "spool-writer" and thread.native_id is not None:
            try:
                stat = Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text()
            except OSError:
                break
            return int(stat.split()[0]) / 1e9
    return float("nan")


async def drive(config_path: Path, claim: int) -> tuple[int, float, float, float]:
    """Claim and record until nothing is due; (units recorded, wall s, writer CPU s, CPU s)."""
    spool = await Spool.open(_prequeue.private_settings(config_path))
    try:
        previous: list[DeliveryJob] = []
        done = 0
        writer_start, cpu_start = writer_cpu_seconds(), time.process_time()
        started = time.perf_counter()
        while True:
            claimed, *_ = await asyncio.gather(
                spool.claim_due(max_units=claim, per_destination=10, lease=1200),
                *(spool.record_outcomes(job, delivered(job)) for job in previous),
            )
            done += sum(len(job.recipients) for job in previous)
            if not claimed and not previous:
                break
            previous = claimed
        wall = time.perf_counter() - started
        return (
            done, wall, writer_cpu_seconds() - writer_start, time.process_time() - cpu_start
        )
    finally:
        await spool.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"writer: {args.messages} units to {args.domains} domains, claims of {args.claim}, "
        f"a thread busy {args.busy:.0%} of the time ({args.stretch:g} ms stretches); "
        f"{_postroom.machine()}",
        flush=True,
    )
    make = _prequeue.spread(
        args.domains, _postroom.body_text(args.size, newline="\r\n"), SENDER
    )

    workdir = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
    try:
        config_path = workdir / "postroom.toml"
        config_path.write_text(_postroom.CONFIG, encoding="utf-8")
        subprocess.run(
            [*_postroom.postroom_command(), "--config", str(config_path), "init"],
            check=True, capture_output=True, env=_postroom.child_env(),
        )
        started = time.perf_counter()
        _prequeue.prequeue(config_path, args.messages, make)
        print(f"  pre-queued {args.messages} units in {time.perf_counter() - started:.1f} s")
        stop = threading.Event()
        busy = threading.Thread(
            target=keep_busy, args=(args.busy, args.stretch / 1000, stop), daemon=True
        )
        if args.busy > 0:
            busy.start()
        try:
            done, wall, writer, cpu = asyncio.run(drive(config_path, args.claim))
        finally:
            stop.set()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if done != args.messages:
        print(f"writer: recorded {done} of {args.messages} units", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"  claimed and recorded {done} units in {wall:.2f} s = {done / wall:.1f} units/s; "
        f"{1e6 * wall / done:.1f} us of wall time a unit"
    )
    print(
        f"  CPU a unit: spool writer thread {1e6 * writer / done:.1f} us, whole process "
        f"{1e6 * cpu / done:.1f} us; peak RSS {peak / 1024:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
