"""The data lifecycle: the writer jobs of retention sweeps.

Owns what `retention.*` removes: the bodies of finished messages past `content_days` (the row
stays, with `content_removed_at` set), finished messages with every row that belongs to them past
`metadata_days`, and events, webhook attempts and idempotency keys past it too; last, whatever
the policy, suppressions whose `expires_at` passed (each with its `suppression.deleted`, written
by store/suppressions.py, read through the partial index on `expires_at`). A sweep is a
sequence of small batches, one writer job each (`sweep_job`), walking indexes with a cursor, so it
never holds the writer long and never re-reads what it already passed.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from store import queue, suppressions
from store.records import RecipientStatus, RetentionPolicy, SweepCursor, SweepStep
from store.sql import Q

_CONTENT, _MESSAGES, _EVENTS, _SUPPRESSIONS = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Swept:
    """One sweep batch: its step, and the suppressions it expired (logged after the commit)."""

    step: SweepStep
    expired: tuple[suppressions.Change, ...] = ()


def sweep_job(
    conn: sqlite3.Connection,
    policy: RetentionPolicy,
    cursor: SweepCursor,
    limit: int,
    now: float,
) -> Swept:
    """One batch of the sweep's current phase; the next phase once this one is exhausted."""
    phase = cursor.phase
    if phase == _SUPPRESSIONS:
        # Not a retention period: an entry ends at its own `expires_at`, so this phase always runs.
        # Each batch deletes what it read, so the next one starts again at the oldest expiry:
        # no cursor to carry, and a full batch means another may be due.
        expired, is_full = suppressions.expire_job(conn, limit, now)
        rest = SweepCursor(_SUPPRESSIONS) if is_full else None
        return Swept(SweepStep(len(expired), rest), expired)
    if phase == _CONTENT:
        if policy.content_before is None:
            return Swept(SweepStep(0, SweepCursor(_MESSAGES)))
        return Swept(_remove_contents(conn, policy.content_before, cursor, limit, now))
    if policy.metadata_before is None:
        return Swept(SweepStep(0, SweepCursor(_SUPPRESSIONS)))
    cutoff = policy.metadata_before
    if phase == _MESSAGES:
        purged = queue.purge_job(conn, None, cutoff, cursor.after_seq, limit)
        if purged.next_after is None:
            return Swept(SweepStep(purged.removed, SweepCursor(_EVENTS)))
        return Swept(
            SweepStep(purged.removed, SweepCursor(_MESSAGES, after_seq=purged.next_after))
        )
    params = {"cutoff": cutoff, "limit": limit}
    conn.execute(Q["delete_outbox_of_events_before"], params)
    removed = conn.execute(Q["delete_events_before"], params).rowcount
    removed += conn.execute(Q["delete_webhook_attempts_before"], params).rowcount
    removed += conn.execute(Q["delete_idempotency_before"], params).rowcount
    return Swept(SweepStep(removed, cursor if removed else SweepCursor(_SUPPRESSIONS)))


def _remove_contents(
    conn: sqlite3.Connection, cutoff: float, cursor: SweepCursor, limit: int, now: float
) -> SweepStep:
    rows = conn.execute(
        Q["messages_with_content_before"],
        {
            "cutoff": cutoff,
            "after_time": cursor.after_time,
            "after_seq": cursor.after_seq,
            "limit": limit,
        },
    ).fetchall()
    finished = [
        row["seq"]
        for row in rows
        if all(RecipientStatus(s).is_final for s in json.loads(row["statuses"]))
    ]
    removed = 0
    if finished:
        removed = conn.execute(
            Q["remove_content"], {"seqs": json.dumps(finished), "now": now}
        ).rowcount
    if len(rows) < limit:
        return SweepStep(removed, SweepCursor(_MESSAGES))
    last = rows[-1]
    return SweepStep(removed, SweepCursor(_CONTENT, last["created_at"], last["seq"]))


def remove_content_if_finished(conn: sqlite3.Connection, message_seq: int, now: float) -> None:
    """`store_content = false`: drop a message's body once every recipient is final."""
    conn.execute(Q["remove_content_if_finished"], {"seq": message_seq, "now": now})
