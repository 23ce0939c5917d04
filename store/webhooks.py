"""Webhook endpoints, the outbox and the attempt log, as spool operations.

Owns the endpoint rows (signing secrets made here, `whsec_` + base64 of 32 random bytes as the
Standard Webhooks specification describes), the outbox claim (due rows leased per endpoint, so one
endpoint's backlog never fills the batch), recording an attempt with its log entry in one write,
and replay. The outbox rows themselves are written by `store.events.append_events`. The
`*_job` functions run inside writer jobs; the others read on a reader connection.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
from collections.abc import Mapping

import aiosqlite

from store.errors import NotFound
from store.ids import new_id
from store.records import (
    AttemptResult,
    Event,
    NewWebhook,
    OutboxStatus,
    WebhookAttempt,
    WebhookChange,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutcome,
)
from store.sql import Q

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _endpoint(conn: sqlite3.Connection, endpoint_id: str, now: float) -> WebhookEndpoint:
    row = conn.execute(Q["webhook_by_id"], {"id": endpoint_id}).fetchone()
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return WebhookEndpoint.from_row(row, now)


def create_job(
    conn: sqlite3.Connection,
    url: str,
    event_types: tuple[str, ...],
    description: str,
    is_enabled: bool,
    now: float,
) -> NewWebhook:
    endpoint_id = new_id("wh")
    secret = new_secret()
    conn.execute(
        Q["insert_webhook"],
        {
            "id": endpoint_id,
            "url": url,
            "event_types": json.dumps(list(event_types)),
            "description": description,
            "enabled": int(is_enabled),
            "secret": secret,
            "now": now,
        },
    )
    return NewWebhook(endpoint=_endpoint(conn, endpoint_id, now), secret=secret)


def update_job(
    conn: sqlite3.Connection, endpoint_id: str, change: WebhookChange, now: float
) -> WebhookEndpoint:
    old = _endpoint(conn, endpoint_id, now)
    enabled = old.is_enabled if change.is_enabled is None else change.is_enabled
    conn.execute(
        Q["update_webhook"],
        {
            "seq": old.seq,
            "url": old.url if change.url is None else change.url,
            "event_types": json.dumps(
                list(old.event_types if change.event_types is None else change.event_types)
            ),
            "description": old.description if change.description is None else change.description,
            "enabled": int(enabled),
            "disabled_reason": old.disabled_reason if not enabled else None,
            "now": now,
        },
    )
    if enabled and not old.is_enabled:
        conn.execute(Q["resume_outbox_of_endpoint"], {"seq": old.seq, "now": now})
    elif old.is_enabled and not enabled:
        conn.execute(Q["pause_outbox_of_endpoint"], {"seq": old.seq, "now": now})
    return _endpoint(conn, endpoint_id, now)


def rotate_job(
    conn: sqlite3.Connection, endpoint_id: str, overlap: float, now: float
) -> NewWebhook:
    """A new current secret; the old one keeps signing for `overlap` seconds."""
    old = _endpoint(conn, endpoint_id, now)
    secret = new_secret()
    conn.execute(
        Q["rotate_webhook_secret"],
        {"seq": old.seq, "secret": secret, "previous_until": now + overlap, "now": now},
    )
    return NewWebhook(endpoint=_endpoint(conn, endpoint_id, now), secret=secret)


def delete_job(conn: sqlite3.Connection, endpoint_id: str, now: float) -> None:
    """Delete an endpoint with its outbox rows and attempt log."""
    conn.execute(Q["delete_webhook"], {"seq": _endpoint(conn, endpoint_id, now).seq})


def claim_job(
    conn: sqlite3.Connection,
    max_rows: int,
    per_endpoint: int,
    busy: Mapping[int, int],
    lease: float,
    now: float,
    start: int,
) -> list[WebhookDelivery]:
    """Lease due rows round-robin over endpoints, at most `per_endpoint` in flight for each.

    `busy` counts the rows each endpoint (by seq) already has in flight in this process.
    """
    seqs = [r[0] for r in conn.execute(Q["due_webhook_endpoints"], {"now": now, "limit": 10_000})]
    if not seqs:
        return []
    offset = start % len(seqs)
    seqs = seqs[offset:] + seqs[:offset]
    claimed: list[sqlite3.Row] = []
    for seq in seqs:
        room = min(max_rows - len(claimed), per_endpoint - busy.get(seq, 0))
        if max_rows - len(claimed) <= 0:
            break
        if room <= 0:
            continue
        claimed.extend(
            conn.execute(
                Q["claim_webhook_endpoint"],
                {"endpoint_seq": seq, "now": now, "lease_until": now + lease, "limit": room},
            ).fetchall()
        )
    if not claimed:
        return []
    endpoint_seqs = json.dumps(sorted({r["endpoint_seq"] for r in claimed}))
    endpoints = {
        row["seq"]: WebhookEndpoint.from_row(row, now)
        for row in conn.execute(Q["webhooks_by_seqs"], {"seqs": endpoint_seqs})
    }
    events = {
        row["id"]: Event.from_row(row)
        for row in conn.execute(
            Q["events_by_ids"], {"ids": json.dumps(sorted({r["event_id"] for r in claimed}))}
        )
    }
    deliveries = []
    for row in claimed:
        event = events.get(row["event_id"])
        if event is None:  # purged since it was queued: nothing left to send
            conn.execute(
                Q["record_webhook_outcome"],
                {"id": row["id"], "status": OutboxStatus.FAILED.value, "due_at": None, "now": now},
            )
            continue
        deliveries.append(
            WebhookDelivery(
                outbox_id=row["id"],
                attempts=row["attempts"],
                endpoint=endpoints[row["endpoint_seq"]],
                event=event,
            )
        )
    return deliveries


def record_job(
    conn: sqlite3.Connection,
    delivery: WebhookDelivery,
    result: AttemptResult,
    outcome: WebhookOutcome,
    now: float,
) -> None:
    """The attempt's log entry and the row's next state, in one write."""
    endpoint = delivery.endpoint
    current = conn.execute(Q["webhook_by_id"], {"id": endpoint.id}).fetchone()
    if current is None:
        return  # deleted during the attempt, with its outbox rows and log
    log_attempt(conn, endpoint.seq, delivery.event, delivery.attempts + 1, result, now)
    due_at = outcome.due_at
    if outcome.disable_reason is not None:
        conn.execute(
            Q["disable_webhook"],
            {"seq": endpoint.seq, "reason": outcome.disable_reason, "now": now},
        )
        conn.execute(Q["pause_outbox_of_endpoint"], {"seq": endpoint.seq, "now": now})
    elif outcome.status is OutboxStatus.PENDING and not current["enabled"]:
        due_at = None  # disabled meanwhile: the row waits until it is enabled again
    conn.execute(
        Q["record_webhook_outcome"],
        {
            "id": delivery.outbox_id,
            "status": outcome.status.value,
            "due_at": due_at,
            "now": now,
        },
    )


def log_attempt(
    conn: sqlite3.Connection,
    endpoint_seq: int,
    event: Event | None,
    attempt: int,
    result: AttemptResult,
    now: float,
    event_type: str = "webhook.test",
) -> None:
    conn.execute(
        Q["insert_webhook_attempt"],
        {
            "endpoint_seq": endpoint_seq,
            "event_id": event.id if event else None,
            "event_type": event.type.value if event else event_type,
            "attempt": attempt,
            "status_code": result.status_code,
            "latency": result.latency,
            "error": result.error,
            "now": now,
        },
    )


def replay_job(
    conn: sqlite3.Connection,
    endpoint_id: str,
    from_id: int,
    since: float,
    limit: int,
    now: float,
) -> int:
    """Queue the endpoint's events from an id or time on again; return how many."""
    endpoint = _endpoint(conn, endpoint_id, now)
    return conn.execute(
        Q["replay_webhook"],
        {
            "seq": endpoint.seq,
            "from_id": from_id,
            "since": since,
            "event_types": json.dumps(list(endpoint.event_types)),
            "due_at": now if endpoint.is_enabled else None,
            "limit": limit,
            "now": now,
        },
    ).rowcount


async def list_endpoints(conn: aiosqlite.Connection, now: float) -> list[WebhookEndpoint]:
    async with conn.execute(Q["list_webhooks"]) as cur:
        return [WebhookEndpoint.from_row(r, now) for r in await cur.fetchall()]


async def get_endpoint(conn: aiosqlite.Connection, endpoint_id: str, now: float) -> WebhookEndpoint:
    async with conn.execute(Q["webhook_by_id"], {"id": endpoint_id}) as cur:
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return WebhookEndpoint.from_row(row, now)


async def list_attempts(
    conn: aiosqlite.Connection, endpoint_seq: int, before: int, limit: int
) -> list[WebhookAttempt]:
    params = {"seq": endpoint_seq, "before": before, "limit": limit}
    async with conn.execute(Q["webhook_attempts_of_endpoint"], params) as cur:
        return [WebhookAttempt.from_row(r) for r in await cur.fetchall()]


async def count_backlog(conn: aiosqlite.Connection) -> int:
    """Outbox rows still owed to enabled endpoints: due, waiting for a retry, or in flight.

    A disabled endpoint's rows (due_at NULL) wait outside the backlog until it is enabled.
    """
    async with conn.execute(Q["webhook_backlog"]) as cur:
        row = await cur.fetchone()
    return int(row["rows"]) if row is not None else 0
