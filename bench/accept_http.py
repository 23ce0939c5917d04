"""Benchmark: how fast Postroom accepts messages over the HTTP API.

Sends single messages with C requests in flight (default 50) as `POST /v1/messages`
(JSON: from, to, subject, a ~3 KB `text`; `Authorization: Bearer <key>`), each answered `202`
once the message is committed to the spool. Prints msgs/s (202 answers per second of wall time),
p50/p99 request latency in ms (send to complete response, 202 answers only), the count of
non-202 answers (and the first such body), CPU used by the client and by Postroom, and
Postroom's peak RSS (VmHWM from /proc/<pid>/status) when this script started Postroom itself.

Without --url it starts a private Postroom (temp dir, 127.0.0.1 ephemeral ports, delivery
pointed at nothing so attempts just defer) and stops it at the end; see bench/_postroom.py.
Delivery runs in the same process meanwhile: it is not what is measured, but it shares the CPU.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/accept_http.py                    # 5 s of requests (wrk), 50 in flight
    .venv/bin/python bench/accept_http.py -d 30 -c 100       # full size
    .venv/bin/python bench/accept_http.py -d 10 --rate 2000  # 2,000 a second offered, paced
    .venv/bin/python bench/accept_http.py --client python -n 500   # 500 from the Python client
    .venv/bin/python bench/accept_http.py --batch 0          # without the batch timing
    .venv/bin/python bench/accept_http.py --url http://127.0.0.1:8025 --key KEY   # running one

The load comes from wrk (Debian/Ubuntu: `apt-get install wrk`) when it is installed, and
otherwise from a Python client in this process (`--client` chooses). The Python client spends
about 1.2 ms of CPU per request: on two cores it tops out near 700 requests/s, below what Postroom
answers, so its msgs/s measures the client. wrk spends a small fraction of that. Either way the
client shares the machine with Postroom: read the printed CPU figures next to msgs/s.

By default each connection sends its next request as soon as the last one's answer comes, so
the run measures Postroom saturated: at a fixed C in flight the latency is C over the rate. With
`--rate R` wrk sends on a fixed schedule instead, R requests a second with at most C in flight,
which measures the latency a client sees at that load; the run counts the requests whose slot
came while every connection was still waiting (sent late), and more than 1% of them means
Postroom could not keep up with R, so that its latency is not the latency at R. The schedule
reads the clock through LuaJIT's FFI, which the distributions' wrk is built with.

After the single requests it times one `POST /v1/messages/batch` of --batch items (10,000 by
default: the API's maximum), the same message each, from sending the request to the whole
response. A private Postroom is first left to go idle (below 10% of a core), since its engine is
still attempting, and deferring, the single sends' messages: the batch is timed on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
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
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="the load generator for the single requests: wrk, or a Python client in this "
        "process (auto: wrk when it is on PATH)",
    )
    parser.add_argument(
        "-d", "--duration", type=int, default=5,
        help="seconds of load with wrk, which runs for a time, not a count (5)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="wrk only: offer this many requests a second, on a fixed schedule, with at most "
        "-c in flight, instead of sending each request as the last one's answer comes (0)",
    )
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
    if args.rate < 0:
        parser.error("--rate must be 0 or more")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    elif args.client == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not installed (apt-get install wrk)")
    if args.rate and args.client != "wrk":
        parser.error("--rate needs wrk (apt-get install wrk)")
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


def _body(text: str, subject: str) -> dict[str, str]:
    return {"from": "bench@acme.test", "to": "user@example.test", "subject": subject,
            "text": text}


async def run(
    args: argparse.Namespace, url: str, key: str, server: _postroom.PrivatePostroom | None
) -> int:
    text = _postroom.body_text(args.size)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as probe:
        try:
            (await probe.get("/healthz")).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"accept_http: cannot use {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    if args.client == "wrk":
        code = await asyncio.to_thread(wrk_load, args, url, key, server, text)
    else:
        code = await python_load(args, url, headers, server, text)
    if code == 130:
        return code
    batch_ok = True
    if args.batch:
        if server is not None:
            # The engine is still deferring the single sends (delivery points at nothing):
            # the batch is timed on its own, not beside that work.
            waited = await asyncio.to_thread(_postroom.wait_idle, server.pid)
            print(f"waited {waited:.1f} s for postroom to be idle before the batch")
        batch_ok, lines = await time_batch(args, url, headers, _body(text, "batch"))
        for line in lines:
            print(line)
        if server is not None:
            print(f"postroom peak RSS after the batch: {_postroom.mib(server.peak_rss_kib())}")
    for line in _postroom.server_log_lines(server):
        print(line)
    return code if code else (0 if batch_ok else 1)


async def python_load(
    args: argparse.Namespace, url: str, headers: dict[str, str],
    server: _postroom.PrivatePostroom | None, text: str,
) -> int:
    """The single requests from this process; 0 when every one got its 202."""
    stamp = time.strftime("%H:%M:%S")

    def body(i: int) -> bytes:
        return json.dumps(_body(text, f"bench {stamp} #{i}")).encode()

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
        f"{len(body(0))} B request bodies ({len(text)} B text), API {url}, client: python"
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
    return 0 if failed == 0 else 1


#: wrk's script: the same request body as the Python client's (subject numbered per request);
#: `done` prints the lines this script reads. Latencies are wrk's own (every answer, in
#: microseconds). wrk runs for a duration: a thread that stops early still waits it out.
_WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  sent = 0; ok = 0; other = 0; first = ""; late = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
end
function request()
  sent = sent + 1
  local body = HEAD .. sent .. MIDDLE
  return wrk.format(nil, "/v1/messages", nil, body)
end
function response(status, headers, body)
  if status == 202 then ok = ok + 1 else
    other = other + 1
    if first == "" then first = status .. " " .. string.sub(body, 1, 300) end
  end
end
function done(summary, latency, requests)
  local ok, other, first, late = 0, 0, "", 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("ok"); other = other + t:get("other"); late = late + t:get("late")
    if first == "" then first = t:get("first") end
  end
  local e = summary.errors
  io.write(string.format("POSTROOM %d %d %d %d %d %d %d %d %d\\n", ok, other, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.min, latency.max,
    e.connect + e.read + e.write + e.timeout, late))
  io.write("FIRST " .. first .. "\\n")
end
"""


#: With --rate: one schedule for all the connections (wrk's -t1 is one Lua state), a slot every
#: 1/RATE s; `delay` holds each request until its slot, in wrk's whole milliseconds. A request
#: whose slot passed more than 1 ms before a connection was free to send it counts as `late`:
#: wrk times from the send, not from the slot, so when many are late the latency leaves out
#: the time they waited here, and the run measured a saturated Postroom, not the rate asked.
_WRK_PACING = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } pr_timespec;
int clock_gettime(int clock, pr_timespec *tp);
]]
local now_ts = ffi.new("pr_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, now_ts)  -- CLOCK_MONOTONIC
  return tonumber(now_ts.tv_sec) * 1000 + tonumber(now_ts.tv_nsec) / 1e6
end
local slot = nil
function delay()
  local now = now_ms()
  if slot == nil then slot = now end
  local wait = slot - now
  slot = slot + 1000 / RATE
  if wait < -1 then late = late + 1 end
  if wait <= 0 then return 0 end
  return math.floor(wait)
end
"""


def _lua_string(text: str) -> str:
    """`text` as a Lua long string (no escapes inside one)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_load(
    args: argparse.Namespace, url: str, key: str,
    server: _postroom.PrivatePostroom | None, text: str,
) -> int:
    """Single requests from wrk for --duration seconds (one thread, -c connections); 0 when
    every one got its 202."""
    stamp = time.strftime("%H:%M:%S")
    marker = "@@NUMBER@@"
    head, middle = json.dumps(_body(text, f"bench {stamp} #{marker}")).split(marker)
    connections = args.concurrency
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f"HEAD = {_lua_string(head)}\nMIDDLE = {_lua_string(middle)}\n")
        script.write(_WRK_SCRIPT)
        if args.rate:
            script.write(f"RATE = {args.rate!r}\n{_WRK_PACING}")
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{args.duration}s",
        f"--timeout={max(1, round(args.timeout))}s", "-s", script.name, url, "--", key,
    ]
    watch = _postroom.ProcessWatch(server)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    watch.begin()
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except KeyboardInterrupt:
        return 130
    finally:
        os.unlink(script.name)
    watch.end()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = next((line.split()[1:] for line in done.stdout.splitlines()
                    if line.startswith("POSTROOM ")), None)
    if done.returncode != 0 or figures is None:
        print(f"accept_http: wrk failed ({done.returncode}): {done.stdout}{done.stderr}",
              file=sys.stderr)
        return 1
    ok, other, duration_us, p50, p99, low, high, errors, late = (int(v) for v in figures)
    wall = duration_us / 1e6
    paced = f", paced at {args.rate:g} requests/s offered" if args.rate else ""
    print(
        f"accept_http: {args.duration} s of requests, concurrency {connections}{paced}, "
        f"{len(head) + len(middle) + 1} B request bodies ({len(text)} B text), API {url}, "
        "client: wrk"
    )
    print(f"accepted (202): {ok}/{ok + other + errors} in {wall:.3f} s = {ok / wall:.1f} msgs/s")
    if args.rate:
        sent = ok + other + errors
        share = 100 * late / sent if sent else 0.0
        verdict = "; a saturated run, not the rate asked" if share > 1 else ""
        print(
            f"sent late (their slot passed with all {connections} connections busy): "
            f"{late} ({share:.1f}%){verdict}"
        )
    print(f"non-202 answers: {other}, connection errors: {errors}")
    first = next((line[6:] for line in done.stdout.splitlines() if line.startswith("FIRST ")), "")
    if first.strip():
        print(f"  first error: HTTP {first}")
    print(
        f"request latency (every answer, wrk): p50 {p50 / 1000:.2f} ms, p99 {p99 / 1000:.2f} ms "
        f"(min {low / 1000:.2f}, max {high / 1000:.2f}, n={ok + other})"
    )
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    watch.client_cpu = client_cpu
    for line in watch.lines(wall):
        print(line.replace("benchmark client CPU", "benchmark client (wrk) CPU"))
    return 0 if other == 0 and errors == 0 and ok > 0 else 1


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
