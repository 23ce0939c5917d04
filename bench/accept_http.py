"""Benchmark: how fast Postroom accepts messages over the HTTP API.

Sends N messages (default 500) with C requests in flight (default 50) as `POST /v1/messages`
(JSON: from, to, subject, a ~3 KB `text`; `Authorization: Bearer <key>`), each answered `202`
once the message is committed to the spool. Prints msgs/s (202 answers per second of wall time),
p50/p99 request latency in ms (send to complete response, 202 answers only), the count of
non-202 answers (and the first such body), CPU used by the client and by Postroom, and
Postroom's peak RSS (VmHWM from /proc/<pid>/status) when this script started Postroom itself.

Without --url it starts a private Postroom (temp dir, 127.0.0.1 ephemeral ports, delivery
pointed at nothing so attempts just defer) and stops it at the end; see bench/_postroom.py.
Delivery runs in the same process meanwhile: it is not what is measured, but it shares the CPU.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/accept_http.py                    # small: 500 messages, 50 in flight
    .venv/bin/python bench/accept_http.py -n 20000 -c 100    # full size
    .venv/bin/python bench/accept_http.py --batch 0          # without the batch timing
    .venv/bin/python bench/accept_http.py --url http://127.0.0.1:8025 --key KEY   # running one

The client is one Python process too: on a small machine it competes with Postroom for CPU, so
read the printed CPU figures next to msgs/s.

After the single requests it times one `POST /v1/messages/batch` of --batch items (10,000 by
default: the API's maximum), the same message each, from sending the request to the whole
response.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Postroom's HTTP acceptance: msgs/s, p50/p99 latency, peak RSS."
    )
    parser.add_argument("-n", "--messages", type=int, default=500, help="messages (500)")
    parser.add_argument("-c", "--concurrency", type=int, default=50, help="in flight (50)")
    parser.add_argument("--size", type=int, default=3000, help="bytes of text per message (3000)")
    parser.add_argument("--url", help="API of a running Postroom (default: start a private one)")
    parser.add_argument("--key", help="API key for --url")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds (60)")
    parser.add_argument(
        "--batch",
        type=int,
        default=10_000,
        help="then one POST /v1/messages/batch with this many items, timed (10000; 0: none)",
    )
    args = parser.parse_args(argv)
    if args.url and not args.key:
        parser.error("--url needs --key")
    if args.key and not args.url:
        parser.error("--key goes with --url (a private Postroom makes its own key)")
    if args.messages < 1 or args.concurrency < 1:
        parser.error("-n and -c must be at least 1")
    if args.batch < 0:
        parser.error("--batch must be 0 or more")
    return args


async def time_batch(
    args: argparse.Namespace, url: str, headers: dict[str, str], item: dict[str, str]
) -> tuple[bool, list[str]]:
    """One batch request of `args.batch` copies of `item`: (all accepted?, report lines)."""
    payload = json.dumps([item] * args.batch).encode()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout) as client:
        started = time.perf_counter()
        try:
            response = await client.post("/v1/messages/batch", content=payload)
        except httpx.HTTPError as exc:
            return False, [f"batch of {args.batch}: {type(exc).__name__}: {exc}"]
        wall = time.perf_counter() - started
    accepted = 0
    if response.status_code in (200, 207):
        accepted = sum(1 for entry in response.json()["data"] if "id" in entry)
    line = (
        f"batch of {args.batch} ({len(payload) / 1e6:.1f} MB request): HTTP "
        f"{response.status_code}, {accepted} accepted in {wall:.3f} s "
        f"= {accepted / wall:.1f} msgs/s (target: 10,000 in <= 2 s)"
    )
    lines = [line]
    if response.status_code not in (200, 207):
        lines.append(f"  body: {response.text[:1000]}")
    return accepted == args.batch, lines


async def run(
    args: argparse.Namespace, url: str, key: str, server: _postroom.PrivatePostroom | None
) -> int:
    text = _postroom.body_text(args.size)
    stamp = time.strftime("%H:%M:%S")

    def body(i: int) -> bytes:
        data = {
            "from": "bench@acme.test",
            "to": "user@example.test",
            "subject": f"bench {stamp} #{i}",
            "text": text,
        }
        return json.dumps(data).encode()

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    first_error: list[str] = []
    work = _postroom.WorkQueue(args.messages)
    workers = min(args.concurrency, args.messages)

    async with contextlib.AsyncExitStack() as stack:
        # One client with one keep-alive connection per worker: C connections, as with one
        # shared pool of C, but without that pool's bookkeeping (measured here at 50: ~5 ms of
        # client CPU per request shared, ~1 ms per worker; with the client and Postroom on two
        # cores the shared pool halved msgs/s and tripled p99). Made before the clock starts:
        # each AsyncClient builds an SSL context (~25 ms of CPU) even for plain http.
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url,
                    headers=headers,
                    timeout=args.timeout,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )
            )
            for _ in range(workers)
        ]
        try:
            (await clients[0].get("/healthz")).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"accept_http: cannot use {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2

        async def worker(client: httpx.AsyncClient) -> None:
            for i in work:  # shared: each message is sent once
                content = body(i)  # made per message (memory stays flat at any -n), untimed
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/messages", content=content)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - started
                statuses[str(response.status_code)] += 1
                if response.status_code == 202:
                    latencies.append(elapsed)
                elif not first_error:
                    first_error.append(f"HTTP {response.status_code}: {response.text[:1000]}")

        watch = _postroom.ProcessWatch(server)
        watch.begin()
        started = time.perf_counter()
        interrupted = await _postroom.run_workers([worker(c) for c in clients], work)
        wall = time.perf_counter() - started
        watch.end()

    accepted = len(latencies)
    failed = work.handed_out - accepted
    print(
        f"accept_http: {args.messages} messages, concurrency {args.concurrency}, "
        f"{len(body(0))} B request bodies ({len(text)} B text), API {url}"
    )
    print(
        f"accepted (202): {accepted}/{work.handed_out} in {wall:.3f} s = "
        f"{accepted / wall:.1f} msgs/s"
    )
    print(
        f"non-202 answers: {failed}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()) if k != "202") + ")"
            if failed
            else ""
        )
    )
    if first_error:
        print(f"  first error: {first_error[0]}")
    print(_postroom.latency_line("request latency (202 only)", latencies))
    for line in watch.lines(wall):
        print(line)
    if interrupted:
        print(f"INTERRUPTED after {work.handed_out} of {args.messages} messages")
        return 130
    batch_ok = True
    if args.batch:
        item = {"from": "bench@acme.test", "to": "user@example.test", "subject": "batch",
                "text": text}
        batch_ok, lines = await time_batch(args, url, headers, item)
        for line in lines:
            print(line)
        if server is not None:
            print(f"postroom peak RSS after the batch: {_postroom.mib(server.peak_rss_kib())}")
    for line in _postroom.server_log_lines(server):
        print(line)
    return 0 if failed == 0 and batch_ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        return asyncio.run(run(args, args.url.rstrip("/"), args.key, None))
    with _postroom.PrivatePostroom() as server:
        print(
            f"started a private postroom: pid {server.pid}, API {server.api_url}, "
            f"SMTP {server.smtp_host}:{server.smtp_port}, dir {server.workdir}"
        )
        code = asyncio.run(run(args, server.api_url, server.key, server))
    print(f"postroom stopped (exit code {server.exit_code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
