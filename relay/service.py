"""The service: everything Postroom runs, in one process and one asyncio loop — the SMTP
sessions and the API in worker processes beside it when `smtp.workers` asks for them
(relay/workers.py; the API unless `api.in_workers` is off: then this process answers what the
workers' API asks, api/remote.py).

Owns start-up (the spool, the SMTP listeners made with `loop.create_server` — STARTTLS on
`smtp.listen`, implicit TLS on `smtp.tls_listen`, one submission handler for all, or the bound
sockets handed to the workers — uvicorn serving the API without its own signal handling, or
the API's bound sockets handed to the workers, the
delivery engine, the webhook dispatcher),
supervision (every long-lived task is named and watched; one dying stops the service loudly),
signals, readiness, systemd notifications (READY=1 once the spool is open and every listener
bound, STOPPING=1, the watchdog), reloads (SIGHUP: relay/reload.py) and the shutdown order: stop
taking new work (new SMTP sessions get `421 4.3.2`, new HTTP requests 503) → let in-flight SMTP
transactions, delivery attempts and webhook requests finish within `server.shutdown_timeout` →
release the remaining leases → close the spool's writer last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import uvicorn
from cryptography import x509

from api import create_app, create_public_app
from api.remote import Answers
from config import ConfigError, Settings, load_settings, parse_address
from relay import egress, eventloop, logs
from relay.delivery import DeliveryEngine
from relay.dkim import sign_here
from relay.domains import Domains
from relay.frontdoor import LocalDoor
from relay.http_protocol import ApiServer, JoinedWritesProtocol, StartupError, os_reason

__all__ = ["Readiness", "Service", "StartupError", "load_tls_context", "tls_paths"]
from relay.metrics import Metrics
from relay.mx import MxResolver, build_resolver
from relay.notify import Notifier
from relay.reload import Apply, Prepare, Reloader, ReloadRefused
from relay.retention import RetentionSweeper
from relay.sessions import Sessions
from relay.submission import SubmissionHandler, protocol_factory, quiet_aiosmtpd_logging
from relay.webhooks import WebhookDispatcher
from relay.workers import WorkerFailed, Workers
from store import Spool, StoreError

logger = logging.getLogger(__name__)

#: listen(2)'s backlog for the SMTP sockets the workers share: asyncio's own default.
LISTEN_BACKLOG = 100


#: Settings the delivery engine and the webhook dispatcher take on at a reload (SIGHUP): they
#: are read per claim or per attempt. The others (timeouts, TLS policy, listeners, …) need a
#: restart, and the reload's log line says so.
_LIVE_DELIVERY = [
    f"delivery.{name}"
    for name in (
        "routes", "destinations", "max_connections", "max_connections_per_destination",
        "message_rate", "destination_backoff", "retry_schedule", "max_age", "return_path",
        "claim_batch", "poll_interval", "priority_aging", "mx_port", "allow_private_mx",
    )
]
_LIVE_WEBHOOKS = [
    f"webhooks.{name}"
    for name in (
        "allow_private_networks", "retry_schedule", "retry_jitter", "max_concurrency",
        "claim_batch", "poll_interval",
    )
]

@dataclass
class Readiness:
    """What `/readyz` reports: ready once everything is bound, until shutdown begins."""

    spool: Spool | None = None
    is_listening: bool = False
    is_stopping: bool = False

    @property
    def is_ready(self) -> bool:
        return (
            self.is_listening
            and not self.is_stopping
            and self.spool is not None
            and self.spool.is_healthy
        )


@dataclass
class Service:
    settings: Settings
    readiness: Readiness = field(default_factory=Readiness)
    smtp_addresses: list[tuple[str, int]] = field(default_factory=list)
    smtps_addresses: list[tuple[str, int]] = field(default_factory=list)
    api_address: tuple[str, int] | None = None
    #: Where `api.public_listen` (the unsubscribe routes only) listens, when it is set.
    public_address: tuple[str, int] | None = None
    spool: Spool | None = None
    metrics: Metrics | None = None
    sessions: Sessions | None = None
    #: The SMTP worker processes, with `smtp.workers` (relay/workers.py).
    workers: Workers | None = None
    notifier: Notifier = field(default_factory=Notifier.from_environment)
    reloader: Reloader = field(default_factory=Reloader)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tls: ssl.SSLContext | None = None
    _background: set[asyncio.Task[bool]] = field(default_factory=set)
    #: The listening SMTP sockets the workers accept on (the service never does).
    _worker_sockets: list[socket.socket] = field(default_factory=list)

    def stop(self) -> None:
        """Ask the service to shut down (signal handlers and tests call this)."""
        self._stop.set()

    def on_reload(self, name: str, fields: list[str], prepare: Prepare) -> None:
        """Let a subsystem change live on SIGHUP (relay/reload.py describes the two steps)."""
        self.reloader.register(name, fields, prepare)

    def request_reload(self) -> None:
        """Start a reload in the background (the SIGHUP handler)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run(self, *, handle_signals: bool = True, on_ready: object = None) -> None:
        """Start everything, run until `stop()` or a task dies, then shut down in order."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            spool = await Spool.open(settings)
        except StoreError as refused:  # e.g. a wrong or missing encryption key
            raise StartupError(str(refused)) from None
        self.spool = self.readiness.spool = spool
        metrics = self.metrics = Metrics(spool.queue_summary, webhook_backlog=spool.webhook_backlog)
        spool.observe(metrics)
        sessions = self.sessions = Sessions(metrics)
        self._register_reload_hooks()
        smtp_servers: list[asyncio.Server] = []
        tasks: dict[str, asyncio.Task[None]] = {}
        api_server: ApiServer | None = None
        public_server: ApiServer | None = None
        engine: DeliveryEngine | None = None
        dispatcher = WebhookDispatcher(
            spool,
            settings,
            egress.Egress(
                egress.build_resolver(settings), settings.webhooks.allow_private_networks
            ),
            metrics=metrics,
        )
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if handle_signals else ()
        try:
            quiet_aiosmtpd_logging()
            self._tls = tls = load_tls_context(settings)
            if settings.smtp.tls_listen and tls is None:
                cert = tls_paths(settings)[0]
                raise StartupError(f"smtp.tls_listen needs a certificate: none at {cert}")
            door = LocalDoor(spool, settings)
            if settings.smtp.worker_count:
                self.workers = Workers(settings, door, metrics)
            app = create_app(
                spool, settings, self.readiness, gateway=dispatcher, metrics_exporter=metrics,
                domain_tools=Domains(settings), cpu_pool=self.workers,
            )
            api_host, api_port = parse_address(settings.api.listen)
            workers = self.workers
            api_listeners: list[int] = []  # the workers serve the API when it has some
            if workers is not None:
                # Worker processes (relay/workers.py) accept on these; this process never
                # does, so its loop is left to the spool, delivery and webhooks — and the API,
                # unless the workers serve it too: then this app answers what they ask.
                listeners = await self._open_for_workers()
                if settings.api.in_workers:
                    api_listeners = await self._open_api_for_workers(api_host, api_port)
                    workers.answer_api = Answers(app.state.postroom)
                try:
                    await workers.start(
                        listeners, tls_paths(settings) if tls else None, api_listeners
                    )
                except WorkerFailed as failed:
                    raise StartupError(str(failed)) from None
                tasks["smtp-workers"] = asyncio.create_task(workers.run(), name="smtp-workers")
            else:
                await self._serve_smtp(SubmissionHandler(door, settings), sessions, smtp_servers)

            if not api_listeners:
                config = uvicorn.Config(
                    app, host=api_host, port=api_port, lifespan="off", access_log=False,
                    log_config=None, server_header=False, http=JoinedWritesProtocol,
                )
                api_server = ApiServer(config, "api.listen")
                tasks["api"] = await api_server.begin("api")
                sock = api_server.servers[0].sockets[0]
                self.api_address = sock.getsockname()[:2]
            if settings.api.public_listen is not None:
                public_server = await self._start_public(tasks)

            if recovered := await spool.recover_leases():
                logger.warning("%d delivery unit(s) were in flight at the last stop: due now",
                               recovered)
            engine = DeliveryEngine(
                spool, settings, MxResolver(build_resolver(settings)), self.smtp_addresses,
                sign_with=self.workers.sign if self.workers is not None else sign_here,
            )
            tasks["delivery"] = asyncio.create_task(engine.run(), name="delivery")
            live_engine = engine
            self.on_reload(
                "delivery", _LIVE_DELIVERY, lambda new: partial(live_engine.reconfigure, new)
            )
            self.on_reload(
                "webhooks", _LIVE_WEBHOOKS, lambda new: partial(dispatcher.reconfigure, new)
            )
            if recovered := await spool.recover_webhook_leases():
                logger.warning("%d webhook delivery(ies) were in flight at the last stop: due now",
                               recovered)
            tasks["webhooks"] = asyncio.create_task(dispatcher.run(), name="webhooks")
            tasks["retention"] = asyncio.create_task(
                RetentionSweeper(spool, settings).run(), name="retention"
            )
            if self.notifier.watchdog_interval is not None:
                tasks["watchdog"] = asyncio.create_task(
                    self.notifier.run_watchdog(), name="watchdog"
                )

            for sig in signals:
                loop.add_signal_handler(
                    sig, self.request_reload if sig == signal.SIGHUP else self.stop
                )
            if settings.policy.allow_unconfigured_domains:
                logger.warning(
                    "policy.allow_unconfigured_domains is on: mail from any From: domain is "
                    "accepted, unsigned unless the domain was added (a development setting)"
                )
            self.readiness.is_listening = True
            assert self.api_address is not None
            smtp = " ".join(f"{h}:{p}" for h, p in self.smtp_addresses)
            smtps = " ".join(f"{h}:{p}" for h, p in self.smtps_addresses) or "-"
            pids = ",".join(map(str, self.workers.pids)) if self.workers else "-"
            logger.info(
                "postroom ready: smtp=%s smtps=%s api=%s:%s loop=%s smtp_workers=%s", smtp, smtps,
                *self.api_address, eventloop.name_of(asyncio.get_running_loop()), pids,
            )
            self.notifier.ready(
                f"serving: smtp {smtp}, smtps {smtps}, api {api_host}:{self.api_address[1]}"
            )
            if callable(on_ready):
                on_ready(self)

            stopper = asyncio.create_task(self._stop.wait(), name="stop-request")
            done, _ = await asyncio.wait(
                [stopper, *tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            stopper.cancel()
            for name, task in tasks.items():
                if task in done:
                    exc = task.exception() if not task.cancelled() else None
                    logger.critical("task %s stopped unexpectedly: %r", name, exc)
                    raise RuntimeError(f"task {name} stopped unexpectedly") from exc
        finally:
            for sig in signals:
                if sig == signal.SIGHUP:  # a reload during the drain is not wanted
                    loop.remove_signal_handler(sig)
            if public_server is not None:
                public_server.should_exit = True  # no drain needed: each request is one write
            await self._shutdown(spool, smtp_servers, api_server, engine, dispatcher, tasks)
            for sig in signals:
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _serve_smtp(
        self, handler: SubmissionHandler, sessions: Sessions, servers: list[asyncio.Server]
    ) -> None:
        """Accept SMTP in this process: every listener's sessions on this loop."""
        loop = asyncio.get_running_loop()
        settings, tls = self.settings, self._tls
        factory = sessions.guard(
            protocol_factory(handler, tls, is_implicit_tls=False, make_smtp=sessions.make_smtp)
        )
        for listen in settings.smtp.listen:
            host, port = parse_address(listen)
            server = await _listen("smtp.listen", listen, loop.create_server(
                factory, host, port
            ))
            servers.append(server)
            self.smtp_addresses.append(server.sockets[0].getsockname()[:2])
        tls_factory = sessions.guard(
            protocol_factory(handler, tls, is_implicit_tls=True, make_smtp=sessions.make_smtp)
        )
        for listen in settings.smtp.tls_listen:
            host, port = parse_address(listen)
            server = await _listen("smtp.tls_listen", listen, loop.create_server(
                tls_factory, host, port, ssl=tls
            ))
            servers.append(server)
            self.smtps_addresses.append(server.sockets[0].getsockname()[:2])

    async def _open_for_workers(self) -> list[tuple[int, bool]]:
        """Bind and listen on every SMTP address without accepting: the workers will.

        Each socket's descriptor, with whether it is implicit TLS (the workers wrap it). The
        sockets are plain ones, not an event loop's server: uvloop's listens only once it
        serves, and only the workers accept.
        """
        listeners: list[tuple[int, bool]] = []
        for setting, addresses, is_implicit_tls, bound in (
            ("smtp.listen", self.settings.smtp.listen, False, self.smtp_addresses),
            ("smtp.tls_listen", self.settings.smtp.tls_listen, True, self.smtps_addresses),
        ):
            for listen in addresses:
                host, port = parse_address(listen)
                try:
                    sockets = await _bind(host, port)
                except OSError as exc:
                    raise StartupError(f"{setting} {listen}: {os_reason(exc)}") from None
                self._worker_sockets.extend(sockets)
                bound.append(sockets[0].getsockname()[:2])
                listeners.extend((sock.fileno(), is_implicit_tls) for sock in sockets)
        return listeners

    async def _open_api_for_workers(self, host: str | None, port: int) -> list[int]:
        """Bind and listen on `api.listen` for the workers to serve (`api.in_workers`)."""
        try:
            sockets = await _bind(host, port)
        except OSError as exc:
            raise StartupError(f"api.listen {self.settings.api.listen}: {os_reason(exc)}") from None
        self._worker_sockets.extend(sockets)
        self.api_address = sockets[0].getsockname()[:2]
        return [sock.fileno() for sock in sockets]

    async def _start_public(self, tasks: dict[str, asyncio.Task[None]]) -> ApiServer:
        """Serve the unsubscribe routes alone on `api.public_listen` (a second uvicorn server)."""
        settings = self.settings
        assert self.spool is not None and settings.api.public_listen is not None
        host, port = parse_address(settings.api.public_listen)
        config = uvicorn.Config(
            create_public_app(self.spool, settings, self.readiness), host=host, port=port,
            lifespan="off", access_log=False, log_config=None, server_header=False,
            http=JoinedWritesProtocol,
        )
        server = ApiServer(config, "api.public_listen")
        tasks["public-api"] = await server.begin("public-api")
        self.public_address = server.servers[0].sockets[0].getsockname()[:2]
        if settings.api.public_url is None:
            logger.warning("api.public_listen is set but api.public_url is not: marketing mail "
                           "gets no List-Unsubscribe link")
        return server

    async def _shutdown(
        self,
        spool: Spool,
        smtp_servers: list[asyncio.Server],
        api_server: ApiServer | None,
        engine: DeliveryEngine | None,
        dispatcher: WebhookDispatcher,
        tasks: dict[str, asyncio.Task[None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.server.shutdown_timeout
        deadline = loop.time() + timeout
        logger.info("postroom stopping: finishing work in flight (at most %gs)", timeout)
        self.notifier.stopping("finishing work in flight")
        # 1. No new work: readiness false and HTTP 503 (the ShutdownGate), SMTP 421 (sessions).
        self.readiness.is_stopping = True
        drains = []
        if self.sessions is not None and smtp_servers:
            self.sessions.drain()
            drains.append(self._drain_sessions(self.sessions, timeout))
        # 2. In-flight SMTP transactions and delivery attempts finish within the timeout; the
        #    engine gives back the leases of attempts it had to cut short.
        if self.workers is not None:

            def let_go() -> None:
                for sock in self._worker_sockets:
                    sock.close()

            drains.append(self.workers.stop(timeout, let_go))
        if engine is not None:
            drains.append(engine.stop(timeout))
        drains.append(dispatcher.stop(timeout))
        await asyncio.gather(*drains)
        for server in smtp_servers:
            server.close()
        for sock in self._worker_sockets:
            sock.close()
        if api_server is not None:
            remaining = max(1, math.ceil(deadline - loop.time()))
            api_server.config.timeout_graceful_shutdown = remaining
            api_server.should_exit = True
        watchdog = tasks.pop("watchdog", None)
        # The sweep has nothing to finish: a batch it was waiting for commits all the same.
        if (sweeper := tasks.pop("retention", None)) is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        for task in tasks.values():
            if not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(task), max(1.0, deadline - loop.time())
                    )
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        # 3. No attempt runs now: a unit still leased is one nobody will finish.
        try:
            if released := await spool.recover_leases():
                logger.info("released %d lease(s)", released)
        except StoreError as exc:
            logger.error("cannot release leases (they expire by themselves): %s", exc)
        # 4. The writer last: it commits what is queued, then closes.
        await spool.close()
        logger.info("postroom stopped")

    async def _drain_sessions(self, sessions: Sessions, timeout: float) -> None:  # noqa: ASYNC109
        if await sessions.wait_closed(timeout):
            return
        logger.warning(
            "%d SMTP session(s) still in a transaction after %gs: closing them", len(sessions),
            timeout,
        )
        sessions.close_all()
        await sessions.wait_closed(2.0)

    # -- reload (SIGHUP) ----------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and apply what can change live; whether it was applied.

        A config that does not load, or that a reload hook refuses, changes nothing: the reason
        is logged and the running configuration stays.
        """
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                return self._reload()
            finally:
                self.notifier.ready("serving")

    def _reload(self) -> bool:
        path = self.settings.config_path
        if path is None:
            logger.error("reload refused: Postroom was started without a config file")
            return False
        try:
            new = load_settings(path, must_exist=True)
        except ConfigError as exc:
            logger.error(
                "reload refused, the running config stays: %s", "; ".join(exc.problems)
            )
            return False
        try:
            plan = self.reloader.plan(self.settings, new)
        except ReloadRefused as exc:
            logger.error("reload refused, the running config stays: %s", exc)
            return False
        plan.apply()
        self.settings = new
        if self.workers is not None:
            self.workers.reconfigure(new, tls_paths(new))
        if plan.live:
            logger.info("reloaded %s: %s", path, ", ".join(str(c) for c in plan.live))
        else:
            logger.info("reloaded %s: no live setting changed", path)
        if plan.needs_restart:
            logger.warning(
                "changed, but only applied at the next restart: %s",
                ", ".join(str(c) for c in plan.needs_restart),
            )
        return True

    def _register_reload_hooks(self) -> None:
        # The delivery engine and the webhook dispatcher register theirs once they exist.
        self.on_reload("logging", ["server.log_level", "log.format"], _prepare_logging)
        # Read from self.settings when the shutdown begins.
        self.on_reload("shutdown", ["server.shutdown_timeout"], lambda new: _nothing)
        self.on_reload("tls", ["smtp.tls_cert", "smtp.tls_key"], self._prepare_tls)

    def _prepare_tls(self, new: Settings) -> Apply:
        """Load the certificate into a scratch context first; then into the live one.

        The live context is the one every listener's sessions use for STARTTLS: OpenSSL copies
        the certificate into each new connection, so the next handshake sees the new one and
        sessions already encrypted keep theirs. Certificates renewed in place are picked up by
        every reload, changed paths or not.
        """
        cert, key = tls_paths(new)
        live = self._tls
        if live is None:
            if new.smtp.tls_cert is not None or cert.exists():
                return lambda: logger.warning("TLS was off at start: restart to turn it on")
            return _nothing
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ReloadRefused(f"cannot load certificate {cert} with key {key}: {exc}") from None

        def apply() -> None:
            live.load_cert_chain(cert, key)
            logger.info("TLS certificate loaded from %s%s", cert, _describe_certificate(cert))

        return apply


def _nothing() -> None:
    pass


async def _bind(host: str | None, port: int) -> list[socket.socket]:
    """Listening TCP sockets on host:port, one per address it resolves to, bound as asyncio's
    `create_server` binds them (SO_REUSEADDR; an IPv6 socket IPv6 only)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _listen(setting: str, listen: str, starting: Awaitable[asyncio.Server]) -> asyncio.Server:
    try:
        return await starting
    except OSError as exc:
        raise StartupError(f"{setting} {listen}: {os_reason(exc)}") from None


def _prepare_logging(new: Settings) -> Apply:
    return lambda: logs.apply(new)


def _describe_certificate(path: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return ""
    expires = cert.not_valid_after_utc
    return f" (subject {cert.subject.rfc4514_string()}, expires {expires:%Y-%m-%d})"


def tls_paths(settings: Settings) -> tuple[Path, Path]:
    """The certificate and key: configured, else the self-signed pair `postroom init` made."""
    cert = settings.smtp.tls_cert or settings.tls_dir / "cert.pem"
    key = settings.smtp.tls_key or settings.tls_dir / "key.pem"
    return cert, key


def load_tls_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = tls_paths(settings)
    if not cert.exists() and settings.smtp.tls_cert is None:
        logger.warning("no TLS certificate at %s: STARTTLS and AUTH are off", cert)
        return None
    # OpenSSL's errors name neither the file nor the setting: open each file first.
    for setting, path in (("smtp.tls_cert", cert), ("smtp.tls_key", key)):
        try:
            path.open("rb").close()
        except OSError as exc:
            raise StartupError(f"{setting} {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise StartupError(
            f"smtp.tls_cert {cert} with smtp.tls_key {key}: cannot load ({exc.reason or exc})"
        ) from None
    return context
