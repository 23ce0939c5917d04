"""Prometheus metrics: every `postroom_*` family, in one registry per service.

Owns the metric definitions (prometheus_client), the spool observer that feeds them (commits on
the writer's thread, acceptances, recorded outcomes), the SMTP session counters the session
tracker calls, the webhook counters the dispatcher calls, and `render()` for `GET /metrics`: the
queue and webhook backlog gauges come from short spool reads, cached for `QUEUE_CACHE` seconds
so scrapes stay cheap however often they come. A per-service `CollectorRegistry` (not the
library's global one) lets several services share a process (tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from store import (
    Accepted,
    AttemptResult,
    DeliveryJob,
    OutboxStatus,
    Outcome,
    QueueSummary,
    RecipientStatus,
    Source,
    StoreError,
    Submission,
    WebhookOutcome,
)

logger = logging.getLogger(__name__)

#: How long a queue summary serves scrapes before the spool is asked again (seconds).
QUEUE_CACHE = 2.0

# Queued → delivered spans seconds (a fast MX) to days (the retry schedule's tail).
_LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 7200, 18000, 86400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_ATTEMPT_OUTCOMES = (
    RecipientStatus.DELIVERED,
    RecipientStatus.DEFERRED,
    RecipientStatus.BOUNCED,
    RecipientStatus.FAILED,
)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The service's metrics; also its spool observer (store/observer.py)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        queue_summary: Callable[[], Awaitable[QueueSummary]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        webhook_backlog: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self._queue_summary = queue_summary
        self._webhook_backlog = webhook_backlog
        self._clock = clock
        self._refreshed_at: float | None = None
        self._refresh_lock = asyncio.Lock()
        r = self.registry = CollectorRegistry()

        # -- intake and delivery --
        self.messages_accepted = Counter(
            "postroom_messages_accepted", "Messages committed to the spool, by front door.",
            ["source"], registry=r,
        )
        self.outcomes = Counter(
            "postroom_recipient_outcomes", "Delivery outcomes recorded, by recipient status.",
            ["status"], registry=r,
        )
        self._outcome_counters: dict[RecipientStatus, Any] = {}
        self.delivery_latency = Histogram(
            "postroom_delivery_latency_seconds",
            "From accepted to delivered, per delivered recipient.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # -- the queue (refreshed on scrape) --
        self.queue_depth = Gauge(
            "postroom_queue_depth", "Pending delivery units, by status.", ["status"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "postroom_queue_oldest_age_seconds",
            "Age of the oldest pending delivery unit (0 when the queue is empty).", registry=r,
        )
        # -- SMTP submission --
        self.smtp_sessions = Counter(
            "postroom_smtp_sessions",
            "SMTP sessions opened, including those refused while shutting down.", registry=r,
        )
        self.smtp_sessions_active = Gauge(
            "postroom_smtp_sessions_active", "SMTP sessions open now.", registry=r
        )
        self.smtp_auth_failures = Counter(
            "postroom_smtp_auth_failures", "AUTH attempts refused with 535 5.7.8.", registry=r
        )
        self.smtp_workers = Gauge(
            "postroom_smtp_workers", "SMTP worker processes accepting sessions now.", registry=r
        )
        self.smtp_worker_restarts = Counter(
            "postroom_smtp_worker_restarts",
            "SMTP worker processes started again after one died or was stopped.", registry=r,
        )
        # -- the spool's group-commit writer --
        self.commit_batch = Histogram(
            "postroom_spool_commit_batch_size", "Jobs carried by one group commit.",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.commit_seconds = Histogram(
            "postroom_spool_commit_seconds", "BEGIN IMMEDIATE to COMMIT of one group commit.",
            buckets=_COMMIT_BUCKETS, registry=r,
        )
        self.commit_failures = Counter(
            "postroom_spool_commit_failures", "Group commits that failed (each job failed).",
            registry=r,
        )
        # -- webhooks (the dispatcher; the backlog is refreshed on scrape) --
        self.webhook_attempts = Counter(
            "postroom_webhook_attempts", "Outbox deliveries attempted (one POST each).",
            registry=r,
        )
        self.webhook_failures = Counter(
            "postroom_webhook_failures",
            "Outbox delivery attempts without a 2xx answer (status, timeout, connection).",
            registry=r,
        )
        self.webhook_given_up = Counter(
            "postroom_webhook_given_up",
            "Outbox rows abandoned: retries spent or the endpoint answered 410 Gone.", registry=r,
        )
        self.webhook_backlog = Gauge(
            "postroom_webhook_backlog",
            "Outbox rows owed to enabled endpoints: due, waiting for a retry, or in flight.",
            registry=r,
        )

        # Every labelled family shows all its series from the first scrape, at zero.
        for source in Source:
            self.messages_accepted.labels(source.value)
        for status in _ATTEMPT_OUTCOMES:
            self.outcomes.labels(status.value)
        for status in RecipientStatus:
            if not status.is_final:
                self.queue_depth.labels(status.value)

    # -- the spool observer (store/observer.py) -----------------------------------------------

    def committed(self, jobs: int, seconds: float) -> None:
        self.commit_batch.observe(jobs)
        self.commit_seconds.observe(seconds)

    def commit_failed(self, jobs: int) -> None:
        self.commit_failures.inc()

    def accepted(self, submission: Submission, accepted: Accepted) -> None:
        self.messages_accepted.labels(submission.source.value).inc()

    def recorded(self, job: DeliveryJob, outcomes: Sequence[Outcome], now: float) -> None:
        for outcome in outcomes:
            # A status's child counter is looked up once: `labels()` takes a lock and builds a
            # key each time, once per delivered message.
            counter = self._outcome_counters.get(outcome.status)
            if counter is None:
                counter = self._outcome_counters[outcome.status] = self.outcomes.labels(
                    outcome.status.value
                )
            counter.inc()
            if outcome.status is RecipientStatus.DELIVERED and job.created_at:
                self.delivery_latency.observe(max(0.0, now - job.created_at))

    # -- SMTP sessions (relay/sessions.py) ----------------------------------------------------

    def smtp_session_opened(self) -> None:
        self.smtp_sessions.inc()
        self.smtp_sessions_active.inc()

    def smtp_session_closed(self) -> None:
        self.smtp_sessions_active.dec()

    # -- webhook deliveries (relay/webhooks.py) ----------------------------------------------

    def webhook_attempted(self, result: AttemptResult, outcome: WebhookOutcome) -> None:
        self.webhook_attempts.inc()
        if not result.is_success:
            self.webhook_failures.inc()
        if outcome.status is OutboxStatus.FAILED:
            self.webhook_given_up.inc()

    # -- exposition ---------------------------------------------------------------------------

    async def render(self) -> bytes:
        """The text exposition format, with the queue gauges at most QUEUE_CACHE seconds old."""
        await self._refresh_queue()
        return generate_latest(self.registry)

    async def _refresh_queue(self) -> None:
        if self._queue_summary is None:
            return
        async with self._refresh_lock:  # concurrent scrapes share one spool read
            now = self._clock()
            if self._refreshed_at is not None and now - self._refreshed_at < QUEUE_CACHE:
                return
            try:
                summary = await self._queue_summary()
                backlog = None if self._webhook_backlog is None else await self._webhook_backlog()
            except StoreError as exc:
                logger.warning("queue metrics not refreshed: %s", exc)
                return
            self._refreshed_at = now
        if backlog is not None:
            self.webhook_backlog.set(backlog)
        for status, units in summary.counts.items():
            self.queue_depth.labels(status.value).set(units)
        oldest = summary.oldest_queued_at
        self.queue_oldest_age.set(max(0.0, time.time() - oldest) if oldest is not None else 0)
