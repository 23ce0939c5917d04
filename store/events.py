"""Events: the one way an event is written, and the reads that page through them.

Owns `append_events`, which every event writer calls inside its writer job: it inserts each event
and, in the same transaction, one webhook outbox row per enabled endpoint that subscribes to the
event's type — so no event can be committed without the deliveries it owes. Owns the reads of
`GET /v1/events` and the stream too: one short query per page, each driven by an index.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

import aiosqlite

from store.records import Event, EventFilter, NewEvent
from store.sql import Q


def append_events(conn: sqlite3.Connection, events: Iterable[NewEvent], now: float) -> int:
    """Insert events and their outbox rows (inside a writer job); return the outbox rows made.

    Three statements however many events: the events in one `executemany`, then every outbox
    row they owe in one INSERT … SELECT over the events past the last id before them (the ids
    only grow: AUTOINCREMENT). A statement costs the writer ~10 us; intake's batch of 10,000
    messages made 20,000 of them here, one event and one outbox query each.
    """
    return append_events_at(conn, [(event, now) for event in events])


def append_events_at(conn: sqlite3.Connection, events: Sequence[tuple[NewEvent, float]]) -> int:
    """`append_events` for events that each carry their own time: the outcomes of several
    delivery attempts recorded by one call. Their outbox rows are due at the earliest."""
    if not events:
        return 0
    rows = [
        {
            "now": at,
            "type": event.type.value,
            "message_seq": event.message_seq,
            "recipient": event.recipient,
            "data": json.dumps(event.data),
        }
        for event, at in events
    ]
    last = conn.execute(Q["last_event_id"]).fetchone()[0]
    conn.executemany(Q["insert_event"], rows)
    earliest = min(at for _, at in events)
    return conn.execute(Q["insert_outbox_for_events"], {"after": last, "now": earliest}).rowcount


async def list_events(
    conn: aiosqlite.Connection, where: EventFilter, after: int, limit: int
) -> list[Event]:
    """Events after the sequence number `after`, oldest first, through the filter's index."""
    params: dict[str, object] = {
        "after": after,
        "limit": limit,
        "type": where.type.value if where.type else None,
        "recipient": where.recipient,
    }
    if where.message_id is not None:
        async with conn.execute(Q["message_seq_by_id"], {"id": where.message_id}) as cur:
            row = await cur.fetchone()
        if row is None:
            return []
        params["message_seq"] = row[0]
        query = "events_by_message"
    elif where.recipient is not None:
        query = "events_by_recipient"
    elif where.type is not None:
        query = "events_by_type"
    else:
        query = "events_after"
    async with conn.execute(Q[query], params) as cur:
        return [Event.from_row(r) for r in await cur.fetchall()]


async def last_event_id(conn: aiosqlite.Connection) -> int:
    async with conn.execute(Q["last_event_id"]) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
