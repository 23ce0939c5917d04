"""Crash drill at full size: SIGKILL Postroom under mixed SMTP + HTTP load, restart, drain, audit.

Drives uniquely tokened messages through both front doors of a `postroom serve` subprocess (every
domain routed to a local sink), SIGKILLs it at seeded moments — each once a seeded number of
acknowledgements came back, with requests still in flight — restarts it, and after the last kill
sends the rest and drains. It passes when every message answered 250/202 reached the sink, only
units leased at a kill arrived twice, nothing is pending after the drain, and
`PRAGMA integrity_check` is ok. The drill is tests/support/crash.py; the suite runs it small.

Usage (from the repository root, with the test extras installed):

    .venv/bin/python bench/crash.py                          # full size: 20 kills, 10,000 messages
    .venv/bin/python bench/crash.py --kills 3 --messages 300 # the suite's size
    .venv/bin/python bench/crash.py --seed 7 --keep /tmp/drill

Exit status 0 when every promise held, 1 otherwise (each broken one printed).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.crash import CrashPlan, run_crash


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--messages", type=int, default=10_000, help="messages (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments and load")
    parser.add_argument("--concurrency", type=int, default=16, help="sending workers (default 16)")
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Postroom's smtp.workers (default 0); the kills hit the service")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    plan = CrashPlan(
        kills=args.kills, messages=args.messages, seed=args.seed,
        concurrency=args.concurrency, drain_timeout=args.drain_timeout,
        smtp_workers=args.workers,
    )
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="postroom-crash-"))
    try:
        report = asyncio.run(run_crash(workdir, plan, say=print))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.summary())
    problems = report.problems()
    for problem in problems:
        print("FAIL:", problem)
    for where, output in report.tracebacks:
        print(f"--- {where}: its output, from 20 lines before its first traceback:")
        lines = output.splitlines()
        first = next((i for i, line in enumerate(lines) if "Traceback" in line), 0)
        print("\n".join(lines[max(0, first - 20):first + 40]))
    if not problems:
        print("PASS: nothing acknowledged was lost")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
