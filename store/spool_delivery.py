"""Spool methods for delivery: claim due units, record their outcomes, give leases back."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from store import intake, retention, suppressions
from store.crypto import BODY, Sealer
from store.errors import KeyMismatch
from store.events import append_events, append_events_at
from store.records import (
    DeliveryJob,
    EventType,
    MessageType,
    NewEvent,
    Outcome,
    Recipient,
    RecipientStatus,
    Reply,
    Source,
    tags_from_json,
)
from store.spool_base import SpoolBase
from store.sql import Q

_OUTCOME_EVENTS = {
    RecipientStatus.DELIVERED: EventType.EMAIL_DELIVERED,
    RecipientStatus.DEFERRED: EventType.EMAIL_DEFERRED,
    RecipientStatus.BOUNCED: EventType.EMAIL_BOUNCED,
    RecipientStatus.FAILED: EventType.EMAIL_FAILED,
}


class SpoolDelivery(SpoolBase):
    """Claims and outcomes of delivery units (relay/delivery.py is the caller)."""

    # -- delivery ---------------------------------------------------------------------------

    async def claim_due(
        self,
        max_units: int,
        per_destination: int,
        lease: float,
        now: float | None = None,
        rooms: Mapping[str, int] | None = None,
        aging: float = 300.0,
        shared: Callable[[str], str | None] | None = None,
        shared_rooms: Mapping[str, int] | None = None,
    ) -> list[DeliveryJob]:
        """Lease due units, round-robin over destinations, grouped into per-message jobs.

        A destination gets at most `rooms[destination]` units (pacing's answer: what it can
        start now), else `per_destination`. Destinations that share a limit (the domains routed
        through one smarthost: `shared(domain)` names it) get at most `shared_rooms[name]` units
        together, so nothing is leased that could not start. Within a destination higher
        priority goes first, but about half of each claim (every other claim when the room is
        one) goes to units overdue by more than `aging` seconds, oldest first: high-priority
        mail cannot starve normal and low, nor can fresh mail be starved by an old backlog
        (qmgr's fairness).
        """
        room_of = dict(rooms or {})
        shared_left = dict(shared_rooms or {})
        start = self._rotation
        self._rotation += 1

        def job(conn: sqlite3.Connection) -> list[DeliveryJob]:
            at = time.time() if now is None else now
            domains = [
                r[0] for r in conn.execute(Q["due_destinations"], {"now": at, "limit": 10_000})
            ]
            if not domains:
                return []
            # Rotate the starting destination between calls so none is always served first.
            offset = start % len(domains)
            domains = domains[offset:] + domains[:offset]
            claimed: list[Recipient] = []
            for domain in domains:
                room = max_units - len(claimed)
                if room <= 0:
                    break
                limit = min(room, room_of.get(domain, per_destination))
                group = shared(domain) if shared is not None else None
                if group is not None and group in shared_left:
                    limit = min(limit, shared_left[group])
                if limit <= 0:
                    continue
                params = {"domain": domain, "now": at, "lease_until": at + lease}
                aged_limit = (limit + start % 2) // 2
                rows = []
                if aged_limit:
                    rows = conn.execute(
                        Q["claim_destination_aged"],
                        {**params, "overdue": at - aging, "limit": aged_limit},
                    ).fetchall()
                if len(rows) < limit:
                    rows += conn.execute(
                        Q["claim_destination"], {**params, "limit": limit - len(rows)}
                    ).fetchall()
                claimed.extend(Recipient.from_row(r) for r in rows)
                if group is not None and group in shared_left:
                    shared_left[group] -= len(rows)
            return _group_jobs(conn, claimed, self._limits.sealer)

        return await self._writer.run(job)

    async def record_outcomes(
        self, job: DeliveryJob, outcomes: Sequence[Outcome], now: float | None = None
    ) -> None:
        """Record one attempt's outcomes and their events in one write, stamped `now`
        (default: the time of the write)."""
        record = _RecordJob(job, tuple(outcomes), now, self._store_content)
        suppressions.log_changes(await self._writer.run(record))
        self.notify_events()
        self._observer.recorded(job, outcomes, time.time() if now is None else now)
        if any(o.status is RecipientStatus.DEFERRED for o in outcomes):
            self.work_available.set()

    async def recover_leases(self) -> int:
        """Make units a crashed run left in flight due now; return how many.

        Only the process that owns the spool may call this, before its engine claims anything:
        with one owner, every lease it finds at start-up belongs to a run that is gone, so there
        is no reason to wait for the leases to expire.
        """

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(Q["release_all_leases"], {"now": time.time()}).rowcount

        count = await self._writer.run(job)
        if count:
            self.work_available.set()
        return count

    async def release(self, recipient_ids: Iterable[int]) -> None:
        """Give claimed units back, due now (shutdown, or work that could not start)."""
        ids = list(recipient_ids)
        if not ids:
            return

        def job(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(Q["release_lease"], [{"id": i, "now": now} for i in ids])

        await self._writer.run(job)


def _record(
    conn: sqlite3.Connection, records: Sequence[_RecordJob]
) -> list[list[suppressions.Change]]:
    """Record attempts' outcomes: each unit's row, then every event in three statements. A
    unit no longer ours (released, or final already) gets no event; a recipient-caused bounce
    puts its address on the suppression list after its own event, so the events keep the order
    they happened in. Returns each attempt's suppression changes (logged after the commit)."""
    written = time.time()
    events: list[tuple[NewEvent, float]] = []
    out: list[list[suppressions.Change]] = []
    for record in records:
        job = record.job
        at = written if record.now is None else record.now
        by_id = {r.id: r for r in job.recipients}
        attributes = intake.attribute_data(job.tags, job.metadata)
        changes: list[suppressions.Change] = []
        for outcome in record.outcomes:
            rcpt = by_id[outcome.recipient_id]
            reply = outcome.reply
            cur = conn.execute(
                Q["record_outcome"],
                {
                    "id": rcpt.id,
                    "status": outcome.status.value,
                    "due_at": outcome.due_at,
                    "code": reply.code if reply else None,
                    "enhanced": reply.enhanced if reply else None,
                    "text": reply.text if reply else None,
                    "delivered_at": at if outcome.status is RecipientStatus.DELIVERED else None,
                    "now": at,
                },
            )
            if cur.rowcount == 0:  # no longer ours (released or already final)
                continue
            data: dict[str, object] = {"message_id": job.message_id, "recipient": rcpt.email}
            data.update(attributes)
            if reply is not None:
                data["reply"] = {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
            data.update(outcome.data)
            event = NewEvent(
                type=_OUTCOME_EVENTS[outcome.status],
                message_seq=job.message_seq,
                recipient=rcpt.email,
                data=data,
            )
            events.append((event, at))
            if outcome.suppress and outcome.status is RecipientStatus.BOUNCED:
                append_events_at(conn, events)
                events = []
                changes += _suppress(conn, rcpt.email, reply, job.message_seq, job.message_id, at)
        if not record.store_content:
            retention.remove_content_if_finished(conn, job.message_seq, at)
        out.append(changes)
    append_events_at(conn, events)
    return out


@dataclass(frozen=True, slots=True)
class _RecordJob:
    """The writer job that records one attempt's outcomes (`_record` of one)."""

    job: DeliveryJob
    outcomes: tuple[Outcome, ...]
    now: float | None
    store_content: bool

    def __call__(self, conn: sqlite3.Connection) -> list[suppressions.Change]:
        return _record(conn, (self,))[0]

    # The writer's `joint`: a group commit's outcomes recorded by one call. During a drain
    # nearly every job the writer runs is one of these, and a savepoint and four statements each
    # were a third of the writer's time.
    joint = staticmethod(_record)


def _suppress(
    conn: sqlite3.Connection,
    email: str,
    reply: Reply | None,
    message_seq: int,
    message_id: str,
    now: float,
) -> list[suppressions.Change]:
    """Add a recipient-caused bounce's address to the suppression list, once, with its event;
    return the changes made (logged after the commit).

    An expired entry the sweep has not reached yet is ended first, with its own
    `suppression.deleted`, as `add_suppressions` does: it must not block the new entry.
    """
    address = email.lower()
    ended = suppressions.end_expired(conn, address, now)
    changes = [] if ended is None else [ended]
    cur = conn.execute(
        Q["insert_suppression"],
        {
            "email": address,
            "reason": "hard_bounce",
            "code": reply.code if reply else None,
            "enhanced": reply.enhanced if reply else None,
            "text": reply.text if reply else None,
            "message_seq": message_seq,
            "now": now,
        },
    )
    if cur.rowcount == 0:
        return changes  # already suppressed: no second event
    data: dict[str, object] = {
        "email": address, "reason": "hard_bounce", "message_id": message_id
    }
    if reply is not None:
        data["reply"] = {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
    append_events(
        conn,
        [
            NewEvent(
                type=EventType.SUPPRESSION_CREATED,
                message_seq=message_seq,
                recipient=address,
                data=data,
            )
        ],
        now,
    )
    changes.append(suppressions.Change(address, "hard_bounce", suppressions.Action.ADDED))
    return changes


def _group_jobs(
    conn: sqlite3.Connection, claimed: list[Recipient], sealer: Sealer
) -> list[DeliveryJob]:
    if not claimed:
        return []
    seqs = sorted({r.message_seq for r in claimed})
    messages = {
        row["seq"]: row
        for row in conn.execute(Q["messages_for_delivery"], {"seqs": json.dumps(seqs)})
    }
    # Recipients of one message and one domain share a transaction, except for marketing mail:
    # each copy carries an unsubscribe link for its one recipient (relay/unsubscribe.py).
    bodies = {seq: _open_body(row, sealer) for seq, row in messages.items()}
    groups: dict[tuple[int, str, int], list[Recipient]] = {}
    for rcpt in claimed:
        alone = messages[rcpt.message_seq]["message_type"] == MessageType.MARKETING.value
        key = (rcpt.message_seq, rcpt.domain, rcpt.id if alone else 0)
        groups.setdefault(key, []).append(rcpt)
    return [
        DeliveryJob(
            destination=domain,
            message_seq=seq,
            message_id=messages[seq]["id"],
            mail_from=messages[seq]["mail_from"],
            content=bodies[seq][0],
            content_error=bodies[seq][1],
            recipients=tuple(rcpts),
            tags=tags_from_json(messages[seq]["tags"]),
            metadata=json.loads(messages[seq]["metadata"]),
            created_at=messages[seq]["created_at"],
            source=Source(messages[seq]["source"]),
            is_test=bool(messages[seq]["test"]),
            message_type=MessageType(messages[seq]["message_type"]),
        )
        for (seq, domain, _), rcpts in groups.items()
    ]


def _open_body(row: sqlite3.Row, sealer: Sealer) -> tuple[bytes, str | None]:
    """A claimed message's body, or empty bytes and why it cannot be opened.

    The claim runs as one write job for every destination: a body that raised here would roll
    the whole claim back, leave the unit due and fail every later claim, so that no mail at all
    would go out. One damaged body (or one sealed with a key no longer configured) fails only
    its own units (relay/delivery.py); the reason never holds the key nor the body.
    """
    try:
        return sealer.open(bytes(row["body"]), BODY), None
    except KeyMismatch as exc:
        return b"", f"the stored message body cannot be decrypted: {exc}"
