"""Benchmark: what aiosmtpd alone costs per session, the floor under Postroom's SMTP workers.

Starts a bare aiosmtpd server (uvloop, a handler that answers `250` to DATA and keeps nothing)
in a child process on a loopback port it picks, runs `smtp-source` against it with the load
of `vs_postfix.sh` (20 sessions, 3 KB, one recipient, a new connection per message), and prints
msgs/s and the server's CPU per message. Compare its CPU per message with a Postroom worker's
under the same load (`vs_postfix.sh` prints no CPU figures: read the worker's from /proc, or
run this next to it): Postroom's worker can cost no less than this, whatever the spool does.

Needs `smtp-source` (Postfix's package; `vs_postfix.sh` installs it).

    .venv/bin/python bench/aiosmtpd_floor.py                 # 2,000 messages
    .venv/bin/python bench/aiosmtpd_floor.py -n 10000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time

from _postroom import cpu_seconds, machine, mib, read_status_kib


def serve() -> None:
    import uvloop
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="floor.bench.test"), "127.0.0.1", 0
        )
        print(server.sockets[0].getsockname()[1], flush=True)  # the port, once it listens
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=2000, help="messages (2000)")
    parser.add_argument("-s", "--sessions", type=int, default=20, help="sessions (20)")
    parser.add_argument("--size", type=int, default=3000, help="message bytes (3000)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    source = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    if source is None:
        print("aiosmtpd_floor: smtp-source is missing (Postfix's package)", file=sys.stderr)
        return 2
    print(machine())
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = child.stdout.readline().strip()
        if not port.isdigit():
            print("aiosmtpd_floor: the server did not start", file=sys.stderr)
            return 1
        cpu_before = cpu_seconds(child.pid) or 0.0
        started = time.perf_counter()
        run = subprocess.run(
            [
                source,
                "-s",
                str(args.sessions),
                "-l",
                str(args.size),
                "-m",
                str(args.messages),
                "-f",
                "bench@floor.bench.test",
                "-t",
                "user@example.test",
                f"127.0.0.1:{port}",
            ],
            check=False,
        )
        wall = time.perf_counter() - started
        cpu = (cpu_seconds(child.pid) or 0.0) - cpu_before
        peak = read_status_kib(child.pid, "VmHWM")
    finally:
        child.terminate()
        child.wait(timeout=10)
    if run.returncode != 0:
        print(f"aiosmtpd_floor: smtp-source exited {run.returncode}", file=sys.stderr)
        return 1
    n = args.messages
    print(
        f"bare aiosmtpd: {n} messages in {wall:.2f} s = {n / wall:.1f} msgs/s; "
        f"server CPU {cpu:.2f} s = {cpu / n * 1e6:.0f} us a message "
        f"({cpu / wall:.0%} of one core); peak RSS {mib(peak)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
