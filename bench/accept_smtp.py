"""Benchmark: how fast Postroom accepts messages over SMTP submission.

Sends N messages (default 500) over C concurrent sessions (default 20) with aiosmtplib. By
default every message gets a new connection, like Postfix's smtp-source: connect, EHLO,
(STARTTLS, EHLO, AUTH PLAIN with the API key as the password: only with --auth), MAIL FROM,
one RCPT TO, DATA with a ~3 KB message, QUIT. With --reuse each worker sends all its messages
over one connection (MAIL, RCPT, DATA per message).

Prints msgs/s (messages answered 250 after DATA per second of wall time), p50/p99 of the
acknowledgement latency in ms (from sending the message text to the reply after the final dot,
i.e. the time `smtp.data(...)` takes; Postroom answers 250 only once the message is committed),
p50/p99 of the whole per-message transaction for context, failures (and the first one), CPU
used by the client and by Postroom, and Postroom's peak RSS (VmHWM from /proc/<pid>/status) when
this script started Postroom itself.

Without --host/--port it starts a private Postroom (temp dir, 127.0.0.1 ephemeral ports,
127.0.0.0/8 trusted to relay so no AUTH is needed, delivery pointed at nothing so attempts just
defer) and stops it at the end; see bench/_postroom.py. Delivery runs in the same process
meanwhile: it is not what is measured, but it shares the CPU.

Run (from the project root, with the project's virtualenv):

    .venv/bin/python bench/accept_smtp.py                    # small: 500 messages, 20 sessions
    .venv/bin/python bench/accept_smtp.py --reuse            # same, one connection per session
    .venv/bin/python bench/accept_smtp.py -n 20000 -c 50     # full size
    .venv/bin/python bench/accept_smtp.py --host 127.0.0.1 --port 2525 --auth --key KEY

Certificates are not verified for STARTTLS (a benchmark talks to its own, often self-signed,
server). The client is one Python process too: on a small machine it competes with Postroom for
CPU, so read the printed CPU figures next to msgs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postroom

SENDER = "bench@acme.test"
RECIPIENT = "user@example.test"
CLIENT_NAME = "bench-client.test"  # given to aiosmtplib so it never looks up our own FQDN


def client_tls_context() -> ssl.SSLContext:
    """One context for every STARTTLS, not verifying the server (made once: building a context
    per connection, as aiosmtplib does by default, loads the CA bundle each time and costs the
    client ~30 ms of CPU per session)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


TLS_CONTEXT = client_tls_context()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Postroom's SMTP acceptance: msgs/s, p50/p99 DATA latency, peak RSS."
    )
    parser.add_argument("-n", "--messages", type=int, default=500, help="messages (500)")
    parser.add_argument("-c", "--concurrency", type=int, default=20, help="sessions (20)")
    parser.add_argument("--size", type=int, default=3000, help="approx. body bytes (3000)")
    parser.add_argument(
        "--reuse", action="store_true", help="one connection per session for all its messages"
    )
    parser.add_argument("--host", help="SMTP host of a running Postroom (default: start one)")
    parser.add_argument("--port", type=int, help="SMTP port of a running Postroom")
    parser.add_argument(
        "--auth", action="store_true", help="STARTTLS + AUTH PLAIN with --key as the password"
    )
    parser.add_argument("--key", help="API key for --auth (a private Postroom makes its own)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per SMTP command, s (60)")
    args = parser.parse_args(argv)
    if args.host and args.port is None:
        parser.error("--host needs --port")
    if args.port is not None and not args.host:
        args.host = "127.0.0.1"
    if args.auth and args.port is not None and not args.key:
        parser.error("--auth with a running Postroom needs --key")
    if args.messages < 1 or args.concurrency < 1:
        parser.error("-n and -c must be at least 1")
    return args


def make_message(i: int, body: str, stamp: str) -> bytes:
    headers = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: bench {stamp} #{i}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <bench-{stamp.replace(':', '')}-{i}@{CLIENT_NAME}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    return (headers + body).encode("ascii")


class Stats:
    def __init__(self) -> None:
        self.data_latency: list[float] = []
        self.transaction: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.first_failure: str | None = None

    def fail(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            label = f"{what}: {exc.code}"
            detail = f"{what}: {exc.code} {exc.message}"
        else:
            label = f"{what}: {type(exc).__name__}"
            detail = f"{what}: {type(exc).__name__}: {exc}"
        self.failures[label] += 1
        if self.first_failure is None:
            self.first_failure = detail


async def open_session(args: argparse.Namespace, host: str, port: int, key: str) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=CLIENT_NAME,
        timeout=args.timeout,
        start_tls=False,
        validate_certs=False,
    )
    await smtp.connect()
    try:
        await smtp.ehlo()
        if args.auth:
            await smtp.starttls(tls_context=TLS_CONTEXT)
            await smtp.ehlo()
            await smtp.auth_plain("bench", key)
    except BaseException:
        smtp.close()
        raise
    return smtp


async def send_one(smtp: aiosmtplib.SMTP, message: bytes, stats: Stats, started: float) -> bool:
    """MAIL, RCPT, DATA on an open session; records the DATA latency; False on a refusal."""
    try:
        await smtp.mail(SENDER)
        await smtp.rcpt(RECIPIENT)
    except aiosmtplib.SMTPResponseException as exc:
        stats.fail("MAIL/RCPT", exc)
        await smtp.rset()
        return False
    data_started = time.perf_counter()
    try:
        await smtp.data(message)
    except aiosmtplib.SMTPResponseException as exc:
        stats.fail("DATA", exc)
        return False
    done = time.perf_counter()
    stats.data_latency.append(done - data_started)
    stats.transaction.append(done - started)
    return True


async def worker_new_connections(
    args: argparse.Namespace,
    host: str,
    port: int,
    key: str,
    work: Iterable[int],
    messages: Callable[[int], bytes],
    stats: Stats,
) -> None:
    for i in work:
        message = messages(i)
        started = time.perf_counter()
        try:
            smtp = await open_session(args, host, port, key)
        except (aiosmtplib.SMTPException, OSError) as exc:
            stats.fail("connect/EHLO/AUTH", exc)
            continue
        try:
            await send_one(smtp, message, stats, started)
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError) as exc:
            stats.fail("session", exc)
        finally:
            smtp.close()


async def worker_reuse(
    args: argparse.Namespace,
    host: str,
    port: int,
    key: str,
    work: Iterable[int],
    messages: Callable[[int], bytes],
    stats: Stats,
) -> None:
    smtp: aiosmtplib.SMTP | None = None
    try:
        for i in work:
            message = messages(i)
            started = time.perf_counter()
            try:
                if smtp is None or not smtp.is_connected:
                    smtp = await open_session(args, host, port, key)
                await send_one(smtp, message, stats, started)
            except (aiosmtplib.SMTPException, OSError) as exc:
                stats.fail("session", exc)
                if smtp is not None:
                    smtp.close()
                smtp = None
        if smtp is not None:
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        stats.fail("QUIT", exc)
    finally:
        if smtp is not None:
            smtp.close()


async def run(
    args: argparse.Namespace,
    host: str,
    port: int,
    key: str,
    server: _postroom.PrivatePostroom | None,
) -> int:
    body = _postroom.body_text(args.size, newline="\r\n")
    stamp = time.strftime("%H:%M:%S")

    def messages(i: int) -> bytes:  # made per message: memory stays flat at any -n
        return make_message(i, body, stamp)

    stats = Stats()
    work = _postroom.WorkQueue(args.messages)  # shared: each message is sent once
    worker = worker_reuse if args.reuse else worker_new_connections

    # One probe session first: fail fast (and outside the timing) if the server is not usable.
    try:
        probe = await open_session(args, host, port, key)
        await probe.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        print(
            f"accept_smtp: cannot use SMTP {host}:{port}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2

    watch = _postroom.ProcessWatch(server)
    watch.begin()
    started = time.perf_counter()
    interrupted = await _postroom.run_workers(
        [
            worker(args, host, port, key, work, messages, stats)
            for _ in range(min(args.concurrency, args.messages))
        ],
        work,
    )
    wall = time.perf_counter() - started
    watch.end()

    accepted = len(stats.data_latency)
    failed = work.handed_out - accepted
    mode = "one connection per session (--reuse)" if args.reuse else "new connection per message"
    print(
        f"accept_smtp: {args.messages} messages, {args.concurrency} sessions, {mode}, "
        f"{len(messages(0))} B messages, {'STARTTLS+AUTH' if args.auth else 'no AUTH'}, "
        f"SMTP {host}:{port}"
    )
    print(
        f"accepted (250 after DATA): {accepted}/{work.handed_out} in {wall:.3f} s = "
        f"{accepted / wall:.1f} msgs/s"
    )
    print(
        f"failed: {failed}"
        + (
            " (" + ", ".join(f"{k} x{v}" for k, v in sorted(stats.failures.items())) + ")"
            if stats.failures
            else ""
        )
    )
    if stats.first_failure:
        print(f"  first failure: {stats.first_failure}")
    print(_postroom.latency_line("DATA acknowledgement latency", stats.data_latency))
    print(
        _postroom.latency_line(
            "whole message (MAIL..DATA)" if args.reuse else "whole message (connect..DATA)",
            stats.transaction,
        )
    )
    for line in watch.lines(wall) + _postroom.server_log_lines(server):
        print(line)
    if interrupted:
        print(f"INTERRUPTED after {work.handed_out} of {args.messages} messages")
        return 130
    return 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.port is not None:
        return asyncio.run(run(args, args.host, args.port, args.key or "", None))
    with _postroom.PrivatePostroom() as server:
        print(
            f"started a private postroom: pid {server.pid}, SMTP "
            f"{server.smtp_host}:{server.smtp_port}, API {server.api_url}, dir {server.workdir}"
        )
        code = asyncio.run(run(args, server.smtp_host, server.smtp_port, server.key, server))
    print(f"postroom stopped (exit code {server.exit_code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
