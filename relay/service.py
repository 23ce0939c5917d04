"""The service: everything Postroom runs, in one process and one asyncio loop.

Owns start-up (the spool, the SMTP listeners made with `loop.create_server` — STARTTLS on
`smtp.listen`, implicit TLS on `smtp.tls_listen`, one submission handler for all — uvicorn
serving the API without its own signal handling, the delivery engine), supervision (every
long-lived task is named and watched; one dying stops the service loudly), signals, readiness,
and the shutdown order: stop taking new work → let in-flight attempts finish within
`server.shutdown_timeout` → release the remaining leases → close the spool's writer last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from api import create_app
from config import Settings, parse_address
from relay.delivery import DeliveryEngine
from relay.mx import MxResolver, build_resolver
from relay.submission import SubmissionHandler, protocol_factory, quiet_aiosmtpd_logging
from store import Spool

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Postroom cannot start with this configuration."""


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the service owns signals (STYLE.md gotcha 4)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


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
    spool: Spool | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        """Ask the service to shut down (signal handlers and tests call this)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True, on_ready: object = None) -> None:
        """Start everything, run until `stop()` or a task dies, then shut down in order."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        spool = await Spool.open(settings)
        self.spool = self.readiness.spool = spool
        smtp_servers: list[asyncio.Server] = []
        tasks: dict[str, asyncio.Task[None]] = {}
        api_server: _Server | None = None
        engine: DeliveryEngine | None = None
        try:
            quiet_aiosmtpd_logging()
            tls = load_tls_context(settings)
            if settings.smtp.tls_listen and tls is None:
                cert = tls_paths(settings)[0]
                raise StartupError(f"smtp.tls_listen needs a certificate: none at {cert}")
            handler = SubmissionHandler(spool, settings)
            factory = protocol_factory(handler, tls, is_implicit_tls=False)
            for listen in settings.smtp.listen:
                host, port = parse_address(listen)
                server = await loop.create_server(factory, host, port)
                smtp_servers.append(server)
                self.smtp_addresses.append(server.sockets[0].getsockname()[:2])
            tls_factory = protocol_factory(handler, tls, is_implicit_tls=True)
            for listen in settings.smtp.tls_listen:
                host, port = parse_address(listen)
                server = await loop.create_server(tls_factory, host, port, ssl=tls)
                smtp_servers.append(server)
                self.smtps_addresses.append(server.sockets[0].getsockname()[:2])

            app = create_app(spool, settings, self.readiness)
            api_host, api_port = parse_address(settings.api.listen)
            config = uvicorn.Config(
                app, host=api_host, port=api_port, lifespan="off", access_log=False,
                log_config=None, server_header=False,
            )
            api_server = _Server(config)
            tasks["api"] = asyncio.create_task(api_server.serve(), name="api")
            while not api_server.started:
                if tasks["api"].done():
                    await tasks["api"]  # raises what stopped it (e.g. the port is taken)
                    raise RuntimeError("the API server stopped during start-up")
                await asyncio.sleep(0.01)
            sock = api_server.servers[0].sockets[0]
            self.api_address = sock.getsockname()[:2]

            if recovered := await spool.recover_leases():
                logger.warning("%d delivery unit(s) were in flight at the last stop: due now",
                               recovered)
            engine = DeliveryEngine(spool, settings, MxResolver(build_resolver(settings)))
            tasks["delivery"] = asyncio.create_task(engine.run(), name="delivery")

            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop)
            self.readiness.is_listening = True
            smtp = " ".join(f"{h}:{p}" for h, p in self.smtp_addresses)
            smtps = " ".join(f"{h}:{p}" for h, p in self.smtps_addresses) or "-"
            logger.info("postroom ready: smtp=%s smtps=%s api=%s:%s", smtp, smtps,
                        *self.api_address)
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
            await self._shutdown(spool, smtp_servers, api_server, engine, tasks)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _shutdown(
        self,
        spool: Spool,
        smtp_servers: list[asyncio.Server],
        api_server: _Server | None,
        engine: DeliveryEngine | None,
        tasks: dict[str, asyncio.Task[None]],
    ) -> None:
        logger.info("postroom stopping")
        self.readiness.is_stopping = True
        timeout = self.settings.server.shutdown_timeout
        for server in smtp_servers:
            server.close()  # no new SMTP sessions; sessions in progress finish below
        if api_server is not None:
            api_server.should_exit = True
        if engine is not None:
            await engine.stop(timeout)
        for server in smtp_servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        for task in tasks.values():
            if not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await spool.close()
        logger.info("postroom stopped")


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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
