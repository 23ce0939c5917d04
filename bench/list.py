"""Benchmark: `GET /v1/messages` on a large spool — filters and cursor pages, ms per page.

Pre-queues N messages (default 20,000; the issue's full size is 1,000,000), one recipient each,
straight into the spool through intake (bench/_prequeue.py) before `postroom serve` starts. They
vary the way the filters need: 5 senders (`app0@acme.test` …, 20% each), 1,000 recipients
(`user7@d07.bench.test` is on 0.1% of them), tags `welcome` (50%) and `rare` (0.1%), and every
100th message goes to a suppressed address (status `suppressed`); the rest are scheduled a day
ahead (status `scheduled`), so the engine sends nothing while the list is read.

Then, through the API with one client, pages of 100 (`limit=100`): the newest page; every page
from the newest to the oldest following `next_cursor`; the middle and the last page again
through the cursors that walk handed out; the first page of each filter (`status`, `recipient`,
`from`, `tag`, `created_after`, `created_before`, both, and two combined). Each page but the
walk is fetched R times (default 30). Prints p50 / p99 / max in ms per page as the client sees
it (HTTP on loopback included) and how many messages the page held.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/list.py                 # 20,000 messages
    .venv/bin/python bench/list.py -n 1000000      # full size (filling takes many minutes)
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import httpx

from store import Tag

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom
import _prequeue

BODY = "A small message: the list reads the rows, not the bytes.\r\n"
SUPPRESSED = "blocked@bench.test"
PAGE = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure GET /v1/messages on a large spool.")
    parser.add_argument("-n", "--messages", type=int, default=20_000, help="messages (20000)")
    parser.add_argument("-r", "--repeat", type=int, default=30, help="fetches per page (30)")
    args = parser.parse_args(argv)
    if args.messages < 1000 or args.repeat < 1:
        parser.error("-n must be at least 1000 and -r at least 1")
    return args


def submission(i: int, due: float) -> _prequeue.Submission:
    recipient = SUPPRESSED if i % 100 == 99 else f"user{i % 1000}@d{i % 50:02d}.bench.test"
    sender = f"app{i % 5}@acme.test"
    tags = [Tag("welcome")] if i % 2 == 0 else [Tag("receipt")]
    if i % 1000 == 500:
        tags.append(Tag("rare"))
    return _prequeue.Submission(
        sender,
        (recipient,),
        _prequeue.message_bytes(i, recipient, BODY, sender),
        _prequeue.Source.API,
        tags=tuple(tags),
        scheduled_at=due,
    )


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


class Lister:
    """One client of the list route; each call is one timed page."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def page(self, params: dict[str, str]) -> tuple[float, int, str | None]:
        """Seconds for one page, the messages on it, and its next_cursor."""
        started = time.perf_counter()
        answer = self.client.get("/v1/messages", params={"limit": str(PAGE), **params})
        elapsed = time.perf_counter() - started
        answer.raise_for_status()
        body = answer.json()
        return elapsed, len(body["data"]), body["next_cursor"]

    def repeat(self, label: str, params: dict[str, str], times: int) -> None:
        samples, size = [], 0
        for _ in range(times):
            elapsed, size, _cursor = self.page(params)
            samples.append(elapsed)
        print(f"  {_postroom.latency_line(label, samples)}, {size} on the page", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.messages
    due = time.time() + 86400
    marks: dict[str, float] = {}

    def make(i: int) -> _prequeue.Submission:
        # The intake time of the messages around 40% and 60% of the fill, for created_*.
        if i in (n * 2 // 5, n * 3 // 5):
            marks[str(i)] = time.time()
        return submission(i, due)

    def prepare(server: _postroom.PrivatePostroom) -> None:
        server.cli("suppressions", "add", SUPPRESSED)
        started = time.perf_counter()
        _prequeue.prequeue(server.config_path, n, make, progress=n >= 100_000)
        print(f"  {n} messages queued in {time.perf_counter() - started:.1f} s", flush=True)

    print(f"list: {n} messages, pages of {PAGE}, each page fetched {args.repeat} times; "
          f"{_postroom.machine()}")
    with _postroom.PrivatePostroom(prepare=prepare) as server:
        watch = _postroom.ProcessWatch(server)
        headers = {"Authorization": f"Bearer {server.key}"}
        with httpx.Client(base_url=server.api_url, headers=headers, timeout=60) as client:
            lister = Lister(client)
            lister.page({})  # warm up: connections, the reader, SQLite's page cache
            watch.begin()
            started = time.perf_counter()
            lister.repeat("newest page", {}, args.repeat)

            walk, cursors, seen = [], [], 0
            cursor: str | None = ""
            while cursor is not None:
                elapsed, size, cursor = lister.page({"cursor": cursor} if cursor else {})
                walk.append(elapsed)
                seen += size
                if cursor is not None:
                    cursors.append(cursor)
            if seen != n:
                print(f"the walk saw {seen} messages, not {n}", file=sys.stderr)
                return 1
            print(f"  {_postroom.latency_line('every page, newest to oldest', walk)}", flush=True)
            lister.repeat("middle page (cursor)", {"cursor": cursors[len(cursors) // 2]},
                          args.repeat)
            lister.repeat("last page (cursor)", {"cursor": cursors[-1]}, args.repeat)

            early, late = iso(marks[str(n * 2 // 5)]), iso(marks[str(n * 3 // 5)])
            filters: list[tuple[str, dict[str, str]]] = [
                ("status=scheduled (99%)", {"status": "scheduled"}),
                ("status=suppressed (1%)", {"status": "suppressed"}),
                ("status=bounced (none)", {"status": "bounced"}),
                ("recipient (0.1%)", {"recipient": "user7@d07.bench.test"}),
                ("from (20%)", {"from": "app3@acme.test"}),
                ("tag=welcome (50%)", {"tag": "welcome"}),
                ("tag=rare (0.1%)", {"tag": "rare"}),
                ("created_after (newest 40%)", {"created_after": late}),
                ("created_before (oldest 40%)", {"created_before": early}),
                ("created_after + created_before (20%)",
                 {"created_after": early, "created_before": late}),
                ("status=scheduled, middle page (cursor)",
                 {"status": "scheduled", "cursor": cursors[len(cursors) // 2]}),
                ("from + tag=rare", {"from": "app0@acme.test", "tag": "rare"}),
            ]
            for label, params in filters:
                lister.repeat(label, params, args.repeat)
            watch.end()
            wall = time.perf_counter() - started
        for line in watch.lines(wall) + _postroom.server_log_lines(server):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
