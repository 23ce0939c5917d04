"""The suppression list: who Postroom no longer sends to, and why.

Owns adding (by hand, by import, by a one-click unsubscribe) and removing entries, each change
with its event (`suppression.created`, `suppression.deleted`, `email.unsubscribed`) in the same
writer job, and the paged read of `GET /v1/suppressions`. Intake applies the list (store/intake.py);
hard bounces are added by the delivery write (store/spool.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import aiosqlite

from store.errors import NotFound
from store.events import append_events
from store.records import (
    EventType,
    NewEvent,
    NewSuppression,
    Suppression,
    SuppressionFilter,
    SuppressionReason,
)
from store.sql import Q


def add_job(
    conn: sqlite3.Connection, entries: Sequence[NewSuppression], now: float
) -> list[bool]:
    """Add entries; for each, whether it was added (False: the address was already suppressed)."""
    added = []
    events = []
    for entry in entries:
        address = entry.email.lower()
        cur = conn.execute(
            Q["upsert_suppression"],
            {
                "email": address,
                "reason": entry.reason.value,
                "message_id": entry.message_id,
                "expires_at": entry.expires_at,
                "now": now,
            },
        )
        added.append(cur.rowcount > 0)
        if cur.rowcount > 0:
            data: dict[str, object] = {"email": address, "reason": entry.reason.value}
            if entry.message_id:
                data["message_id"] = entry.message_id
            events.append(
                NewEvent(EventType.SUPPRESSION_CREATED, _message_seq(conn, entry), address, data)
            )
    append_events(conn, events, now)
    return added


def remove_job(conn: sqlite3.Connection, email: str, now: float) -> None:
    address = email.lower()
    row = conn.execute(Q["delete_suppression"], {"email": address}).fetchone()
    if row is None:
        raise NotFound(f"{address} is not suppressed")
    append_events(
        conn,
        [
            NewEvent(
                EventType.SUPPRESSION_DELETED, None, address, {"email": address, "reason": row[0]}
            )
        ],
        now,
    )


def unsubscribe_job(
    conn: sqlite3.Connection, message_id: str, email: str, now: float
) -> bool:
    """Suppress `email` for marketing mail after a one-click unsubscribe; whether it was new."""
    entry = NewSuppression(email, SuppressionReason.UNSUBSCRIBE, message_id=message_id)
    [added] = add_job(conn, [entry], now)
    if added:
        append_events(
            conn,
            [
                NewEvent(
                    EventType.EMAIL_UNSUBSCRIBED,
                    _message_seq(conn, entry),
                    email.lower(),
                    {"message_id": message_id, "recipient": email.lower()},
                )
            ],
            now,
        )
    return added


def _message_seq(conn: sqlite3.Connection, entry: NewSuppression) -> int | None:
    if entry.message_id is None:
        return None
    row = conn.execute(Q["message_seq_by_id"], {"id": entry.message_id}).fetchone()
    return None if row is None else int(row[0])


async def list_page(
    conn: aiosqlite.Connection, where: SuppressionFilter, after: str, limit: int, now: float
) -> list[Suppression]:
    params = {
        "after": after.lower(),
        "reason": where.reason.value if where.reason else None,
        "search": where.search.lower() if where.search else None,
        "now": now,
        "limit": limit,
    }
    async with conn.execute(Q["list_suppressions"], params) as cur:
        return [Suppression.from_row(row) for row in await cur.fetchall()]


async def get(conn: aiosqlite.Connection, email: str, now: float) -> Suppression:
    async with conn.execute(Q["suppression_full"], {"email": email.lower(), "now": now}) as cur:
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"{email.lower()} is not suppressed")
    return Suppression.from_row(row)
