"""Queue tools: the writer jobs and reads behind `postroom queue summary|retry|cancel|purge`.

Owns the sysadmin's operations on the queue (Postfix's `qshape`, `postqueue -f`, `postsuper -d`):
counting pending units by destination and age, making waiting units due now, cancelling units
not yet delivered nor in flight (with their `email.cancelled` events), and removing finished
messages with every row that belongs to them. Each operation on many rows works in bounded
batches, one short writer job each, so intake and delivery keep their turns while it runs.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import aiosqlite

from store import intake
from store.errors import NotFound
from store.events import append_events
from store.records import (
    CancelResult,
    EventType,
    MessageStatus,
    NewEvent,
    PurgeBatch,
    QueueShape,
    RecipientStatus,
    ShapeRow,
    derive_message_status,
    tags_from_json,
)
from store.sql import Q

logger = logging.getLogger(__name__)

#: Upper bounds of the age buckets, in minutes (qshape's defaults); the last bucket is open.
AGE_EDGES_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
AGE_LABELS = (*(str(m) for m in AGE_EDGES_MINUTES), f"{AGE_EDGES_MINUTES[-1]}+")


async def shape(conn: aiosqlite.Connection, now: float) -> QueueShape:
    """Pending units by destination and age bucket (one read)."""
    edges = json.dumps([m * 60 for m in AGE_EDGES_MINUTES])
    by_domain: dict[str, list[int]] = {}
    async with conn.execute(Q["queue_shape"], {"edges": edges, "now": now}) as cur:
        for row in await cur.fetchall():
            counts = by_domain.setdefault(row["domain"], [0] * len(AGE_LABELS))
            counts[min(row["bucket"], len(AGE_LABELS) - 1)] += row["units"]
    rows = [ShapeRow(domain=d, total=sum(c), counts=tuple(c)) for d, c in by_domain.items()]
    rows.sort(key=lambda r: (-r.total, r.domain))
    return QueueShape(labels=AGE_LABELS, rows=tuple(rows))


def message_seq(conn: sqlite3.Connection, message_id: str) -> int:
    row = conn.execute(Q["message_seq_by_id"], {"id": message_id}).fetchone()
    if row is None:
        raise NotFound(f"no message {message_id}")
    return int(row[0])


def retry_job(
    conn: sqlite3.Connection, message_id: str | None, domain: str | None, limit: int, now: float
) -> int:
    """Make up to `limit` waiting units due now; return how many (scheduled ones stay)."""
    if message_id is not None:
        return conn.execute(
            Q["retry_message"], {"seq": message_seq(conn, message_id), "now": now}
        ).rowcount
    if domain is not None:
        return conn.execute(
            Q["retry_domain"], {"domain": domain, "now": now, "limit": limit}
        ).rowcount
    return conn.execute(Q["retry_all"], {"now": now, "limit": limit}).rowcount


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What a cancel job did, with the (message id, recipient) of each unit it cancelled."""

    result: CancelResult
    units: tuple[tuple[str, str], ...]


def log_cancelled(units: Iterable[tuple[str, str]]) -> None:
    """One line per cancelled unit (message id, recipient), once the cancel committed."""
    for message_id, email in units:
        logger.info("%s: to=<%s> status=cancelled", message_id, email)


def remove_contents_if_finished(conn: sqlite3.Connection, seqs: Iterable[int], now: float) -> None:
    """`store_content = false`: drop the bodies of these messages that became final."""
    for seq in seqs:
        conn.execute(Q["remove_content_if_finished"], {"seq": seq, "now": now})


def cancel_job(
    conn: sqlite3.Connection,
    message_id: str | None,
    domain: str | None,
    limit: int,
    now: float,
    *,
    store_content: bool = True,
) -> Cancelled:
    """Cancel units not delivered and not in flight (one message, or up to `limit` of a domain).

    Each cancelled unit gets its `email.cancelled` event in the same transaction, and with
    `store_content` false a message left with no pending unit loses its body in it too.
    """
    if message_id is not None:
        seq = message_seq(conn, message_id)
        rows = conn.execute(Q["cancel_message"], {"seq": seq, "now": now}).fetchall()
        in_flight = conn.execute(Q["in_flight_of_message"], {"seq": seq}).fetchone()[0]
    elif domain is not None:
        rows = conn.execute(
            Q["cancel_domain"], {"domain": domain, "now": now, "limit": limit}
        ).fetchall()
        in_flight = conn.execute(Q["in_flight_of_domain"], {"domain": domain}).fetchone()[0]
    else:
        raise ValueError("cancel needs a message id or a domain")
    units: tuple[tuple[str, str], ...] = ()
    if rows:
        touched = sorted({r["message_seq"] for r in rows})
        seqs = json.dumps(touched)
        messages = {r["seq"]: r for r in conn.execute(Q["message_attributes"], {"seqs": seqs})}
        append_events(conn, _cancel_events(rows, messages), now)
        if not store_content:
            remove_contents_if_finished(conn, touched, now)
        units = tuple((messages[r["message_seq"]]["id"], r["email"]) for r in rows)
    return Cancelled(CancelResult(cancelled=len(rows), in_flight=int(in_flight)), units)


def _cancel_events(
    rows: Iterable[sqlite3.Row], messages: dict[int, sqlite3.Row]
) -> Iterable[NewEvent]:
    for row in rows:
        message = messages[row["message_seq"]]
        data: dict[str, object] = {"message_id": message["id"], "recipient": row["email"]}
        data.update(
            intake.attribute_data(
                tags_from_json(message["tags"]), json.loads(message["metadata"])
            )
        )
        yield NewEvent(
            type=EventType.EMAIL_CANCELLED,
            message_seq=row["message_seq"],
            recipient=row["email"],
            data=data,
        )


def purge_job(
    conn: sqlite3.Connection,
    statuses: frozenset[MessageStatus] | None,
    cutoff: float,
    after: int,
    limit: int,
) -> PurgeBatch:
    """Remove finished messages created before `cutoff` (in `statuses`, or any), after a cursor.

    Looks at up to `limit` messages past `after`; a message with a pending recipient is kept.
    """
    rows = conn.execute(
        Q["finished_messages_before"], {"after": after, "cutoff": cutoff, "limit": limit}
    ).fetchall()
    doomed: list[tuple[int, str]] = []
    for row in rows:
        found = [RecipientStatus(s) for s in json.loads(row["statuses"])]
        if any(not s.is_final for s in found):
            continue
        if statuses is not None and derive_message_status(found) not in statuses:
            continue
        doomed.append((row["seq"], row["id"]))
    delete_messages(conn, doomed)
    next_after = rows[-1]["seq"] if len(rows) == limit else None
    return PurgeBatch(removed=len(doomed), next_after=next_after)


def delete_messages(conn: sqlite3.Connection, messages: list[tuple[int, str]]) -> None:
    """Remove messages (seq, id) with their recipients, events, outbox and idempotency rows."""
    if not messages:
        return
    seqs = json.dumps([seq for seq, _ in messages])
    conn.execute(Q["delete_outbox_of_messages"], {"seqs": seqs})
    conn.execute(Q["delete_events_of_messages"], {"seqs": seqs})
    conn.execute(
        Q["delete_idempotency_of_messages"], {"ids": json.dumps([i for _, i in messages])}
    )
    conn.execute(Q["delete_messages"], {"seqs": seqs})
