"""Spool methods for webhook endpoints and their outbox (the SQL jobs: store/webhooks.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping

from store import webhooks
from store.records import (
    AttemptResult,
    NewWebhook,
    WebhookAttempt,
    WebhookChange,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutcome,
)
from store.spool_base import SpoolBase
from store.sql import Q


class SpoolWebhooks(SpoolBase):
    """Webhook endpoints, the outbox's claims and attempts, replays."""

    # -- webhooks ---------------------------------------------------------------------------

    async def create_webhook(
        self, url: str, event_types: tuple[str, ...], description: str = "", enabled: bool = True
    ) -> NewWebhook:
        """Create an endpoint; its signing secret is returned only now."""
        return await self._writer.run(
            lambda conn: webhooks.create_job(
                conn, url, event_types, description, enabled, time.time()
            )
        )

    async def list_webhooks(self) -> list[WebhookEndpoint]:
        async with self._read() as conn:
            return await webhooks.list_endpoints(conn, time.time())

    async def get_webhook(self, endpoint_id: str) -> WebhookEndpoint:
        async with self._read() as conn:
            return await webhooks.get_endpoint(conn, endpoint_id, time.time())

    async def update_webhook(self, endpoint_id: str, change: WebhookChange) -> WebhookEndpoint:
        endpoint = await self._writer.run(
            lambda conn: webhooks.update_job(conn, endpoint_id, change, time.time())
        )
        self.notify_events()  # re-enabled: its waiting rows are due now
        return endpoint

    async def rotate_webhook_secret(self, endpoint_id: str) -> NewWebhook:
        overlap = self._settings.webhooks.secret_rotation_overlap
        return await self._writer.run(
            lambda conn: webhooks.rotate_job(conn, endpoint_id, overlap, time.time())
        )

    async def delete_webhook(self, endpoint_id: str) -> None:
        await self._writer.run(lambda conn: webhooks.delete_job(conn, endpoint_id, time.time()))

    async def webhook_backlog(self) -> int:
        """Outbox rows owed to enabled endpoints (due, retrying or in flight)."""
        async with self._read() as conn:
            return await webhooks.count_backlog(conn)

    async def has_due_webhooks(self, now: float | None = None) -> bool:
        """Whether any outbox row is due (a cheap read before claiming through the writer)."""
        at = time.time() if now is None else now
        return bool(await self._point_read(Q["has_due_webhooks"], {"now": at}))

    async def claim_webhook_deliveries(
        self,
        max_rows: int,
        per_endpoint: int,
        busy: Mapping[int, int],
        lease: float,
        now: float | None = None,
    ) -> list[WebhookDelivery]:
        """Lease due outbox rows, round-robin over endpoints (see `webhooks.claim_job`).

        `now` is the caller's clock (the dispatcher's, so a test clock drives what is due and
        the lease); None reads the wall clock.
        """
        at = time.time() if now is None else now
        start = self._rotation
        self._rotation += 1
        return await self._writer.run(
            lambda conn: webhooks.claim_job(conn, max_rows, per_endpoint, busy, lease, at, start)
        )

    async def record_webhook_attempt(
        self, delivery: WebhookDelivery, result: AttemptResult, outcome: WebhookOutcome
    ) -> None:
        await self._writer.run(
            lambda conn: webhooks.record_job(conn, delivery, result, outcome, time.time())
        )

    async def record_webhook_test(self, endpoint: WebhookEndpoint, result: AttemptResult) -> None:
        await self._writer.run(
            lambda conn: webhooks.log_attempt(conn, endpoint.seq, None, 1, result, time.time())
        )

    async def recover_webhook_leases(self) -> int:
        """Outbox rows a crashed run left in flight are due now (the owner, at start-up)."""
        return await self._writer.run(
            lambda conn: conn.execute(
                Q["release_all_webhook_leases"], {"now": time.time()}
            ).rowcount
        )

    async def release_webhook_deliveries(self, outbox_ids: Iterable[int]) -> None:
        ids = list(outbox_ids)
        if not ids:
            return

        def job(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(Q["release_webhook_lease"], [{"id": i, "now": now} for i in ids])

        await self._writer.run(job)

    async def list_webhook_attempts(
        self, endpoint_id: str, before: int | None = None, limit: int = 50
    ) -> list[WebhookAttempt]:
        """An endpoint's attempt log, newest first."""
        async with self._read() as conn:
            endpoint = await webhooks.get_endpoint(conn, endpoint_id, time.time())
            return await webhooks.list_attempts(conn, endpoint.seq, before or 2**62, limit)

    async def replay_webhook(
        self, endpoint_id: str, from_event: int = 0, since: float = 0.0
    ) -> int:
        """Queue the endpoint's events from an event or a time on again; return how many."""
        limit = self._settings.webhooks.replay_limit
        count = await self._writer.run(
            lambda conn: webhooks.replay_job(
                conn, endpoint_id, from_event, since, limit, time.time()
            )
        )
        self.notify_events()
        return count
