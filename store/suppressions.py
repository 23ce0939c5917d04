"""The suppression list: who Postroom no longer sends to, and why.

Owns adding (by hand, by import, by a one-click unsubscribe), removing and expiring entries,
each change with its event (`suppression.created`, `suppression.deleted`, `email.unsubscribed`)
in the same writer job, the one log line of each change once it committed, and the paged read of
`GET /v1/suppressions`. Intake applies the list (store/intake.py); hard bounces are added by
the delivery write (store/spool_delivery.py); the retention sweep takes expired entries off
(store/retention.py).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

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

logger = logging.getLogger(__name__)


class Action(StrEnum):
    """What happened to an entry; the `action=` of its log line."""

    ADDED = "added"
    REMOVED = "removed"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Change:
    """One change a writer job made to the list, logged once the job committed."""

    email: str
    reason: str
    action: Action


@dataclass(frozen=True, slots=True)
class Applied:
    """What an add job did: for each entry whether it was added, and every change it made."""

    added: tuple[bool, ...]
    changes: tuple[Change, ...]


def log_changes(changes: Iterable[Change]) -> None:
    """One line per change (after the commit): the address, its reason, what happened."""
    for change in changes:
        logger.info(
            "suppression: %s reason=%s action=%s", change.email, change.reason, change.action.value
        )


def log_unsubscribed(applied: Applied, message_id: str | None) -> None:
    """The line of a one-click unsubscribe that added the address (Postfix style: queue id first).

    The entry it adds is not logged a second time as `action=added`: one line per transition.
    """
    for change in applied.changes:
        if change.action is Action.ADDED:
            logger.info("%s: to=<%s> status=unsubscribed", message_id or "-", change.email)
        else:
            log_changes([change])


def expired_event(email: str, reason: str) -> NewEvent:
    """`suppression.deleted` for an entry whose `expires_at` passed: the API's shape, plus
    `expired: true`."""
    data: dict[str, object] = {"email": email, "reason": reason, "expired": True}
    return NewEvent(EventType.SUPPRESSION_DELETED, None, email, data)


def add_job(conn: sqlite3.Connection, entries: Sequence[NewSuppression], now: float) -> Applied:
    """Add entries; for each, whether it was added (False: the address was already suppressed).

    An expired entry still in the table (the sweep has not reached it) is taken off first, with
    its own `suppression.deleted`, so the event log shows it ending before the new one begins.
    """
    added = []
    changes = []
    events = []
    for entry in entries:
        address = entry.email.lower()
        ended = end_expired(conn, address, now)
        if ended is not None:
            changes.append(ended)
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
            changes.append(Change(address, entry.reason.value, Action.ADDED))
            data: dict[str, object] = {"email": address, "reason": entry.reason.value}
            if entry.message_id:
                data["message_id"] = entry.message_id
            events.append(
                NewEvent(EventType.SUPPRESSION_CREATED, _message_seq(conn, entry), address, data)
            )
    append_events(conn, events, now)
    return Applied(tuple(added), tuple(changes))


def end_expired(conn: sqlite3.Connection, email: str, now: float) -> Change | None:
    """Take `email`'s entry off if it has expired but is still in the table (the sweep has not
    reached it), with its `suppression.deleted` (expired): before a new entry for the address
    begins, so the event log shows the old one ending first. `email` is lower-case."""
    old = conn.execute(Q["delete_expired_suppression"], {"email": email, "now": now}).fetchone()
    if old is None:
        return None
    append_events(conn, [expired_event(email, old[0])], now)
    return Change(email, old[0], Action.EXPIRED)


def remove_job(conn: sqlite3.Connection, email: str, now: float) -> Change:
    """Take a live entry off; an expired one is already absent (NotFound), as it is for intake,
    the list and GET, and the sweep ends it with its own event."""
    address = email.lower()
    row = conn.execute(Q["delete_suppression"], {"email": address, "now": now}).fetchone()
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
    return Change(address, row[0], Action.REMOVED)


def unsubscribe_job(
    conn: sqlite3.Connection, message_id: str, email: str, now: float
) -> Applied:
    """Suppress `email` for marketing mail after a one-click unsubscribe; `added` says whether
    it was new."""
    entry = NewSuppression(email, SuppressionReason.UNSUBSCRIBE, message_id=message_id)
    applied = add_job(conn, [entry], now)
    if applied.added[0]:
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
    return applied


def expire_job(
    conn: sqlite3.Connection, limit: int, now: float
) -> tuple[tuple[Change, ...], bool]:
    """Take off up to `limit` entries whose `expires_at` passed, one `suppression.deleted`
    each, in this job's transaction (a sweep batch, store/retention.py); and whether the batch
    was full (more may be due).

    The rows come from the partial index on `expires_at` (migration 0009): a batch reads only
    expired rows, never the rest of the list.
    """
    rows = conn.execute(Q["delete_expired_batch"], {"now": now, "limit": limit}).fetchall()
    changes = tuple(Change(row["email"], row["reason"], Action.EXPIRED) for row in rows)
    append_events(conn, [expired_event(c.email, c.reason) for c in changes], now)
    return changes, len(rows) >= limit


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
