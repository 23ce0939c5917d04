"""Shared code of the benchmarks: a private Postroom process, percentiles, and the report.

`PrivatePostroom` runs a throwaway Postroom for one benchmark run: a temporary directory with a
`postroom.toml` (SMTP and API on 127.0.0.1, ephemeral ports; 127.0.0.0/8 trusted to relay; DNS
pointed at 127.0.0.1:1, where nothing answers, so delivery attempts fail and defer for an hour),
`postroom init`, one API key, then `postroom serve` as a subprocess. On exit it sends SIGTERM to
that process only, waits for it, and removes the directory.

Not a benchmark itself; imported by `accept_http.py` and `accept_smtp.py`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

#: `smtp.workers` of the private Postroom: the environment's SMTP_WORKERS (a number, or "auto",
#: the default) — `SMTP_WORKERS=0` measures the single-process layout.
_WORKERS = os.environ.get("SMTP_WORKERS", "auto")
_WORKERS_TOML = _WORKERS if _WORKERS.isdigit() else json.dumps(_WORKERS)

#: `api.in_workers` of the private Postroom: the environment's API_IN_WORKERS ("true", the
#: default, or "false") — `API_IN_WORKERS=false` measures the API in the service's own loop.
_API_IN_WORKERS = os.environ.get("API_IN_WORKERS", "true").lower() not in ("0", "false", "no")

#: `server.event_loop` of the private Postroom: the environment's EVENT_LOOP ("auto", the
#: default, "uvloop" or "asyncio") — `EVENT_LOOP=asyncio` measures Python's own loop.
_EVENT_LOOP = os.environ.get("EVENT_LOOP", "auto")

CONFIG = f"""\
[server]
data_dir = "data"
hostname = "bench.test"
event_loop = {json.dumps(_EVENT_LOOP)}

[smtp]
listen = ["127.0.0.1:0"]
trusted_networks = ["127.0.0.0/8"]
workers = {_WORKERS_TOML}

[api]
listen = "127.0.0.1:0"
in_workers = {json.dumps(_API_IN_WORKERS)}
# Nothing answers DNS here: the recipient-domain check would wait out the timeout.
check_recipient_domains = false

[policy]
# The benchmarks send from domains never added with `domains add`.
allow_unconfigured_domains = true

[delivery]
dns_nameservers = ["127.0.0.1:1"]
dns_timeout = "1s"
mx_port = 1
retry_schedule = ["1h"]
"""

_LISTENING = re.compile(r"Postroom is listening: SMTP (?P<smtp>[^;]+); API (?P<api>http://\S+)")
_LOG_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def postroom_command() -> list[str]:
    """The `postroom` of this interpreter's virtualenv, else `python -m relay`."""
    exe = Path(sys.executable).parent / "postroom"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "relay"]


def child_env() -> dict[str, str]:
    # POSTROOM_* variables would override the private config file: leave them out.
    return {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class PrivatePostroom:
    """A Postroom process of our own, on 127.0.0.1; use as a context manager."""

    #: The postroom.toml to run with (paths in it are relative to the temporary directory).
    config: str = CONFIG
    #: Called after `postroom init` and the key, before `postroom serve` (e.g. to fill the spool).
    prepare: Callable[[PrivatePostroom], None] | None = None
    workdir: Path | None = None
    proc: subprocess.Popen[str] | None = None
    key: str = ""
    smtp_host: str = ""
    smtp_port: int = 0
    api_url: str = ""
    log_levels: collections.Counter[str] = field(default_factory=collections.Counter)
    log_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    first_problem: str | None = None
    exit_code: int | None = None
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "postroom.toml"

    def __enter__(self) -> PrivatePostroom:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cli(self, *args: str) -> str:
        """Run `postroom --config <ours> ARGS...`; its output (raises if it fails)."""
        return self._cli(*args)

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            [*postroom_command(), "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=child_env(),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"postroom {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
        self.config_path.write_text(self.config, encoding="utf-8")
        self._cli("init")
        self.key = json.loads(self._cli("keys", "create", "--name", "bench", "--json"))["key"]
        if self.prepare is not None:
            self.prepare(self)
        self.proc = subprocess.Popen(
            [*postroom_command(), "--config", str(self.config_path), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=child_env(),
            cwd=self.workdir,
            # Its own session: a Ctrl-C in the terminal reaches the benchmark only, which then
            # finishes the messages in flight and stops Postroom itself, in that order.
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            thread = threading.Thread(
                target=self._drain,
                args=(stream, name == "stdout"),
                name=f"drain-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"postroom serve did not say where it listens within {START_TIMEOUT:g}s:\n"
                    + self.tail()
                ) from None
            if line is None:
                self.proc.wait(10)
                raise RuntimeError(
                    f"postroom serve exited {self.proc.returncode} during start-up:\n" + self.tail()
                )
            if m := _LISTENING.search(line):
                self.smtp_host, self.smtp_port = split_host_port(m["smtp"].split(",")[0])
                self.api_url = m["api"].rstrip("/")
                return

    def _drain(self, stream: IO[str], is_stdout: bool) -> None:
        for line in stream:
            with self._lock:
                self.log_tail.append(line.rstrip("\n"))
                if m := _LOG_LEVEL.search(line):
                    self.log_levels[m[1]] += 1
                    if m[1] in ("WARNING", "ERROR", "CRITICAL") and self.first_problem is None:
                        self.first_problem = line.rstrip("\n")
            if is_stdout:
                self._lines.put(line)
        if is_stdout:
            self._lines.put(None)

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self.log_tail)

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the running service plus its SMTP workers' (KiB), None once it is gone.

        A sum of peaks: at least the peak of the sum, so never an underestimate."""
        if self.proc is None:
            return None
        peaks = [read_status_kib(pid, "VmHWM") for pid in family(self.pid)]
        return sum(p for p in peaks if p is not None) if peaks[0] is not None else None

    def stop(self) -> None:
        """SIGTERM our process, wait for it (SIGKILL after a grace period), remove the files."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print(
                        f"postroom (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:g}s: "
                        "killing it",
                        file=sys.stderr,
                    )
                    proc.kill()
                    proc.wait(10)
        except BaseException:
            # Interrupted while waiting (a second Ctrl-C): abort, but leave nothing behind.
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            raise
        finally:
            if proc is not None:
                self.exit_code = proc.returncode
                for thread in self._threads:
                    thread.join(5)
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None


# -- /proc --------------------------------------------------------------------------------------


def read_status_kib(pid: int, field_name: str) -> int | None:
    """A `kB` field (VmHWM, VmRSS, ...) of /proc/<pid>/status, None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def family(pid: int) -> list[int]:
    """`pid` and its child processes (the service's SMTP workers), from /proc."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                children.extend(int(child) for child in fh.read().split())
    except OSError:
        pass
    return [pid, *children]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time so far of a process, its live children (the SMTP workers) and
    the children it has reaped, from /proc/<pid>/stat."""
    total = 0.0
    for index, member in enumerate(family(pid)):
        try:
            with open(f"/proc/{member}/stat", encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            if index == 0:
                return None
            continue
        # After the ")" of comm: state is fields[0], so utime (field 14) is fields[11]; the
        # reaped children's cutime and cstime follow.
        total += sum(int(f) for f in (fields[11:15] if index == 0 else fields[11:13]))
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, *, busy: float = 0.1, window: float = 0.5, limit: float = 60.0) -> float:
    """Wait until `pid` and its workers use less than `busy` of a core over `window` seconds
    (at most `limit` s); return the seconds waited. After a load, the private Postroom's engine
    is still attempting (and deferring) what was accepted: a figure taken meanwhile measures
    both."""
    started = time.monotonic()
    before = cpu_seconds(pid)
    while before is not None and time.monotonic() - started < limit:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now is None or now - before < busy * window:
            break
        before = now
    return time.monotonic() - started


# -- workers ------------------------------------------------------------------------------------


class WorkQueue:
    """Message numbers 0..n-1 shared by the workers; once `stopped` is set it hands out no more."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.handed_out = 0
        self.stopped = False

    def __iter__(self) -> WorkQueue:
        return self

    def __next__(self) -> int:
        if self.stopped or self.handed_out >= self.total:
            raise StopIteration
        self.handed_out += 1
        return self.handed_out - 1


async def run_workers(workers: Sequence[Coroutine[Any, Any, None]], work: WorkQueue) -> bool:
    """Run the workers to the end; True if Ctrl-C or SIGTERM cut the run short.

    The first signal stops handing out messages, so every worker ends after the one it is
    sending; a second one also cancels them. (Cancellation alone was not enough: with asyncio's
    own Ctrl-C handling the SMTP workers kept sending after two Ctrl-Cs, probably because
    Python 3.11's `asyncio.wait_for`, which aiosmtplib awaits every reply with, can swallow a
    cancellation that arrives together with the reply.)
    """
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(worker) for worker in workers]

    def interrupt() -> None:
        if work.stopped:
            for task in tasks:
                task.cancel()
            return
        work.stopped = True
        print(
            "\ninterrupted: finishing the messages in flight (again to abort them)",
            file=sys.stderr,
        )

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, interrupt)
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    return work.stopped


# -- figures ------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (p99 of 500 values = the 495th)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_line(label: str, seconds: Sequence[float]) -> str:
    values = sorted(seconds)
    if not values:
        return f"{label}: no samples"
    ms = [v * 1000 for v in values]
    return (
        f"{label}: p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms "
        f"(min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)})"
    )


def speed_ms() -> float:
    """The machine's speed for one Python thread now: ms for a fixed loop, best of 5.

    Virtual machines run at different speeds from day to day (a neighbour, CPU steal); this
    figure beside a result says how fast the machine was when it was taken: compare results
    taken at about the same speed, or scale them by it."""
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - started)
    return best * 1000


def machine() -> str:
    """The machine line every benchmark prints before its figures."""
    return (
        f"machine: {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f}, speed "
        f"{speed_ms():.0f} ms (bench/_postroom.py speed_ms: lower is faster); other work on "
        f"the machine skews every figure"
    )


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


@dataclass
class ProcessWatch:
    """CPU and memory of the private Postroom around the measured part of a run."""

    server: PrivatePostroom | None
    rss_at_start_kib: int | None = None
    server_cpu_start: float | None = None
    client_cpu_start: float = 0.0
    server_cpu: float | None = None
    client_cpu: float = 0.0
    peak_rss_kib: int | None = None

    #: `machine()` when the run began: the load and speed the figures were taken at.
    machine_at_start: str = ""

    def begin(self) -> None:
        self.machine_at_start = machine()
        self.client_cpu_start = time.process_time()
        if self.server is not None:
            self.rss_at_start_kib = read_status_kib(self.server.pid, "VmRSS")
            self.server_cpu_start = cpu_seconds(self.server.pid)

    def end(self) -> None:
        """Call while the server still runs: /proc/<pid> goes away with it."""
        self.client_cpu = time.process_time() - self.client_cpu_start
        if self.server is not None:
            self.peak_rss_kib = self.server.peak_rss_kib()
            now = cpu_seconds(self.server.pid)
            if now is not None and self.server_cpu_start is not None:
                self.server_cpu = now - self.server_cpu_start

    def lines(self, wall: float) -> list[str]:
        out = [
            self.machine_at_start,
            f"benchmark client CPU: {self.client_cpu:.2f} s ({self.client_cpu / wall:.0%})",
        ]
        if self.server is None:
            out.append("postroom peak RSS: n/a (not started by this benchmark)")
            return out
        if self.server_cpu is not None:
            out.append(
                f"postroom CPU: {self.server_cpu:.2f} s ({self.server_cpu / wall:.0%} of one core)"
            )
        out.append(
            f"postroom peak RSS (VmHWM): {mib(self.peak_rss_kib)} "
            f"(RSS before the run {mib(self.rss_at_start_kib)}; pid {self.server.pid})"
        )
        return out


def server_log_lines(server: PrivatePostroom | None) -> list[str]:
    if server is None:
        return []
    with server._lock:
        levels = dict(server.log_levels)
        problem = server.first_problem
    counted = ", ".join(f"{n} {level}" for level, n in sorted(levels.items())) or "nothing"
    out = [f"postroom log lines: {counted}"]
    if problem:
        out.append(f"  first warning/error: {problem[:300]}")
    return out


def body_text(size: int, newline: str = "\n") -> str:
    """About `size` bytes of plain ASCII text in lines of at most 76 characters."""
    words = (
        "postroom benchmark filler text the quick brown fox jumps over the lazy dog "
        "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
    ).split()
    lines: list[str] = []
    line: list[str] = []
    total = 0
    i = 0
    while total < size:
        word = words[i % len(words)]
        i += 1
        if sum(len(w) + 1 for w in line) + len(word) > 76:
            text = " ".join(line)
            lines.append(text)
            total += len(text) + len(newline)
            line = []
        line.append(word)
    return newline.join(lines) + newline


if __name__ == "__main__":  # `python bench/_postroom.py speed`: the figure alone, for vs_postfix.sh
    if sys.argv[1:] != ["speed"]:
        sys.exit("usage: python bench/_postroom.py speed")
    print(f"{speed_ms():.0f}")
