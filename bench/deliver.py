"""Benchmark: how fast Postroom drains a queue to many destinations, DKIM off and on.

Pre-queues N messages (default 2,000; the issue's full size is 100,000) of ~3 KB, one recipient
each, spread round-robin over D domains (default 100: d000.bench.test ...), straight into the
spool through intake (bench/_prequeue.py), before `postroom serve` starts. Each domain has a
smarthost route to one of K local sinks (default 4; bench/_sink.py, a minimal SMTP sink in this
process's own thread), so delivery runs the engine, pacing, connection reuse, DKIM and the
recording of outcomes, but no DNS. Each sink, one smarthost destination to pacing, may have its
share of the 100 connections the D domains would have in all (`[delivery.destinations]`).
Then it starts Postroom and waits until the sinks have all N.

Prints, for DKIM off and for DKIM on (`postroom domains add acme.test`: RSA-2048, relaxed/
relaxed, as configured for real), the drain rate — messages / time from the first to the last
message at the sinks, and from `serve` being started to the last message — sessions opened,
Postroom's CPU time per message and its peak RSS, and the ratio DKIM on / off.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/deliver.py                     # small: 2,000 messages, both modes
    .venv/bin/python bench/deliver.py -n 100000           # full size
    .venv/bin/python bench/deliver.py --dkim off          # one mode only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom
import _prequeue
import _sink

SENDER = "bench@acme.test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure Postroom's delivery drain rate.")
    parser.add_argument("-n", "--messages", type=int, default=2000, help="messages (2000)")
    parser.add_argument("--domains", type=int, default=100, help="destination domains (100)")
    parser.add_argument("--sinks", type=int, default=4, help="local SMTP sinks (4)")
    parser.add_argument("--size", type=int, default=3000, help="approx. body bytes (3000)")
    parser.add_argument(
        "--dkim", choices=["off", "on", "both"], default="both", help="signing (both)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="for the drain, s (1800)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.domains < 1 or args.sinks < 1:
        parser.error("-n, --domains and --sinks must be at least 1")
    return args


def config(args: argparse.Namespace, ports: list[int]) -> str:
    routes = "".join(
        f'\n[delivery.routes."{_prequeue.domain(i)}"]\nhost = "127.0.0.1"\n'
        f'port = {ports[i % len(ports)]}\ntls = "opportunistic"\n'
        for i in range(args.domains)
    )
    # D real domains would each get `max_connections_per_destination` (10) connections, up to
    # `delivery.max_connections` (100) in all; the K sinks that stand in for them are K
    # smarthost destinations to pacing, so each gets its share of those 100 (25 with 4 sinks).
    per_sink = -(-min(100, 10 * args.domains) // len(ports))
    return _postroom.CONFIG + routes + (
        f'\n[delivery.destinations."127.0.0.1"]\nmax_connections = {per_sink}\n'
    )


def run_mode(args: argparse.Namespace, dkim: bool) -> dict[str, float]:
    make = _prequeue.spread(
        args.domains, _postroom.body_text(args.size, newline="\r\n"), SENDER
    )

    launched: list[float] = []

    def prepare(server: _postroom.PrivatePostroom) -> None:
        if dkim:
            server.cli("domains", "add", "acme.test")
        started = time.perf_counter()
        _prequeue.prequeue(server.config_path, args.messages, make, progress=True)
        print(
            f"  pre-queued {args.messages} messages in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        launched.append(time.perf_counter())  # `postroom serve` starts next

    label = "DKIM on (RSA-2048)" if dkim else "DKIM off"
    print(f"{label}:", flush=True)
    with _sink.SinkGroup(args.sinks) as sinks:
        server = _postroom.PrivatePostroom(config=config(args, sinks.ports), prepare=prepare)
        with server:
            cpu_start = _postroom.cpu_seconds(server.pid) or 0.0
            if not sinks.wait_for(args.messages, args.timeout):
                raise SystemExit(
                    f"deliver: the sinks have {sinks.counts.messages} of {args.messages} "
                    f"messages after {args.timeout:g} s\n" + server.tail()
                )
            done = time.perf_counter()
            cpu = (_postroom.cpu_seconds(server.pid) or 0.0) - cpu_start
            peak = server.peak_rss_kib()
            for line in _postroom.server_log_lines(server):
                if "WARNING" in line or "ERROR" in line or "first" in line:
                    print("  " + line)
        counts = sinks.counts
    assert counts.first_at is not None and counts.last_at is not None
    drain = counts.last_at - counts.first_at
    rate = (args.messages - 1) / drain if drain > 0 else float("nan")
    overall = args.messages / (done - launched[0])
    print(
        f"  drained {args.messages} messages to {args.domains} domains over {args.sinks} sinks: "
        f"{rate:.1f} msgs/s first-to-last ({drain:.2f} s); {overall:.1f} msgs/s counting "
        f"start-up ({done - launched[0]:.2f} s)"
    )
    print(
        f"  sink sessions: {counts.sessions}; postroom CPU after start-up: {cpu:.2f} s "
        f"({1000 * cpu / args.messages:.2f} ms/msg); peak RSS (VmHWM): {_postroom.mib(peak)}"
    )
    return {"rate": rate, "cpu_per_msg": cpu / args.messages}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.dkim]

    print(
        f"deliver: {args.messages} messages x ~{args.size} B, {args.domains} domains, "
        f"{args.sinks} sinks; {_postroom.machine()}"
    )
    results = [run_mode(args, dkim) for dkim in modes]
    if len(results) == 2:
        off, on = results
        print(
            f"DKIM on / off: drain rate {on['rate'] / off['rate']:.2f}x, CPU per message "
            f"{on['cpu_per_msg'] / off['cpu_per_msg']:.2f}x (target drain: >= 3,000 msgs/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
