"""The API served in a worker process (`api.in_workers`): what it asks the service, and how the
service answers.

A worker runs the same app as the service would (`create_app`), with these in its `AppState`:
a `Spool` whose every method call is made by the service (`RemoteSpool`), the webhook gateway
and the metrics of the service, and a `ServiceLink` (api/types.py) for what must be decided in
one place — the key lookup with its rate limits, the send pipeline after validation and
composition, readiness. The parsing, routing, validation, composition and answering of each
request, most of its cost, stay in the worker.

Owns both ends of that conversation but no transport: the worker's side is given a `call(op,
*args)` (relay/worker.py makes it a call over the channel to the service, a service gone being
`SpoolClosed`), and the service's side, `Answers`, answers each op with the service's own
`AppState`. What travels is pickled records and errors (both rebuild as themselves).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from api.auth import KeyCheck, check_key
from api.errors import NotFoundError
from api.messages import Item, Result, SendContext, check_key_for_send, send_items
from api.types import AppState
from store import AttemptResult, Principal, UrlRefusal, WebhookEndpoint

Call = Callable[..., Awaitable[Any]]

#: The spool's methods an API route may call from a worker process. The send pipeline's
#: (`hold_idempotency_keys`, `accept_many`) are not among them: `ServiceLink.send` runs it in the
#: service whole, so that the keys held and the commit are the one process's.
SPOOL_OPS = frozenset({
    "add_domain", "add_suppressions", "authenticate", "cancel_message", "create_template",
    "create_webhook", "default_sender_names", "delete_template", "delete_webhook",
    "find_messages", "get_domain", "get_message", "get_suppression", "get_template",
    "get_webhook", "inspect_domain", "inspect_domains", "last_event_id", "list_events",
    "list_suppressions", "list_templates", "list_webhook_attempts", "list_webhooks",
    "remove_domain", "remove_suppression", "replay_webhook", "reschedule_message",
    "rotate_webhook_secret", "set_default_sender_name", "stats", "unsubscribe",
    "unsubscribe_secret", "update_template", "update_webhook", "wait_for_events",
})

_GATEWAY_OPS = frozenset({"check_url", "send_test"})


# -- the worker's side -------------------------------------------------------------------------


class RemoteSpool:
    """Stands in for the `Spool` in a worker: `await spool.name(...)` is made by the service."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name not in SPOOL_OPS:
            raise AttributeError(f"the spool's {name} is not reached from a worker process")
        call = self._call

        async def forward(*args: Any, **kwargs: Any) -> Any:
            return await call("api.spool", name, args, kwargs)

        setattr(self, name, forward)  # found without __getattr__ from now on
        return forward


class RemoteGateway:
    """The service's webhook dispatcher (`WebhookGateway`), for the webhook routes."""

    def __init__(self, call: Call) -> None:
        self._call = call

    async def check_url(self, url: str) -> UrlRefusal | None:
        refusal: UrlRefusal | None = await self._call("api.webhook", "check_url", (url,))
        return refusal

    async def send_test(self, endpoint: WebhookEndpoint) -> AttemptResult:
        result: AttemptResult = await self._call("api.webhook", "send_test", (endpoint,))
        return result


class RemoteMetrics:
    """The service's metrics (`MetricsExporter`): `/metrics` shows the whole server's."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.content_type = "text/plain; version=0.0.4; charset=utf-8"

    async def render(self) -> bytes:
        self.content_type, body = await self._call("api.metrics")
        assert isinstance(body, bytes)
        return body


class Link:
    """The `ServiceLink` of a worker process."""

    def __init__(self, call: Call) -> None:
        self._call = call

    async def check_key(self, client: str, secret: str) -> KeyCheck:
        check: KeyCheck = await self._call("api.key", client, secret)
        return check

    async def check_key_for_send(
        self, client: str, secret: str, refs: Sequence[str], domains: Sequence[str]
    ) -> tuple[KeyCheck, SendContext | None]:
        answer: tuple[KeyCheck, SendContext | None] = await self._call(
            "api.key_for_send", client, secret, refs, domains
        )
        return answer

    async def send(self, principal: Principal, items: list[Item]) -> list[Result]:
        results: list[Result] = await self._call("api.send", principal, items)
        return results

    async def is_ready(self) -> bool:
        return bool(await self._call("api.ready"))


class WorkerReadiness:
    """A worker's `ReadinessProbe`: stopping once the service drains it. Whether the server is
    ready is the service's to say (`Link.is_ready`)."""

    def __init__(self) -> None:
        self.is_stopping = False

    @property
    def is_ready(self) -> bool:
        return not self.is_stopping


# -- the service's side ------------------------------------------------------------------------


class Answers:
    """Answers a worker's API ops with the service's own `AppState` (the app it does not serve
    itself): a value, or an awaitable the channel runs in a task of its own."""

    def __init__(self, state: AppState) -> None:
        assert state.link is None
        self._state = state

    def __call__(self, op: str, args: tuple[Any, ...]) -> Any:
        state = self._state
        if op == "api.key":
            return check_key(state, *args)
        if op == "api.key_for_send":
            return check_key_for_send(state, *args)
        if op == "api.send":
            return send_items(state, *args)
        if op == "api.spool":
            name, positional, named = args
            if name not in SPOOL_OPS:
                raise ValueError(f"the spool's {name!r} is not open to worker processes")
            return getattr(state.spool, name)(*positional, **named)
        if op == "api.ready":
            return state.readiness.is_ready
        if op == "api.metrics":
            return self._metrics()
        if op == "api.webhook":
            name, positional = args
            if name not in _GATEWAY_OPS or state.webhooks is None:
                raise ValueError(f"no webhook gateway op {name!r}")
            return getattr(state.webhooks, name)(*positional)
        raise ValueError(f"unknown API op {op!r}")

    async def _metrics(self) -> tuple[str, bytes]:
        exporter = self._state.metrics
        if exporter is None:
            raise NotFoundError()
        return exporter.content_type, await exporter.render()
