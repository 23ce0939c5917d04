"""The webhook dispatcher: claim due outbox rows, sign, POST, record the ack or the retry.

Owns the loop that leases bounded batches of due outbox rows (round-robin over endpoints, at most
`max_concurrency_per_endpoint` in flight for each, `max_concurrency` in all), one POST per row
with httpx (no redirects, one deadline for the whole attempt, at most `MAX_REPLY` bytes of the
answer read, the address pinned by `relay/egress.py`), signing
per the Standard Webhooks specification plus `X-Postroom-Signature`, and recording every attempt
with the row's next state in one spool write. Retry timing and signatures are pure functions
below. httpx's exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import cast

import httpx

from config import Settings
from relay.egress import Egress, Target
from relay.metrics import Metrics
from relay.tasks import drain, first_of
from store import (
    AttemptResult,
    Event,
    OutboxStatus,
    Spool,
    StoreError,
    UrlRefusal,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutcome,
    format_time,
)

logger = logging.getLogger(__name__)

TEST_EVENT_TYPE = "webhook.test"
_USER_AGENT = "Postroom-Webhooks/1"
#: The most of an endpoint's answer an attempt reads (bytes). The attempt log keeps only the
#: status code; reading a small answer to its end lets the connection be reused, and a larger
#: one is cut off by closing the connection, so a huge or endless reply costs no memory.
MAX_REPLY = 4096


# -- pure decisions -------------------------------------------------------------------------------


def retry_at(
    attempts_made: int,
    schedule: Sequence[float],
    jitter: float,
    now: float,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """When to try again after `attempts_made` failed attempts; None once the schedule is spent.

    The first attempt is immediate; step i of the schedule is the wait after the i-th failure,
    spread by ±`jitter` so endpoints that failed together are not retried in lockstep.
    """
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    delay = schedule[attempts_made - 1]
    return now + delay * (1 + jitter * (2 * rand() - 1))


def decide(
    result: AttemptResult,
    attempts_made: int,
    schedule: Sequence[float],
    jitter: float,
    now: float,
    rand: Callable[[], float] = random.random,
) -> WebhookOutcome:
    """2xx delivers; 410 Gone gives up and disables the endpoint; anything else is retried."""
    if result.is_success:
        return WebhookOutcome(OutboxStatus.DELIVERED)
    if result.status_code == 410:
        return WebhookOutcome(OutboxStatus.FAILED, disable_reason="the endpoint answered 410 Gone")
    due = retry_at(attempts_made, schedule, jitter, now, rand)
    if due is None:
        return WebhookOutcome(OutboxStatus.FAILED)
    return WebhookOutcome(OutboxStatus.PENDING, due_at=due)


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The signature headers: Standard Webhooks (one `v1,` signature per secret, space-separated)
    and `X-Postroom-Signature` (hex HMAC-SHA256 of the raw body under the newest secret)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.new(_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets_
    )
    simple = hmac.new(_key(secrets_[0]), body, hashlib.sha256).hexdigest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
        "X-Postroom-Signature": f"sha256={simple}",
    }


def event_payload(event: Event) -> bytes:
    """`{"id", "type", "created_at", "data"}` for one event."""
    data: dict[str, object] = {"message_id": event.message_id, "recipient": event.recipient}
    # `event.data` holds the reply and, for message events, the message's `tags` and
    # `metadata` (store/intake.py `attribute_data`), so they reach the payload from here.
    data.update(event.data)
    body = {
        "id": event.public_id,
        "type": event.type.value,
        "created_at": format_time(event.created_at),
        "data": data,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- I/O ------------------------------------------------------------------------------------------


class WebhookDispatcher:
    """Runs until `stop()`; one per service. Also answers the API's URL checks and test sends."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        egress: Egress,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._cfg = settings.webhooks
        self._egress = egress
        self._clock = clock
        self._rand = rand
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._busy: Counter[int] = Counter()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Webhook settings from a reload (SIGHUP): the next requests use them."""
        self._cfg = settings.webhooks
        self._egress.allow_private = settings.webhooks.allow_private_networks

    # The API's view (api/types.py WebhookGateway).

    async def check_url(self, url: str) -> UrlRefusal | None:
        target = await self._egress.target(url)
        return target if isinstance(target, UrlRefusal) else None

    async def send_test(self, endpoint: WebhookEndpoint) -> AttemptResult:
        """POST a `webhook.test` event to the endpoint now; log the attempt and return it."""
        now = self._clock()
        msg_id = "evt_test_" + secrets.token_hex(8)
        body = json.dumps(
            {
                "id": msg_id,
                "type": TEST_EVENT_TYPE,
                "created_at": format_time(now),
                "data": {"endpoint_id": endpoint.id, "message": "a test event from Postroom"},
            },
            separators=(",", ":"),
        ).encode()
        result = await self.post(endpoint, msg_id, body)
        await self._spool.record_webhook_test(endpoint, result)
        logger.info("webhook %s: test status=%s error=%s", endpoint.id, result.status_code,
                    result.error or "-")
        return result

    # The loop.

    async def run(self) -> None:
        while not self._stopping.is_set():
            cfg = self._cfg  # read each round: a reload may have changed it
            free = cfg.max_concurrency - len(self._running)
            claimed: list[WebhookDelivery] = []
            if free > 0 and await self._spool.has_due_webhooks(self._clock()):
                try:
                    claimed = await self._spool.claim_webhook_deliveries(
                        max_rows=min(free, cfg.claim_batch),
                        per_endpoint=cfg.max_concurrency_per_endpoint,
                        busy=dict(self._busy),
                        lease=cfg.lease,
                        now=self._clock(),
                    )
                except StoreError as exc:
                    # The spool could not commit the claim: try again at the next poll.
                    logger.error("cannot claim webhook deliveries: %s", exc)
            for delivery in claimed:
                self._busy[delivery.endpoint.seq] += 1
                task = asyncio.create_task(
                    self._deliver(delivery), name=f"webhook {delivery.event.public_id}"
                )
                self._running.add(task)
                task.add_done_callback(self._finished(delivery.endpoint.seq))
            if claimed and len(self._running) < cfg.max_concurrency:
                continue
            await self._wait(cfg.poll_interval)

    def _finished(self, seq: int) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._busy[seq] -= 1
            if self._busy[seq] <= 0:
                del self._busy[seq]
            self._slot_freed.set()

        return done

    async def _wait(self, timeout: float) -> None:  # noqa: ASYNC109
        self._slot_freed.clear()
        await first_of(
            (
                self._spool.wait_for_events(timeout),
                self._stopping.wait(),
                self._slot_freed.wait(),
            ),
            timeout,
        )

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop claiming; let running requests finish within `timeout`, release the rest."""
        self._stopping.set()
        await drain(self._running, timeout)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        event = delivery.event
        try:
            result = await self.post(delivery.endpoint, event.public_id, event_payload(event))
        except asyncio.CancelledError:
            await asyncio.shield(self._spool.release_webhook_deliveries([delivery.outbox_id]))
            raise
        attempts = delivery.attempts + 1
        outcome = decide(
            result, attempts, self._cfg.retry_schedule, self._cfg.retry_jitter, self._clock(),
            self._rand,
        )
        if self._metrics is not None:
            self._metrics.webhook_attempted(result, outcome)
        try:
            await self._spool.record_webhook_attempt(delivery, result, outcome)
        except StoreError as exc:
            # The lease expires and the row is sent again: at-least-once, same webhook-id.
            logger.error("webhook %s %s: cannot record the attempt: %s",
                         delivery.endpoint.id, event.public_id, exc)
            return
        logger.info(
            "webhook %s %s: attempt=%d status=%s latency=%.0fms outcome=%s%s",
            delivery.endpoint.id, event.public_id, attempts, result.status_code or "-",
            result.latency * 1000, outcome.status.value,
            f" ({result.error})" if result.error else "",
        )
        if outcome.disable_reason:
            logger.warning("webhook %s disabled: %s", delivery.endpoint.id, outcome.disable_reason)

    async def post(self, endpoint: WebhookEndpoint, msg_id: str, body: bytes) -> AttemptResult:
        """One signed POST to the endpoint's checked, pinned address; never raises for I/O.

        `webhooks.timeout` bounds the whole attempt (resolving, connecting, sending, the answer):
        httpx's own timeout applies to each read alone, so a receiver trickling a byte at a time
        could hold the attempt for ever. Settings keep the lease longer than this deadline, so a
        row is never claimed again while its attempt still runs.
        """
        started = time.monotonic()
        deadline = self._cfg.timeout
        try:
            async with asyncio.timeout(deadline):
                return await self._post(endpoint, msg_id, body, started)
        except TimeoutError:
            return AttemptResult(None, time.monotonic() - started, f"timed out after {deadline:g}s")

    async def _post(
        self, endpoint: WebhookEndpoint, msg_id: str, body: bytes, started: float
    ) -> AttemptResult:
        target = await self._egress.target(endpoint.url)
        if isinstance(target, UrlRefusal):
            return AttemptResult(None, time.monotonic() - started, f"refused: {target.message}")
        headers = {
            **sign(endpoint.secrets, msg_id, int(self._clock()), body),
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
            "Host": target.host_header,
        }
        extensions: Mapping[str, object] = (
            {"sni_hostname": target.host} if target.scheme == "https" else {}
        )
        if target.username is not None:  # user:password@ in the URL: HTTP Basic (RFC 7617)
            pair = f"{target.username}:{target.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        client = self._client(target)
        request = client.build_request(
            "POST", target.pinned_url, content=body, headers=headers, extensions=dict(extensions)
        )
        try:
            response = await client.send(request, stream=True)
            try:
                await _read_at_most(response, MAX_REPLY)
            finally:
                # Unread bytes left: httpcore closes the connection instead of pooling it.
                await response.aclose()
        except httpx.TimeoutException:
            error = f"timed out after {self._cfg.timeout:g}s"
        except httpx.ConnectError as exc:
            error = f"connection failed: {exc}" if str(exc) else "connection failed"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            return AttemptResult(response.status_code, time.monotonic() - started)
        return AttemptResult(None, time.monotonic() - started, error)

    def _client(self, target: Target) -> httpx.AsyncClient:
        """One client per (scheme, host): a connection verified for one name is never reused
        for another name on the same address."""
        key = (target.scheme, target.host)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                follow_redirects=False,
                timeout=self._cfg.timeout,
                trust_env=False,  # no proxies from the environment: the pinned address is used
                limits=httpx.Limits(
                    max_connections=self._cfg.max_concurrency_per_endpoint,
                    max_keepalive_connections=self._cfg.max_concurrency_per_endpoint,
                ),
            )
            self._clients[key] = client
        return client


async def _read_at_most(response: httpx.Response, limit: int) -> int:
    """Read up to about `limit` bytes of the body as sent (no decompression); return how many."""
    seen = 0
    # aiter_raw is an async generator (typed as an iterator): closed here, not by the GC later.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with aclosing(raw) as chunks:
        async for chunk in chunks:
            seen += len(chunk)
            if seen >= limit:
                break
    return seen
