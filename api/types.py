"""Shared types of the API package."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from api.ratelimit import RateLimits
from api.recipient_domains import RecipientDomains
from config import Settings
from store import (
    AttemptResult,
    DnsRecord,
    DomainKeys,
    Principal,
    Spool,
    UrlRefusal,
    WebhookEndpoint,
)

if TYPE_CHECKING:
    from api.auth import KeyCheck
    from api.messages import Item, Result, SendContext


class ReadinessProbe(Protocol):
    """What `/readyz` asks; the service provides it."""

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_stopping(self) -> bool: ...


class WebhookGateway(Protocol):
    """What the webhook routes need from the dispatcher; the service provides it."""

    async def check_url(self, url: str) -> UrlRefusal | None: ...

    async def send_test(self, endpoint: WebhookEndpoint) -> AttemptResult: ...
class MetricsExporter(Protocol):
    """What `GET /metrics` serves; the service provides it (Prometheus text format)."""

    @property
    def content_type(self) -> str: ...

    async def render(self) -> bytes: ...


T = TypeVar("T")


class CpuPool(Protocol):
    """Other processes that run CPU work for the API (the SMTP workers); the service provides it.

    The send routes hand it the validation and composition of their messages, so that the
    service's loop, which every other request and the spool's commits wait on, is spared them.
    """

    @property
    def width(self) -> int:
        """How many processes can take work now (0: none; the work stays here)."""
        ...

    async def offload(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in one of them: a module-level function, sent by reference."""
        ...


class DomainTools(Protocol):
    """What the domain routes need beyond the spool (keys, records, DNS); the service provides
    it."""

    def generate(self, name: str, selector: str, with_ed25519: bool, now: float) -> DomainKeys: ...

    def records(self, keys: DomainKeys) -> list[DnsRecord]: ...

    async def verify(self, keys: DomainKeys) -> list[DnsRecord]: ...


class ServiceLink(Protocol):
    """The process that owns the spool, seen from the API in a worker (`api.in_workers`).

    What must be decided in one place for the whole server is asked of it: the key lookup with
    its rate limits (one bucket per key, however many processes serve the API), the send
    pipeline after validation and composition (idempotency keys are held there, and `202`
    follows its commit), and readiness (the spool's health is known there). The other routes
    reach the spool through a `Spool` that forwards each call (api/remote.py).
    """

    async def check_key(self, client: str, secret: str) -> KeyCheck: ...

    async def check_key_for_send(
        self, client: str, secret: str, refs: Sequence[str], domains: Sequence[str]
    ) -> tuple[KeyCheck, SendContext | None]:
        """`check_key`, and the templates and sender names a send needs when the key admits it,
        in one question (`api.messages.check_key_for_send`)."""
        ...

    async def send(self, principal: Principal, items: list[Item]) -> list[Result]: ...

    async def is_ready(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class AppState:
    spool: Spool
    settings: Settings
    readiness: ReadinessProbe
    webhooks: WebhookGateway | None = None  # None: the webhook routes answer 503
    #: None when `api.check_recipient_domains` is off.
    domains: RecipientDomains | None = None
    metrics: MetricsExporter | None = None
    #: None: no limits at all (only for apps built without create_app's defaults).
    limits: RateLimits | None = None
    #: None: the domain routes that make keys or look records up answer 503.
    domain_tools: DomainTools | None = None
    #: None: every message is validated and composed in this process.
    cpu_pool: CpuPool | None = None
    #: Set in a worker process: the service that owns the spool (None: this process owns it).
    link: ServiceLink | None = None
