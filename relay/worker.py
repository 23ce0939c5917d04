"""A worker process (`smtp.workers`): SMTP sessions, and the API, on the service's listening
sockets.

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

With `api.in_workers`, a worker also serves the HTTP API on the service's `api.listen` sockets
(`_Api`): the same app as the service would run, each request parsed, validated, composed and
answered here, and what only the service can decide asked of it (api/remote.py) — the key
lookup and rate limits, the send after composition (so `202` follows the commit, as `250`
does), the spool's reads and writes, readiness and metrics.

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import uvicorn

from api import create_app, remote
from config import EventLoop, Settings
from relay import eventloop, logs
from relay.domains import Domains
from relay.http_protocol import ApiServer, JoinedWritesProtocol
from relay.ipc import Channel, ChannelClosed, StartSettings
from relay.sessions import Sessions
from relay.submission import Admission, SubmissionHandler, protocol_factory, quiet_aiosmtpd_logging
from relay.throttle import AuthVerdict
from store import Principal, Spool, SpoolClosed, Submission

logger = logging.getLogger(__name__)


def asking(channel: Channel) -> Callable[..., Awaitable[Any]]:
    """`call(op, *args)` to the service: its own exceptions (SpoolClosed among them) are raised
    here as themselves, and a service gone is `SpoolClosed` too."""

    async def call(op: str, *args: Any) -> Any:
        try:
            return await channel.call(op, *args)
        except ChannelClosed:
            raise SpoolClosed("the service process is gone") from None

    return call


class RemoteDoor:
    """The `Door` of a worker: every question goes to the service process."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._call = asking(channel)

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


class _Api:
    """The API on `api.listen`, when the service hands it to the workers (`api.in_workers`): the
    app the service would run, its spool, keys, sends and readiness asked of the service."""

    def __init__(self, channel: Channel, settings: Settings) -> None:
        call = asking(channel)
        self.readiness = remote.WorkerReadiness()
        app = create_app(
            cast(Spool, remote.RemoteSpool(call)), settings, self.readiness,
            gateway=remote.RemoteGateway(call), metrics_exporter=remote.RemoteMetrics(call),
            domain_tools=Domains(settings), link=remote.Link(call),
        )
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, server_header=False,
            http=JoinedWritesProtocol,
        )
        self.server = ApiServer(config, "api.listen")
        self.task: asyncio.Task[None] | None = None

    async def start(self, fds: list[int]) -> None:
        self.task = await self.server.begin("api", [socket.socket(fileno=fd) for fd in fds])

    def drain(self) -> None:
        """New requests get 503 (the ShutdownGate); the ones in flight go on."""
        self.readiness.is_stopping = True

    async def wait_answered(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Until no request is in flight, or `timeout`; whether none is."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.server.in_flight:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.config.timeout_graceful_shutdown = 1
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task


async def run(fd: int) -> int:
    loop = asyncio.get_running_loop()
    channel = await Channel.over(socket.socket(fileno=fd))
    _, _, op, args = await channel.receive()
    assert op == "start"
    settings, listeners, api_listeners, tls_paths, index, started_with = args
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
    api = _Api(channel, started_with) if api_listeners else None
    if api is not None:
        await api.start(api_listeners)
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
            if api is not None:
                api.drain()
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
        if api is not None:
            api.drain()
            await api.stop()
        await sessions.wait_closed(2.0)
        return 1
    # Like the service's own drain (relay/service.py): new sessions get 421, idle ones are
    # closed, transactions finish, within `server.shutdown_timeout`; new HTTP requests get 503,
    # the ones in flight are answered.
    sessions.drain()
    if api is not None:
        api.drain()
    deadline = loop.time() + settings.server.shutdown_timeout
    if not await sessions.wait_closed(settings.server.shutdown_timeout):
        logger.warning("smtp worker %d: %d session(s) still open: closing them", index,
                       len(sessions))
        sessions.close_all()
        await sessions.wait_closed(2.0)
    if api is not None and not await api.wait_answered(max(0.0, deadline - loop.time())):
        logger.warning("smtp worker %d: %d HTTP request(s) still in flight", index,
                       api.server.in_flight)
    # New connections still get 421 until every worker is done: the listening sockets close
    # when the last process lets them go, and a client left in their backlog would be reset.
    channel.notify("drained")
    await asyncio.wait([served, asyncio.create_task(may_exit.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    if api is not None:
        await api.stop()
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
