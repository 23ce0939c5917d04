"""Benchmark: events through the webhook outbox, and mail throughput beside a dead endpoint.

(a) Outbox: adds one endpoint (all event types) pointing at a local HTTP receiver, pre-queues N
messages (default 2,000) scheduled a day ahead, so each leaves one `email.scheduled` event and
one outbox row and no mail is attempted, then starts `postroom serve` and waits until the
receiver has all N POSTs. Prints events/s (first to last POST, and from `serve` started).

(b) Mail beside a dead endpoint: drains M pre-queued messages (default 2,000) to local SMTP sinks
as bench/deliver.py does (DKIM off), once with no webhook endpoint and once with an endpoint
(all event types) whose receiver accepts connections and never answers, so every attempt holds
a connection until `webhooks.timeout`. Prints both drain rates and the ratio with / without
(the issue's target: they match).

The receivers run in this process, in a thread with its own event loop, on 127.0.0.1.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/webhooks.py                        # small: 2,000 events, 2,000 msgs
    .venv/bin/python bench/webhooks.py -n 100000 -m 100000    # full size
    .venv/bin/python bench/webhooks.py --part outbox          # (a) only; --part mail: (b) only
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom
import _prequeue
import _sink
import deliver

SENDER = "bench@acme.test"
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure Postroom's webhook outbox.")
    parser.add_argument("-n", "--events", type=int, default=2000, help="outbox events (2000)")
    parser.add_argument("-m", "--messages", type=int, default=2000, help="mail drained (2000)")
    parser.add_argument("--domains", type=int, default=100, help="mail domains (100)")
    parser.add_argument("--sinks", type=int, default=4, help="local SMTP sinks (4)")
    parser.add_argument("--size", type=int, default=3000, help="approx. body bytes (3000)")
    parser.add_argument(
        "--per-endpoint", type=int, default=4,
        help="webhooks.max_concurrency_per_endpoint (4, the default)",
    )
    parser.add_argument(
        "--part", choices=["outbox", "mail", "both"], default="both", help="what to run (both)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="for each drain, s (1800)")
    args = parser.parse_args(argv)
    if min(args.events, args.messages, args.domains, args.sinks, args.per_endpoint) < 1:
        parser.error("every count must be at least 1")
    return args


# -- the HTTP receivers ---------------------------------------------------------------------------


@dataclass
class Counts:
    requests: int = 0
    connections: int = 0
    first_at: float | None = None  # time.perf_counter() of the first request
    last_at: float | None = None


class _Receiver(asyncio.Protocol):
    """Answers each POST `204` (keep-alive); with `is_dead`, reads and never answers."""

    def __init__(self, counts: Counts, is_dead: bool) -> None:
        self.counts = counts
        self.is_dead = is_dead
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counts.connections += 1

    def data_received(self, data: bytes) -> None:
        if self.is_dead:
            return  # a black hole: the attempt waits for its deadline
        assert self.transport is not None
        self.buffer += data
        answers = 0
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = self.buffer[:head_end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                break
            self.buffer = self.buffer[end:]
            answers += 1
        if answers:
            now = time.perf_counter()
            self.counts.requests += answers
            if self.counts.first_at is None:
                self.counts.first_at = now
            self.counts.last_at = now
            self.transport.write(_NO_CONTENT * answers)


@dataclass
class Receiver:
    """One HTTP receiver on 127.0.0.1, served by a thread's own event loop."""

    is_dead: bool = False
    counts: Counts = field(default_factory=Counts)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="receiver", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(30)
        return self

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Receiver(self.counts, self.is_dead), "127.0.0.1", 0, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def wait_for(self, requests: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.counts.requests < requests:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def webhook_config(args: argparse.Namespace) -> str:
    # Loopback receivers: the private-network refusal is switched off for them.
    return (
        f"\n[webhooks]\nallow_private_networks = true\n"
        f"max_concurrency_per_endpoint = {args.per_endpoint}\n"
    )


# -- (a) the outbox -------------------------------------------------------------------------------


def run_outbox(args: argparse.Namespace) -> float:
    body = _postroom.body_text(300, newline="\r\n")
    later = time.time() + 86400  # scheduled: an event and an outbox row, no delivery attempt

    def make(i: int) -> _prequeue.Submission:
        recipient = f"user{i}@d{i % 100:03d}.bench.test"
        return _prequeue.Submission(
            SENDER, (recipient,), _prequeue.message_bytes(i, recipient, body, SENDER),
            _prequeue.Source.API, scheduled_at=later,
        )

    launched: list[float] = []
    print("(a) outbox: events to a local receiver:", flush=True)
    with Receiver() as receiver:

        def prepare(server: _postroom.PrivatePostroom) -> None:
            server.cli("webhooks", "add", receiver.url, "--events", "*")
            started = time.perf_counter()
            _prequeue.prequeue(server.config_path, args.events, make, progress=True)
            print(f"  pre-queued {args.events} scheduled messages in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            launched.append(time.perf_counter())

        config = _postroom.CONFIG + webhook_config(args)
        with _postroom.PrivatePostroom(config=config, prepare=prepare) as server:
            cpu_start = _postroom.cpu_seconds(server.pid) or 0.0
            if not receiver.wait_for(args.events, args.timeout):
                raise SystemExit(
                    f"webhooks: the receiver has {receiver.counts.requests} of {args.events} "
                    f"events after {args.timeout:g} s\n" + server.tail()
                )
            done = time.perf_counter()
            cpu = (_postroom.cpu_seconds(server.pid) or 0.0) - cpu_start
            peak = server.peak_rss_kib()
        counts = receiver.counts
    assert counts.first_at is not None and counts.last_at is not None
    span = counts.last_at - counts.first_at
    rate = (args.events - 1) / span if span > 0 else float("nan")
    print(
        f"  {args.events} events: {rate:.1f} events/s first-to-last ({span:.2f} s); "
        f"{args.events / (done - launched[0]):.1f} events/s counting start-up; "
        f"{counts.connections} connections, {args.per_endpoint} in flight at most"
    )
    print(
        f"  postroom CPU after start-up: {cpu:.2f} s ({1000 * cpu / args.events:.2f} ms/event); "
        f"peak RSS (VmHWM): {_postroom.mib(peak)}"
    )
    return rate


# -- (b) mail beside a dead endpoint --------------------------------------------------------------


def run_mail(args: argparse.Namespace, dead_endpoint: bool) -> float:
    make = _prequeue.spread(
        args.domains, _postroom.body_text(args.size, newline="\r\n"), SENDER
    )

    label = "with a dead webhook endpoint" if dead_endpoint else "without a webhook endpoint"
    print(f"(b) mail drain {label}:", flush=True)
    with Receiver(is_dead=True) as dead, _sink.SinkGroup(args.sinks) as sinks:

        def prepare(server: _postroom.PrivatePostroom) -> None:
            if dead_endpoint:
                server.cli("webhooks", "add", dead.url, "--events", "*")
            _prequeue.prequeue(server.config_path, args.messages, make, progress=True)

        config = deliver.config(args, sinks.ports) + webhook_config(args)
        with _postroom.PrivatePostroom(config=config, prepare=prepare) as server:
            if not sinks.wait_for(args.messages, args.timeout):
                raise SystemExit(
                    f"webhooks: the sinks have {sinks.counts.messages} of {args.messages} "
                    f"messages after {args.timeout:g} s\n" + server.tail()
                )
            peak = server.peak_rss_kib()
        counts = sinks.counts
        held = dead.counts.connections
    assert counts.first_at is not None and counts.last_at is not None
    drain = counts.last_at - counts.first_at
    rate = (args.messages - 1) / drain if drain > 0 else float("nan")
    print(
        f"  drained {args.messages} messages: {rate:.1f} msgs/s first-to-last ({drain:.2f} s); "
        f"peak RSS (VmHWM): {_postroom.mib(peak)}"
        + (f"; the dead endpoint was held {held} connection(s)" if dead_endpoint else "")
    )
    return rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"webhooks: {args.events} outbox events; {args.messages} messages x ~{args.size} B to "
        f"{args.domains} domains over {args.sinks} sinks; {_postroom.machine()}"
    )
    if args.part in ("outbox", "both"):
        run_outbox(args)
    if args.part in ("mail", "both"):
        without = run_mail(args, dead_endpoint=False)
        with_dead = run_mail(args, dead_endpoint=True)
        print(f"mail drain with / without a dead endpoint: {with_dead / without:.2f}x "
              "(target: 1.00x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
