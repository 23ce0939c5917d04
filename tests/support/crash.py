"""The crash drill: load through both doors, SIGKILL at seeded moments, restart, drain, audit.

Owns `run_crash(workdir, plan)` and the `CrashReport` it returns. A real `postroom serve` runs as
a subprocess with every domain routed to one `MxSink` in this loop; workers send uniquely tokened
messages (the token is the subject) over SMTP (a trusted loopback client, a new connection per
message) and HTTP (one API key). Each cycle kills the process with SIGKILL once a seeded number of
acknowledgements came back, then lists which units were leased (`sending`) at that moment; the
last run sends what is left and drains. The audit then holds Postroom to its promises:

- every message answered 250/202 arrived at the sink at least once;
- a message arrived more than once only if it was leased at a kill, at most once more per such
  kill — and a message never answered 2xx arrived no more often than that either;
- after the drain nothing is left pending (leases a crash left are recovered at start-up);
- `PRAGMA integrity_check` is ok, and no run printed a traceback.

The test suite runs it small (tests/test_faults_crash.py); `bench/crash.py` at full size.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from config import load_settings
from store import RecipientStatus, Scope, Spool

from .mx_sink import MxSink
from .raw_smtp import RawSmtp
from .wait import wait_until

DOMAINS = ("alpha.test", "bravo.test", "charlie.test", "delta.test")
_LISTENING = re.compile(r"SMTP 127\.0\.0\.1:(\d+); API (http://127\.0\.0\.1:\d+)")
_TOKEN = re.compile(rb"^Subject: crash (t\d+)\r?$", re.MULTILINE)
_DEPTH = re.compile(r'^postroom_queue_depth\{status="(\w+)"\} (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class CrashPlan:
    kills: int = 3
    messages: int = 300
    seed: int = 1
    concurrency: int = 8  # workers, half SMTP and half HTTP
    drain_timeout: float = 60.0
    smtp_workers: int = 0  # Postroom's smtp.workers: the SIGKILL hits the service process only


@dataclass
class CrashReport:
    plan: CrashPlan
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    acked: set[str] = field(default_factory=set)
    arrivals: collections.Counter[str] = field(default_factory=collections.Counter)
    #: token → how many kills found its unit leased (`sending`)
    leased_at_kill: collections.Counter[str] = field(default_factory=collections.Counter)
    kills: int = 0
    pending_after_drain: dict[str, int] = field(default_factory=dict)
    integrity: list[str] = field(default_factory=list)
    #: (which run, that run's output) for each run that printed a traceback or exited uncleanly
    tracebacks: list[tuple[str, str]] = field(default_factory=list)
    #: SMTP worker processes still running 10 s after the service they served was killed
    orphans: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.arrivals.values() if n > 1)

    def problems(self) -> list[str]:
        """Every broken promise, one line each; empty when the run passed."""
        found = []
        lost = sorted(t for t in self.acked if self.arrivals[t] == 0)
        if lost:
            found.append(f"{len(lost)} acknowledged message(s) never arrived: {lost[:10]}")
        for token, count in sorted(self.arrivals.items()):
            if token not in self.sent:
                found.append(f"{token} arrived but was never sent")
            elif count > 1 + self.leased_at_kill[token]:
                found.append(
                    f"{token} arrived {count} times, sent {self.sent[token]}, leased at "
                    f"{self.leased_at_kill[token]} kill(s)"
                )
        stuck = {s: n for s, n in self.pending_after_drain.items() if n}
        if stuck:
            found.append(f"units still pending after the drain: {stuck}")
        if self.integrity != ["ok"]:
            found.append(f"integrity_check: {self.integrity}")
        found.extend(where for where, _ in self.tracebacks)
        if self.orphans:
            found.append(f"SMTP workers outlived the killed service: pids {self.orphans}")
        return found

    def summary(self) -> str:
        return (
            f"{self.kills} kill(s), {sum(self.sent.values())} sent, {len(self.acked)} "
            f"acknowledged, {sum(self.arrivals.values())} arrivals of {len(self.arrivals)} "
            f"message(s), {self.duplicates} duplicate(s) "
            f"({sum(1 for n in self.leased_at_kill.values() if n)} message(s) leased at a kill), "
            f"integrity {'/'.join(self.integrity)}, {self.seconds:.1f}s"
        )


class _Process:
    """One `postroom serve`, its output kept in `lines` by a draining thread."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "--config", str(config), "serve"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self.smtp_port = 0
        self.api_url = ""
        self._listening = threading.Event()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if not self._listening.is_set() and (m := _LISTENING.search(line)):
                self.smtp_port, self.api_url = int(m.group(1)), m.group(2)
                self._listening.set()
        self._listening.set()  # the process ended: stop waiting

    async def started(self) -> None:
        await asyncio.to_thread(self._listening.wait, 60)
        if not self.smtp_port:
            self.kill()
            raise RuntimeError("postroom did not start:\n" + "".join(self.lines[-40:]))

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def terminate(self) -> int:
        return self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self._drain.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _config(workdir: Path, sink_port: int, smtp_workers: int) -> Path:
    """A config routing every domain to the sink; loopback clients may relay without AUTH."""
    path = workdir / "postroom.toml"
    path.write_text(
        f"""\
[server]
data_dir = "{workdir / 'data'}"
hostname = "crash.test"
shutdown_timeout = "5s"

[smtp]
listen = ["127.0.0.1:0"]
trusted_networks = ["127.0.0.0/8"]
workers = {smtp_workers}

[api]
listen = "127.0.0.1:0"
check_recipient_domains = false

[delivery]
retry_schedule = ["1s", "1s", "1s", "1s", "1s"]
poll_interval = "0.2s"
connect_timeout = "5s"

[policy]
allow_unconfigured_domains = true

[delivery.routes."*"]
host = "127.0.0.1"
port = {sink_port}
tls = "opportunistic"
"""
    )
    return path


async def _open_spool(config: Path) -> Spool:
    return await Spool.open(load_settings(config, must_exist=True), readers=1)


class _Load:
    """The message pool and the workers that drain it into one running process."""

    def __init__(self, plan: CrashPlan, report: CrashReport, key: str) -> None:
        rng = random.Random(plan.seed)
        self.rng = rng
        self.report = report
        self.key = key
        self.pool: collections.deque[tuple[str, str, str]] = collections.deque(
            (f"t{i:06d}", rng.choice(("smtp", "http")), rng.choice(DOMAINS))
            for i in range(plan.messages)
        )

    async def run(self, proc: _Process, workers: int, ack_target: int | None) -> None:
        """Send from the pool until it is empty or, with `ack_target`, that many got a 2xx."""
        stop = asyncio.Event()
        acks = 0

        def acked(token: str) -> None:
            nonlocal acks
            self.report.acked.add(token)
            acks += 1
            if ack_target is not None and acks >= ack_target:
                stop.set()

        async with httpx.AsyncClient(
            base_url=proc.api_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=10
        ) as http:

            async def worker(door: str) -> None:
                while not stop.is_set():
                    item = self._next(door)
                    if item is None:
                        return
                    token, _, domain = item
                    self.report.sent[token] += 1
                    send = _send_smtp(proc.smtp_port, token, domain) if door == "smtp" \
                        else _send_http(http, token, domain)
                    if await send:
                        acked(token)

            tasks = [
                asyncio.create_task(worker("smtp" if i % 2 else "http"))
                for i in range(workers)
            ]
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait([waiter, asyncio.gather(*tasks)],
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if stop.is_set():
                # A seeded moment after the target, with requests still in flight.
                await asyncio.sleep(self.rng.uniform(0, 0.05))
                proc.kill()
            await asyncio.gather(*tasks)

    def _next(self, door: str) -> tuple[str, str, str] | None:
        for index, item in enumerate(self.pool):
            if item[1] == door:
                del self.pool[index]
                return item
        return self.pool.popleft() if self.pool else None


async def _send_smtp(port: int, token: str, domain: str) -> bool:
    try:
        client = await RawSmtp.open(port)
        try:
            for line, expected in (
                ("EHLO load.test", "250"),
                ("MAIL FROM:<load@sender.test>", "250"),
                (f"RCPT TO:<{token}@{domain}>", "250"),
                ("DATA", "354"),
            ):
                if not (await client.command(line)).startswith(expected):
                    return False
            body = f"From: load@sender.test\r\nSubject: crash {token}\r\n\r\n{token}\r\n."
            reply = await client.command(body.encode())
            await client.send(b"QUIT\r\n")
            return reply.startswith("250 ")
        finally:
            await client.close()
    except (OSError, TimeoutError, ConnectionError):
        return False


async def _send_http(http: httpx.AsyncClient, token: str, domain: str) -> bool:
    message = {"from": "load@sender.test", "to": f"{token}@{domain}",
               "subject": f"crash {token}", "text": token}
    try:
        response = await http.post("/v1/messages", json=message)
    except httpx.HTTPError:
        return False
    return response.status_code == 202


async def _leased_tokens(config: Path) -> list[str]:
    """Tokens of the messages with a unit leased (`sending`) in the spool a kill left."""
    spool = await _open_spool(config)
    try:
        found = await spool.list_messages(RecipientStatus.SENDING, limit=1_000_000)
    finally:
        await spool.close()
    return [m.subject.removeprefix("crash ") for m in found]


async def _queue_depth(http: httpx.AsyncClient) -> dict[str, int]:
    text = (await http.get("/metrics")).text
    return {status: int(float(value)) for status, value in _DEPTH.findall(text)}


async def run_crash(
    workdir: Path, plan: CrashPlan, say: Callable[[str], None] = lambda _: None
) -> CrashReport:
    """Run the drill in `workdir` (made if missing); the report says what held."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    report = CrashReport(plan)
    async with MxSink(hostname="sink.test") as sink:
        config = _config(workdir, sink.port, plan.smtp_workers)
        spool = await _open_spool(config)
        key = (await spool.create_key("crash", Scope.SEND)).secret
        await spool.close()
        load = _Load(plan, report, key)
        share = max(1, plan.messages // (plan.kills + 1))
        rng = random.Random(plan.seed + 1)
        for cycle in range(plan.kills):
            proc = _Process(config)
            try:
                await proc.started()
                await load.run(proc, plan.concurrency, rng.randint(max(1, share // 2), share))
            finally:
                proc.kill()
                if "Traceback" in proc.output:
                    report.tracebacks.append(
                        (f"traceback in run {cycle + 1} (before kill {cycle + 1})", proc.output)
                    )
            report.orphans.extend(await _outliving(_worker_pids(proc.output)))
            report.kills += 1
            leased = await _leased_tokens(config)
            report.leased_at_kill.update(leased)
            say(f"kill {cycle + 1}: {len(report.acked)} acknowledged so far, "
                f"{len(leased)} leased at the kill, {len(sink.messages)} at the sink")

        proc = _Process(config)
        try:
            await proc.started()
            await load.run(proc, plan.concurrency, None)
            async with httpx.AsyncClient(base_url=proc.api_url, timeout=10) as http:

                async def drained() -> bool:
                    arrived = {m for r in sink.messages if (m := _token(r.data))}
                    if not report.acked <= arrived:
                        return False
                    return not any((await _queue_depth(http)).values())

                await wait_until(drained, timeout=plan.drain_timeout, interval=0.2,
                                 message="the queue did not drain")
            code = proc.terminate()
        finally:
            proc.kill()
            if "Traceback" in proc.output:
                report.tracebacks.append(("traceback in the final run (the drain)", proc.output))
        if code != 0:
            report.tracebacks.append(
                (f"the final run exited with code {code} on SIGTERM", proc.output)
            )

        for received in sink.messages:
            token = _token(received.data)
            report.arrivals[token or "<no token>"] += 1
        spool = await _open_spool(config)
        try:
            summary = await spool.queue_summary()
            report.pending_after_drain = {s.value: n for s, n in summary.counts.items()}
            report.integrity = await spool.integrity_check()
        finally:
            await spool.close()
    report.seconds = time.monotonic() - started
    return report


def _worker_pids(output: str) -> list[int]:
    """The SMTP workers a service named in its ready line (`smtp_workers=PID,PID` or `-`)."""
    m = re.search(r"smtp_workers=([\d,]+)", output)
    return [int(pid) for pid in m.group(1).split(",")] if m else []


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


async def _outliving(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Those of `pids` still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in pids if _is_running(p)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return running


def _token(data: bytes) -> str | None:
    m = _TOKEN.search(data)
    return m.group(1).decode() if m else None
