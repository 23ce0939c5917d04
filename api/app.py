"""The Starlette application: route table, error handlers and the shutdown gate.

Owns how requests reach the endpoints: every error is rendered by `api/errors.py`, every
unexpected exception becomes a logged 500 without a traceback in the body, and once the service
is stopping new requests get `503 service_unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import (
    domains,
    errors,
    events,
    manage,
    messages,
    openapi,
    stats,
    suppressions,
    templates,
    unsubscribe,
    webhooks,
)
from api.ratelimit import RateLimitHeaders, RateLimits
from api.recipient_domains import RecipientDomains, build_resolver
from api.types import (
    AppState,
    CpuPool,
    DomainTools,
    MetricsExporter,
    ReadinessProbe,
    ServiceLink,
    WebhookGateway,
)
from config import Settings
from store import Spool, StoreError

logger = logging.getLogger(__name__)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    if state.link is not None and not state.readiness.is_stopping:
        ready = await state.link.is_ready()  # a worker process: the spool's health is there
    else:
        ready = state.readiness.is_ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics, unauthenticated like the probes (restrict who reaches api.listen)."""
    state: AppState = request.app.state.postroom
    if state.metrics is None:
        raise errors.NotFoundError()
    return Response(await state.metrics.render(), media_type=state.metrics.content_type)


# Paths that keep answering while the service stops: probes, and metrics to watch the drain.
_ALWAYS_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})


class ShutdownGate:
    """Refuse new requests with 503 once the service is stopping (probes still answer), and
    answer the same way a request the HTTP server cancels when the stop's grace period ends.

    uvicorn cancels the requests still running then (one still reading a slow client's body,
    say) and would log the cancellation as an application error, with its traceback, and
    answer a plain-text 500. A request cancelled here is only ever the server's own
    cancellation: it logs one line, and a client whose answer had not started gets the 503 the
    stop gives every late request. A send cancelled while its commit was under way may still be
    stored, as for a client that disconnects: an `Idempotency-Key` makes the retry safe.
    """

    def __init__(self, app: ASGIApp, readiness: ReadinessProbe) -> None:
        self.app = app
        self.readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.readiness.is_stopping and scope["path"] not in _ALWAYS_OPEN:
            response = errors.render(errors.ServiceUnavailable())
            await response(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except asyncio.CancelledError:
            logger.warning(
                "%s %s cancelled by the stop: still running when its grace period ended%s",
                scope["method"], scope["path"], ", its answer cut short" if started else "",
            )
            if not started:
                with contextlib.suppress(Exception):
                    response = errors.render(errors.ServiceUnavailable(
                        "Postroom is stopping; the request was not finished"
                    ))
                    await response(scope, receive, send)


_HANDLERS = {
    errors.ApiError: errors.handle_api_error,
    StoreError: errors.handle_store_error,
    HTTPException: errors.handle_http_exception,
    ClientDisconnect: errors.handle_client_disconnect,
    Exception: errors.handle_unexpected,
}


def create_public_app(spool: Spool, settings: Settings, readiness: ReadinessProbe) -> Starlette:
    """The app of `api.public_listen`: the unsubscribe routes only — never the API, the probes
    or /metrics — so that listener can face the internet."""
    app = Starlette(routes=list(unsubscribe.routes), exception_handlers=_HANDLERS)
    app.state.postroom = AppState(spool=spool, settings=settings, readiness=readiness)
    app.add_middleware(ShutdownGate, readiness=readiness)
    return app


def create_app(
    spool: Spool,
    settings: Settings,
    readiness: ReadinessProbe,
    gateway: WebhookGateway | None = None,
    metrics_exporter: MetricsExporter | None = None,
    domain_tools: DomainTools | None = None,
    cpu_pool: CpuPool | None = None,
    link: ServiceLink | None = None,
) -> Starlette:
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint(openapi.document()), methods=["GET"]),
        Route("/v1/messages", messages.send_message, methods=["POST"]),
        Route("/v1/messages/batch", messages.send_batch, methods=["POST"]),
        Route("/v1/send", messages.send_compat, methods=["POST"]),
        Route("/v1/send/batch", messages.send_compat_batch, methods=["POST"]),
        Route("/v1/messages/{id}", messages.get_message, methods=["GET"]),
        *manage.routes,
        *events.routes,
        *webhooks.routes,
        *stats.routes,
        *domains.routes,
        *suppressions.routes,
        *templates.routes,
        *unsubscribe.routes,
    ]
    app = Starlette(routes=routes, exception_handlers=_HANDLERS)
    recipient_domains = None
    if settings.api.check_recipient_domains:
        recipient_domains = RecipientDomains(
            build_resolver(settings), settings.api.recipient_domain_cache_size
        )
    app.state.postroom = AppState(
        spool=spool,
        settings=settings,
        readiness=readiness,
        webhooks=gateway,
        domains=recipient_domains,
        metrics=metrics_exporter,
        limits=RateLimits(settings.api.auth_failures_per_minute, time.monotonic),
        domain_tools=domain_tools,
        cpu_pool=cpu_pool,
        link=link,
    )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(ShutdownGate, readiness=readiness)
    return app
