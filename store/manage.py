"""Managing messages after acceptance: the filtered listing, cancel and reschedule.

Owns the reads behind `GET /v1/messages` (one query per driving index, chosen from the filters;
see queries.sql) and the writer jobs that cancel or reschedule a message's pending units with
their events. A unit an attempt holds is never touched: the answer says it is in flight.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

import aiosqlite

from store import queue
from store.errors import NotFound
from store.events import append_events
from store.intake import attribute_data
from store.records import (
    EventType,
    Message,
    MessageChange,
    MessageQuery,
    NewEvent,
    Recipient,
    RecipientStatus,
    UnitAction,
    UnitChange,
    format_time,
)
from store.sql import Q

_FAR_FUTURE = 1e18


def _page_query(query: MessageQuery) -> str:
    """The query whose index drives the page: the most selective filter given."""
    if query.recipient is not None:
        return "messages_page_by_recipient"
    if query.tag is not None:
        return "messages_page_by_tag"
    if query.mail_from is not None:
        return "messages_page_by_from"
    if query.status is not None:
        return "messages_page_by_status"
    return "messages_page"


async def list_page(conn: aiosqlite.Connection, query: MessageQuery) -> list[Message]:
    """One page of messages, newest first, with their recipients (one read snapshot)."""
    params = {
        "status": query.status.value if query.status else None,
        "recipient": query.recipient,
        "mail_from": query.mail_from,
        "tag": query.tag,
        "created_after": query.created_after if query.created_after is not None else 0.0,
        "created_before": (
            query.created_before if query.created_before is not None else _FAR_FUTURE
        ),
        "before": query.before_seq,
        "limit": query.limit,
    }
    return await messages_with_recipients(conn, Q[_page_query(query)], params)


async def messages_with_recipients(
    conn: aiosqlite.Connection, sql: str, params: Mapping[str, object]
) -> list[Message]:
    """The messages `sql` selects, each with its recipients, read in one snapshot."""
    await conn.execute("BEGIN")
    try:
        rows = list(await conn.execute_fetchall(sql, params))
        seqs = json.dumps([r["seq"] for r in rows])
        found = await conn.execute_fetchall(Q["recipients_of_messages"], {"seqs": seqs})
    finally:
        await conn.execute("COMMIT")
    by_message: dict[int, list[Recipient]] = {}
    for rcpt in (Recipient.from_row(r) for r in found):
        by_message.setdefault(rcpt.message_seq, []).append(rcpt)
    return [Message.from_row(r, tuple(by_message.get(r["seq"], ()))) for r in rows]


def _load(conn: sqlite3.Connection, message_id: str) -> Message:
    row = conn.execute(Q["message_for_change"], {"id": message_id}).fetchone()
    if row is None:
        raise NotFound(f"no message {message_id}")
    recipients = tuple(
        Recipient.from_row(r) for r in conn.execute(Q["recipients_of_message"], {"seq": row["seq"]})
    )
    return Message.from_row(row, recipients)


def _change(
    conn: sqlite3.Connection,
    message_id: str,
    query: str,
    params: dict[str, object],
    event: EventType,
    extra: dict[str, object],
    now: float,
) -> MessageChange:
    before = _load(conn, message_id)
    changed = {
        r[0] for r in conn.execute(Q[query], {**params, "seq": before.seq, "now": now})
    }
    data = attribute_data(before.tags, before.metadata)
    if before.is_test:
        data["test"] = True
    data.update(extra)
    append_events(
        conn,
        (
            NewEvent(
                type=event,
                message_seq=before.seq,
                recipient=r.email,
                data={"message_id": before.id, "recipient": r.email, **data},
            )
            for r in before.recipients
            if r.id in changed
        ),
        now,
    )
    after = _load(conn, message_id)
    done = UnitAction.CANCELLED if event is EventType.EMAIL_CANCELLED else UnitAction.RESCHEDULED
    units = []
    for old, new in zip(before.recipients, after.recipients, strict=True):
        if old.id in changed:
            action = done
        elif new.status is RecipientStatus.SENDING:
            action = UnitAction.IN_FLIGHT
        else:
            action = UnitAction.FINAL
        units.append(UnitChange(email=new.email, status=new.status, action=action))
    return MessageChange(message=after, units=tuple(units))


def cancel_job(
    conn: sqlite3.Connection, message_id: str, now: float, *, store_content: bool = True
) -> MessageChange:
    """Cancel every unit not delivered and not in flight, each with an `email.cancelled` event.

    With `store_content` false, a message left with no pending unit loses its body at once.
    """
    change = _change(conn, message_id, "cancel_units", {}, EventType.EMAIL_CANCELLED, {}, now)
    if change.changed and not store_content:
        queue.remove_contents_if_finished(conn, [change.message.seq], now)
    return change


def cancelled_units(change: MessageChange) -> list[tuple[str, str]]:
    """The (message id, recipient) of each unit a cancel made `cancelled`."""
    return [(change.message.id, u.email) for u in change.units if u.action is UnitAction.CANCELLED]


def reschedule_job(
    conn: sqlite3.Connection, message_id: str, at: float, now: float
) -> MessageChange:
    """Move every unit not yet sent (scheduled, queued, deferred) to `at`, as `scheduled`."""
    change = _change(
        conn, message_id, "reschedule_units", {"at": at}, EventType.EMAIL_SCHEDULED,
        {"scheduled_at": format_time(at), "rescheduled": True}, now,
    )
    if change.changed:
        conn.execute(Q["set_message_schedule"], {"seq": change.message.seq, "at": at})
        return MessageChange(_load(conn, message_id), change.units)
    return change
