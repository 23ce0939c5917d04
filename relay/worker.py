"""An SMTP worker process (`smtp.workers`): SMTP sessions on the service's listening sockets.

`postroom serve` starts it as `python -m relay.worker FD LOOP`, FD being its end of a socketpair
to the service process (relay/workers.py). The service opened the listening sockets and passes
them on; every worker accepts on the same ones, and the kernel hands each new connection to one
of them. A worker runs the same sessions as the service would (relay/submission.py and
relay/sessions.py); what they share with the rest of the server it asks the service, through
`RemoteDoor`: admission, key lookups, AUTH lock-outs, and the commit, whose answer is the reply
to DATA — so `250` still follows the spool's commit, made by the one process that writes. The
other way, the service hands a worker CPU work its loop is spared: DKIM signatures, and the
validation and composition of API messages (`call`: a function of ours, by reference, and its
arguments).

It stops, finishing the transactions in flight, on the service's `drain`, on SIGTERM or SIGINT
(systemd signals the whole unit); it stops at once if the service is gone, because nothing can
be committed then: a message in flight gets `451`, and the listening sockets are let go so that
a restarted service can listen again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

from config import EventLoop, Settings
from relay import eventloop, logs
from relay.ipc import Channel, ChannelClosed, StartSettings
from relay.sessions import Sessions
from relay.submission import Admission, SubmissionHandler, protocol_factory, quiet_aiosmtpd_logging
from relay.throttle import AuthVerdict
from store import Principal, SpoolClosed, Submission

logger = logging.getLogger(__name__)


class RemoteDoor:
    """The `Door` of a worker: every question goes to the service process."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def _call(self, op: str, *args: Any) -> Any:
        # The service's own exceptions (SpoolClosed among them) are raised here as themselves.
        try:
            return await self._channel.call(op, *args)
        except ChannelClosed:
            raise SpoolClosed("the service process is gone") from None

    def admit(self, host: str) -> Awaitable[Admission]:
        return self._call("admit", host)

    def release(self, client: str) -> None:
        self._channel.notify("release", client)

    async def is_locked(self, client: str) -> bool:
        return bool(await self._call("is_locked", client))

    async def authenticate(self, secret: str) -> Principal | None:
        principal = await self._call("authenticate", secret)
        assert principal is None or isinstance(principal, Principal)
        return principal

    async def auth_succeeded(self, client: str) -> None:
        await self._call("auth_succeeded", client)

    async def auth_failed(self, client: str) -> AuthVerdict:
        verdict = await self._call("auth_failed", client)
        assert isinstance(verdict, AuthVerdict)
        return verdict

    async def commit(self, submission: Submission, host: str) -> str:
        return str(await self._call("commit", submission, host))


class _Note:
    def __init__(self, channel: Channel, name: str) -> None:
        self._channel = channel
        self._name = name

    def inc(self) -> None:
        self._channel.notify("metric", self._name)


class RemoteMetrics:
    """A worker's session metrics, counted by the service (`/metrics` is the service's).

    Sessions opened and closed are counted there at admission and release already.
    """

    def __init__(self, channel: Channel) -> None:
        self.smtp_sessions = _Note(channel, "smtp_sessions")
        self.smtp_auth_failures = _Note(channel, "smtp_auth_failures")

    def smtp_session_opened(self) -> None:
        pass

    def smtp_session_closed(self) -> None:
        pass


def tls_context(paths: tuple[Path, Path] | None) -> ssl.SSLContext | None:
    """The worker's own context for the certificate the service loaded (and checked) first."""
    if paths is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*paths)
    return context


async def run(fd: int) -> int:
    loop = asyncio.get_running_loop()
    channel = await Channel.over(socket.socket(fileno=fd))
    _, _, op, args = await channel.receive()
    assert op == "start"
    settings, listeners, tls_paths, index, started_with = args
    assert isinstance(settings, Settings) and isinstance(started_with, Settings)
    logs.configure(settings)
    quiet_aiosmtpd_logging()
    tls = tls_context(tls_paths)
    sessions = Sessions(RemoteMetrics(channel))
    handler = SubmissionHandler(RemoteDoor(channel), settings)
    servers: list[asyncio.Server] = []
    for listener_fd, is_implicit_tls in listeners:
        factory = sessions.guard(protocol_factory(
            handler, tls, is_implicit_tls=is_implicit_tls, make_smtp=sessions.make_smtp
        ))
        servers.append(await loop.create_server(
            factory, sock=socket.socket(fileno=listener_fd), ssl=tls if is_implicit_tls else None
        ))
    stop = asyncio.Event()
    may_exit = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def handle(op: str, args: tuple[Any, ...]) -> object:
        if op == "call":  # CPU work the service hands over (relay/workers.py `offload`)
            function, function_args = args
            return function(*(
                started_with if type(a) is StartSettings else a for a in function_args
            ))
        if op == "ping":  # the service's watchdog: answered by this loop, so it is not stuck
            return b"pong"
        if op == "drain":
            stop.set()
        elif op == "exit":
            may_exit.set()
        elif op == "settings":
            _reconfigure(args[0], args[1], tls)
        return None

    served = asyncio.create_task(channel.serve(handle), name="channel")
    eventloop.settle_heap()
    channel.notify("ready", index)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([served, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if served.done():
        # The service is gone: nothing can be committed any more, and it may be restarting.
        logger.error("smtp worker %d: the service process is gone, stopping", index)
        for server in servers:
            server.close()
        sessions.drain()
        sessions.close_all()
        await sessions.wait_closed(2.0)
        return 1
    # Like the service's own drain (relay/service.py): new sessions get 421, idle ones are
    # closed, transactions finish, within `server.shutdown_timeout`.
    sessions.drain()
    if not await sessions.wait_closed(settings.server.shutdown_timeout):
        logger.warning("smtp worker %d: %d session(s) still open: closing them", index,
                       len(sessions))
        sessions.close_all()
        await sessions.wait_closed(2.0)
    # New connections still get 421 until every worker is done: the listening sockets close
    # when the last process lets them go, and a client left in their backlog would be reset.
    channel.notify("drained")
    await asyncio.wait([served, asyncio.create_task(may_exit.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    channel.close()
    served.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await served
    return 0


def _reconfigure(settings: Settings, tls_paths: tuple[Path, Path] | None,
                 tls: ssl.SSLContext | None) -> None:
    """After the service reloaded (SIGHUP): the log settings and the certificate."""
    logs.apply(settings)
    if tls is not None and tls_paths is not None:
        try:
            tls.load_cert_chain(*tls_paths)
        except (OSError, ssl.SSLError) as exc:
            logger.error("smtp worker: cannot load the certificate %s: %s", tls_paths[0], exc)


def main() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the service's; it tells us
    fd, event_loop = int(sys.argv[1]), sys.argv[2]  # event_loop: `server.event_loop`
    assert event_loop in ("auto", "uvloop", "asyncio")
    sys.exit(eventloop.run(run(fd), cast(EventLoop, event_loop)))


if __name__ == "__main__":
    main()
