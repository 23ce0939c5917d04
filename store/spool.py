"""The Spool: Postroom's only shared state, behind a narrow typed interface.

Owns the database: opening it (migrations applied), the group-commit writer, a small pool of
read-only connections, and one method per operation the rest of Postroom needs — each one read or
one write job, typed records in and out. A second backend (PostgreSQL) would implement these same
methods; nothing outside `store/` would change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from config import Settings
from store import (
    crypto,
    diagnostics,
    idempotency,
    intake,
    manage,
    queue,
    retention,
    stats,
    suppressions,
    templates,
    webhooks,
)
from store.crypto import BODY, DKIM, Sealer, verify_key
from store.db import connect_point_reader, connect_reader, connect_writer, opening
from store.errors import (
    Conflict,
    IdempotencyConflict,
    KeyMismatch,
    NotFound,
    SpoolClosed,
    StoreError,
    UnreadableKeys,
)
from store.events import append_events, last_event_id, list_events
from store.ids import new_id
from store.migrate import apply_migrations
from store.observer import NullObserver, SpoolObserver
from store.records import (
    Accepted,
    ApiKey,
    AttemptResult,
    CancelResult,
    DeliveryJob,
    DomainKeys,
    Event,
    EventFilter,
    EventType,
    IdempotencyKey,
    Message,
    MessageChange,
    MessageQuery,
    MessageStatus,
    MessageType,
    NewEvent,
    NewKey,
    NewSuppression,
    NewWebhook,
    Outcome,
    Principal,
    PurgeBatch,
    QueueShape,
    QueueSummary,
    Recipient,
    RecipientStatus,
    Reply,
    RetentionPolicy,
    Scope,
    Source,
    StatsGroup,
    StatsGrouping,
    StoragePragmas,
    Submission,
    Suppression,
    SuppressionFilter,
    SweepCursor,
    SweepStep,
    Template,
    WebhookAttempt,
    WebhookChange,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutcome,
    tags_from_json,
)
from store.sql import Q
from store.writer import Writer

_OUTCOME_EVENTS = {
    RecipientStatus.DELIVERED: EventType.EMAIL_DELIVERED,
    RecipientStatus.DEFERRED: EventType.EMAIL_DEFERRED,
    RecipientStatus.BOUNCED: EventType.EMAIL_BOUNCED,
    RecipientStatus.FAILED: EventType.EMAIL_FAILED,
}
KEY_PREFIX = "pr_"


def migrate(path: Path, busy_timeout: float = 10.0) -> list[str]:
    """Create or upgrade the spool at `path`; return the names of the migrations applied."""
    with opening(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect_writer(path, busy_timeout)
        try:
            return [f"{m.version:04d}_{m.name}" for m in apply_migrations(conn)]
        finally:
            conn.close()


#: Idempotency keys looked up on the loop's own connection at most; more go to a thread.
_POINT_READ_KEYS = 20


class Spool:
    """Typed access to the spool database; create with `await Spool.open(settings)`."""

    def __init__(
        self,
        settings: Settings,
        writer: Writer,
        readers: list[aiosqlite.Connection],
        point: sqlite3.Connection,
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._point = point
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in readers:
            self._readers.put_nowait(conn)
        self._reader_count = len(readers)
        self._limits = intake.IntakeLimits(
            max_message_size=settings.smtp.max_message_size,
            max_recipients=settings.smtp.max_recipients,
            idempotency_ttl=settings.api.idempotency_ttl,
            sealer=Sealer.from_settings(settings),
            require_configured_domain=not settings.policy.allow_unconfigured_domains,
            store_content=settings.retention.store_content,
        )
        self._in_flight = idempotency.InFlight()
        secret = settings.api.key_hash_secret
        self._key_secret = secret.get_secret_value().encode() if secret else None
        self._store_content = settings.retention.store_content
        self._closed = False
        self._rotation = 0
        self._observer: SpoolObserver = NullObserver()
        #: Set after every commit that makes delivery work due; the engine waits on it.
        self.work_available = asyncio.Event()
        self._events_appended = asyncio.Event()
        self._unsubscribe_secret: bytes | None = None

    @classmethod
    async def open(cls, settings: Settings, readers: int = 4) -> Spool:
        path = settings.spool_path
        timeout = settings.storage.busy_timeout
        with opening(path):  # a file that is not a spool, no access, …: SpoolUnavailable
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await asyncio.to_thread(connect_writer, path, timeout)
            try:
                await asyncio.to_thread(apply_migrations, conn)
                await asyncio.to_thread(verify_key, conn, Sealer.from_settings(settings))
            except BaseException:
                conn.close()
                raise
            writer = Writer(conn, settings.storage.commit_batch)
            pool: list[aiosqlite.Connection] = []
            try:
                for _ in range(readers):
                    pool.append(await connect_reader(path, timeout))
                point = connect_point_reader(path)
            except BaseException:
                # A reader that does not open (no file descriptors left, …) must not leave the
                # writer's thread and connection, nor the readers opened so far, behind.
                for reader in pool:
                    await reader.close()
                await writer.close()
                raise
        return cls(settings, writer, pool, point)

    async def close(self) -> None:
        """Flush and close the writer last, after the readers."""
        if self._closed:
            return
        self._closed = True
        self._point.close()
        for _ in range(self._reader_count):
            conn = await self._readers.get()
            await conn.close()
        await self._writer.close()

    @property
    def is_healthy(self) -> bool:
        """Open, and the last commit succeeded."""
        return not self._closed and self._writer.is_healthy

    async def _point_read(self, sql: str, params: Mapping[str, object]) -> list[sqlite3.Row]:
        """The rows of a small indexed read (one key, a few names), read on the loop's thread.

        Every API request authenticates and every send looks up its sender's domain: through a
        threaded reader each such read costs three thread hops (execute, fetch, close), 30 to 80
        µs of CPU each, for a lookup that takes about 4 µs itself. Here it takes the 4 µs. A read
        that meets a lock (rare under WAL) is retried on a threaded reader, so the loop never
        waits for the database. Only for reads bounded by an index and a handful of rows.
        """
        if self._closed:
            raise SpoolClosed()
        try:
            return self._point.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # locked or busy: wait on a thread, not on the loop
            return await self._thread_read(sql, params)

    async def _thread_read(self, sql: str, params: Mapping[str, object]) -> list[sqlite3.Row]:
        """All rows of one query on a threaded reader, in one hop (execute and fetch together)."""
        async with self._read() as conn:
            return list(await conn.execute_fetchall(sql, params))

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._closed:
            raise SpoolClosed()
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    # -- API keys ---------------------------------------------------------------------------

    def _digest(self, secret: str) -> bytes:
        if self._key_secret is not None:
            return hmac.new(self._key_secret, secret.encode(), hashlib.sha256).digest()
        return hashlib.sha256(secret.encode()).digest()

    async def create_key(
        self,
        name: str,
        scope: Scope,
        sender_domains: Iterable[str] = (),
        *,
        is_test: bool = False,
        rate_limit: int | None = None,
    ) -> NewKey:
        """Create a key; its secret is returned once and stored only as a digest.

        With `sender_domains`, the key may send only from those domains (ValueError for a name
        that is not a domain).
        """
        domains = tuple(dict.fromkeys(intake.normalise_domain(d) for d in sender_domains))
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=new_id("key"),
            name=name,
            hint=secret[: len(KEY_PREFIX) + 4],
            scope=scope,
            created_at=time.time(),
            revoked_at=None,
            sender_domains=domains,
            is_test=is_test,
            rate_limit=rate_limit,
        )
        digest = self._digest(secret)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                Q["insert_key"],
                {
                    "id": key.id,
                    "name": key.name,
                    "digest": digest,
                    "hint": key.hint,
                    "scope": key.scope.value,
                    "now": key.created_at,
                    "sender_domains": json.dumps(list(key.sender_domains)),
                    "test": int(key.is_test),
                    "rate_limit": key.rate_limit,
                },
            )

        await self._writer.run(job)
        return NewKey(key=key, secret=secret)

    async def list_keys(self) -> list[ApiKey]:
        async with self._read() as conn, conn.execute(Q["list_keys"]) as cur:
            return [ApiKey.from_row(row) for row in await cur.fetchall()]

    async def revoke_key(self, key_id: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(Q["key_exists"], {"id": key_id}).fetchone() is None:
                raise NotFound(f"no API key {key_id}")
            conn.execute(Q["revoke_key"], {"id": key_id, "now": time.time()})

        await self._writer.run(job)

    async def authenticate(self, secret: str) -> Principal | None:
        """The principal for a presented key, or None when unknown or revoked."""
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = self._digest(secret)
        rows = await self._point_read(Q["key_by_digest"], {"digest": digest})
        row = rows[0] if rows else None
        if row is None or not hmac.compare_digest(row["digest"], digest):
            return None
        key = ApiKey.from_row(row)
        if key.is_revoked:
            return None
        return Principal(
            key_id=key.id,
            name=key.name,
            scope=key.scope,
            sender_domains=key.sender_domains,
            is_test=key.is_test,
            rate_limit=key.rate_limit,
        )

    # -- intake -----------------------------------------------------------------------------

    async def accept(self, submission: Submission) -> Accepted:
        """Store a message durably; returns after COMMIT, so the caller may acknowledge it."""
        accepted = await intake.accept(self._writer, submission, self._limits)
        self._after_accept([(submission, accepted)])
        return accepted

    async def accept_many(self, submissions: Sequence[Submission]) -> list[Accepted | StoreError]:
        """Store many messages, each accepted or refused alone; results in the given order."""
        results = await intake.accept_many(self._writer, submissions, self._limits)
        self._after_accept(
            [(s, r) for s, r in zip(submissions, results, strict=True) if isinstance(r, Accepted)]
        )
        return results

    def _after_accept(self, accepted: Sequence[tuple[Submission, Accepted]]) -> None:
        """After the commit: wake the engine and the event readers, tell the observer."""
        if not accepted:
            return
        self.work_available.set()
        self.notify_events()
        for submission, result in accepted:
            self._observer.accepted(submission, result)

    # -- reading messages -------------------------------------------------------------------

    async def get_message(self, message_id: str) -> Message:
        async with self._read() as conn:
            await conn.execute("BEGIN")  # one snapshot for the message, recipients and events
            try:
                async with conn.execute(Q["message_by_id"], {"id": message_id}) as cur:
                    row = await cur.fetchone()
                if row is None:
                    raise NotFound(f"no message {message_id}")
                async with conn.execute(Q["recipients_of_message"], {"seq": row["seq"]}) as cur:
                    recipients = tuple(Recipient.from_row(r) for r in await cur.fetchall())
                async with conn.execute(Q["events_of_message"], {"seq": row["seq"]}) as cur:
                    events = tuple(Event.from_row(r) for r in await cur.fetchall())
            finally:
                await conn.execute("COMMIT")
        return Message.from_row(row, recipients, events)

    async def list_messages(
        self, status: RecipientStatus | None = None, limit: int = 50
    ) -> list[Message]:
        """Newest first; with `status`, messages that have a recipient in that status."""
        params = {
            "status": status.value if status else None,
            "before": 2**62,
            "limit": limit,
        }
        async with self._read() as conn:
            await conn.execute("BEGIN")
            try:
                async with conn.execute(Q["list_messages"], params) as cur:
                    rows = list(await cur.fetchall())
                seqs = json.dumps([r["seq"] for r in rows])
                async with conn.execute(Q["recipients_of_messages"], {"seqs": seqs}) as cur:
                    recipients = [Recipient.from_row(r) for r in await cur.fetchall()]
            finally:
                await conn.execute("COMMIT")
        by_message: dict[int, list[Recipient]] = {}
        for rcpt in recipients:
            by_message.setdefault(rcpt.message_seq, []).append(rcpt)
        return [Message.from_row(r, tuple(by_message.get(r["seq"], ()))) for r in rows]

    # -- delivery ---------------------------------------------------------------------------

    async def claim_due(
        self,
        max_units: int,
        per_destination: int,
        lease: float,
        now: float | None = None,
        rooms: Mapping[str, int] | None = None,
        aging: float = 300.0,
    ) -> list[DeliveryJob]:
        """Lease due units, round-robin over destinations, grouped into per-message jobs.

        A destination gets at most `rooms[destination]` units (pacing's answer: what it can
        start now), else `per_destination`. Within a destination higher priority goes first,
        but about half of each claim (every other claim when the room is one) goes to units
        overdue by more than `aging` seconds, oldest first: high-priority mail cannot starve
        normal and low, nor can fresh mail be starved by an old backlog (qmgr's fairness).
        """
        room_of = dict(rooms or {})
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
            return _group_jobs(conn, claimed, self._limits.sealer)

        return await self._writer.run(job)

    async def record_outcomes(
        self, job: DeliveryJob, outcomes: Sequence[Outcome], now: float | None = None
    ) -> None:
        """Record one attempt's outcomes and their events in one write, stamped `now`
        (default: the time of the write)."""
        by_id = {r.id: r for r in job.recipients}

        def write(conn: sqlite3.Connection) -> list[suppressions.Change]:
            at = time.time() if now is None else now
            changes: list[suppressions.Change] = []
            for outcome in outcomes:
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
                        "delivered_at": (
                            at if outcome.status is RecipientStatus.DELIVERED else None
                        ),
                        "now": at,
                    },
                )
                if cur.rowcount == 0:  # no longer ours (released or already final)
                    continue
                data: dict[str, object] = {"message_id": job.message_id, "recipient": rcpt.email}
                data.update(intake.attribute_data(job.tags, job.metadata))
                if reply is not None:
                    data["reply"] = {
                        "code": reply.code, "enhanced": reply.enhanced, "text": reply.text
                    }
                data.update(outcome.data)
                append_events(
                    conn,
                    [
                        NewEvent(
                            type=_OUTCOME_EVENTS[outcome.status],
                            message_seq=job.message_seq,
                            recipient=rcpt.email,
                            data=data,
                        )
                    ],
                    at,
                )
                if outcome.suppress and outcome.status is RecipientStatus.BOUNCED:
                    changes += _suppress(
                        conn, rcpt.email, reply, job.message_seq, job.message_id, at
                    )
            if not self._store_content:
                retention.remove_content_if_finished(conn, job.message_seq, at)
            return changes

        suppressions.log_changes(await self._writer.run(write))
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

    # -- events and webhooks ----------------------------------------------------------------

    def notify_events(self) -> None:
        """Wake everyone waiting for new events (after a commit that appended some)."""
        woken, self._events_appended = self._events_appended, asyncio.Event()
        woken.set()

    async def wait_for_events(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until events are appended or `timeout` passes; True when woken by events."""
        try:
            await asyncio.wait_for(self._events_appended.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def list_events(
        self, where: EventFilter, after: int = 0, limit: int = 100
    ) -> list[Event]:
        """Events with a sequence number above `after`, oldest first (one short read)."""
        async with self._read() as conn:
            return await list_events(conn, where, after, limit)

    async def last_event_id(self) -> int:
        async with self._read() as conn:
            return await last_event_id(conn)

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


    # -- idempotency ------------------------------------------------------------------------

    @asynccontextmanager
    async def hold_idempotency_keys(
        self,
        principal: Principal | None,
        keys: Sequence[IdempotencyKey | None],
        now: float | None = None,
    ) -> AsyncIterator[list[idempotency.Verdict]]:
        """Hold idempotency keys while the caller works; yield a verdict per key.

        None: go ahead (accept with the key in the `Submission`); an `Accepted`: replay that
        answer; an `IdempotencyConflict`: refuse. The keys are released on leaving the block, so
        a request that fails before its message is stored leaves its key unused.
        """
        scope = idempotency.scope_of(principal)
        taken = self._in_flight.hold(scope, keys)
        held = [k if ok else None for k, ok in zip(keys, taken, strict=True)]
        try:
            verdicts: list[idempotency.Verdict] = [
                None if ok else IdempotencyConflict(IdempotencyConflict.IN_PROGRESS)
                for ok in taken
            ]
            wanted = [k.key for k in held if k is not None]
            if wanted:
                at = time.time() if now is None else now
                params = {
                    "api_key_id": scope,
                    "keys": json.dumps(wanted),
                    "cutoff": at - self._limits.idempotency_ttl,
                }
                # A batch may carry thousands of keys: too many for a read on the loop.
                read = self._point_read if len(wanted) <= _POINT_READ_KEYS else self._thread_read
                found = await read(Q["idempotency_lookup_many"], params)
                rows = {row["key"]: row for row in found}
                for index, key in enumerate(held):
                    if key is not None:
                        verdicts[index] = idempotency.judge(key, rows.get(key.key))
            yield verdicts
        finally:
            self._in_flight.release(scope, held)
    # -- operations ---------------------------------------------------------------------------

    def observe(self, observer: SpoolObserver) -> None:
        """Report commits, acceptances and outcomes to `observer` (store/observer.py)."""
        self._observer = observer
        self._writer.observer = observer

    async def queue_summary(self) -> QueueSummary:
        """Pending units by status and the oldest one's queue time: one short read."""
        counts = {s: 0 for s in RecipientStatus if not s.is_final}
        oldest_seq: int | None = None
        async with self._read() as conn:
            await conn.execute("BEGIN")
            try:
                async with conn.execute(Q["pending_by_status"]) as cur:
                    for row in await cur.fetchall():
                        counts[RecipientStatus(row["status"])] = row["units"]
                        if oldest_seq is None or row["oldest_seq"] < oldest_seq:
                            oldest_seq = row["oldest_seq"]
                oldest_at: float | None = None
                if oldest_seq is not None:
                    async with conn.execute(Q["message_queued_at"], {"seq": oldest_seq}) as cur:
                        found = await cur.fetchone()
                    oldest_at = found["created_at"] if found is not None else None
            finally:
                await conn.execute("COMMIT")
        return QueueSummary(counts=counts, oldest_queued_at=oldest_at)
    # -- delivery: DKIM domains and suppressions ------------------------------------------------

    async def add_domain(self, keys: DomainKeys) -> None:
        """Store a sending domain with its DKIM keys; Conflict if it exists."""
        sealer = self._limits.sealer

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(Q["domain_exists"], {"name": keys.name}).fetchone() is not None:
                raise Conflict(f"domain {keys.name} already exists")
            conn.execute(
                Q["insert_domain"],
                {
                    "name": keys.name,
                    "selector": keys.selector,
                    "rsa_key": sealer.seal(keys.rsa_key, DKIM),
                    "ed25519_key": (
                        None if keys.ed25519_key is None else sealer.seal(keys.ed25519_key, DKIM)
                    ),
                    "now": keys.created_at,
                },
            )
            if keys.default_sender_name is not None:
                conn.execute(
                    Q["set_domain_sender_name"],
                    {"name": keys.name, "sender_name": keys.default_sender_name},
                )

        await self._writer.run(job)

    async def domain_keys(self, name: str) -> DomainKeys | None:
        """The DKIM keys of a sending domain, or None when it has none."""
        async with self._read() as conn:
            async with conn.execute(Q["domain_keys"], {"name": name.lower()}) as cur:
                row = await cur.fetchone()
        if row is None:
            return None
        return self._open_keys(DomainKeys.from_row(row))

    def _open_keys(self, keys: DomainKeys) -> DomainKeys:
        """The domain's keys with the private keys decrypted (store/crypto.py).

        The key check at open proved the configured key right, so a key that does not open is
        this one row's damage: UnreadableKeys names the domain and selector, never the key.
        """
        sealer = self._limits.sealer
        try:
            return dataclasses.replace(
                keys,
                rsa_key=sealer.open(keys.rsa_key, DKIM),
                ed25519_key=(
                    None if keys.ed25519_key is None else sealer.open(keys.ed25519_key, DKIM)
                ),
            )
        except KeyMismatch as exc:
            raise UnreadableKeys(keys.name, keys.selector, str(exc)) from None

    async def suppression(self, email: str) -> Suppression | None:
        """The address's live entry; None when it has none or its entry expired (unswept)."""
        params = {"email": email.lower(), "now": time.time()}
        async with self._read() as conn:
            async with conn.execute(Q["suppression_by_email"], params) as cur:
                row = await cur.fetchone()
        return None if row is None else Suppression.from_row(row)

    # -- operations: queue tools --------------------------------------------------------------

    async def queue_shape(self, now: float | None = None) -> QueueShape:
        """Pending units by destination domain and age bucket (`postroom queue summary`)."""
        async with self._read() as conn:
            return await queue.shape(conn, time.time() if now is None else now)

    async def retry(
        self, *, message_id: str | None = None, domain: str | None = None, limit: int = 500
    ) -> int:
        """Make waiting units due now: one message's, or up to `limit` of a domain or of all.

        Returns how many; call again until it returns less than `limit`. Scheduled units and
        units in flight are left alone. NotFound for an unknown message.
        """
        count = await self._writer.run(
            lambda conn: queue.retry_job(conn, message_id, domain, limit, time.time())
        )
        if count:
            self.work_available.set()
        return count

    async def cancel(
        self, *, message_id: str | None = None, domain: str | None = None, limit: int = 500
    ) -> CancelResult:
        """Cancel units not delivered and not in flight, with their `email.cancelled` events.

        By message id (all its cancellable units; NotFound if unknown) or by destination domain
        (up to `limit` units: call again until fewer are cancelled). Units in flight are counted,
        not touched: their attempt decides them.
        """
        store_content = self._store_content
        done = await self._writer.run(
            lambda conn: queue.cancel_job(
                conn, message_id, domain, limit, time.time(), store_content=store_content
            )
        )
        queue.log_cancelled(done.units)
        if done.result.cancelled:
            self.notify_events()
        return done.result

    async def purge(
        self,
        statuses: frozenset[MessageStatus] | None,
        cutoff: float,
        after: int = 0,
        limit: int = 500,
    ) -> PurgeBatch:
        """Remove finished messages created before `cutoff` with all their rows, one batch.

        `statuses`: only messages in these (final) statuses; None: any finished message.
        Go on from `PurgeBatch.next_after` until it is None.
        """
        return await self._writer.run(
            lambda conn: queue.purge_job(conn, statuses, cutoff, after, limit)
        )

    # -- operations: data lifecycle -----------------------------------------------------------

    async def sweep(
        self, policy: RetentionPolicy, cursor: SweepCursor, limit: int, now: float | None = None
    ) -> SweepStep:
        """One batch of a retention sweep (store/retention.py); go on from `SweepStep.next`."""
        at = time.time() if now is None else now
        swept = await self._writer.run(
            lambda conn: retention.sweep_job(conn, policy, cursor, limit, at)
        )
        if swept.expired:  # each expired suppression wrote a `suppression.deleted`
            suppressions.log_changes(swept.expired)
            self.notify_events()
        return swept.step

    # -- operations: encryption at rest -------------------------------------------------------

    async def reseal(self, after: int, limit: int) -> crypto.Resealed:
        """Re-encrypt up to `limit` bodies past the cursor with the current key (a key rotation).

        `changed` counts the bodies rewritten, `skipped` names the messages whose body does not
        open (damaged: left as they are); go on from `next_after` until it is None.
        """
        sealer = self._limits.sealer
        return await self._writer.run(lambda conn: crypto.reseal_bodies(conn, sealer, after, limit))

    async def finish_reseal(self) -> crypto.KeysResealed:
        """Re-encrypt the DKIM keys and write the key check for the current key; the domains
        re-encrypted, and those whose keys do not open (damaged: left as they are)."""
        sealer = self._limits.sealer
        return await self._writer.run(lambda conn: crypto.reseal_keys(conn, sealer))


    # -- diagnostics --------------------------------------------------------------------------

    async def storage_pragmas(self) -> StoragePragmas:
        """The durability pragmas the writer and every pooled reader run with."""
        if self._closed:
            raise SpoolClosed()
        writer = await self._writer.run(diagnostics.writer_pragmas)
        readers = []
        for _ in range(self._reader_count):  # every pooled reader, each taken once
            readers.append(await self._readers.get())
        try:
            query_only = [await diagnostics.reader_is_query_only(conn) for conn in readers]
        finally:
            for conn in readers:
                self._readers.put_nowait(conn)
        return diagnostics.pragmas(writer, query_only)

    async def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check` through a reader: ["ok"] when the database is sound."""
        async with self._read() as conn:
            return await diagnostics.integrity_check(conn)

    async def limit_pages(self, extra_pages: int | None) -> int:
        """Test and diagnostic hook: cap the spool file at its size plus `extra_pages` pages.

        Sets `PRAGMA max_page_count` on the write connection, so the next commit that needs more
        room fails with SQLITE_FULL as on a full disk; None lifts the cap. Returns the cap.
        Not for production use: nothing in Postroom calls it.
        """
        return await self._writer.run(lambda conn: diagnostics.limit_pages(conn, extra_pages))
    # -- managing messages: listing, cancel, reschedule ------------------------------------------

    async def find_messages(self, query: MessageQuery) -> list[Message]:
        """A page of messages matching `query`, newest first, with their recipients."""
        async with self._read() as conn:
            return await manage.list_page(conn, query)

    async def cancel_message(self, message_id: str) -> MessageChange:
        """Cancel what is not delivered and not in flight; NotFound for an unknown id."""
        store_content = self._store_content
        change = await self._writer.run(
            lambda conn: manage.cancel_job(
                conn, message_id, time.time(), store_content=store_content
            )
        )
        queue.log_cancelled(manage.cancelled_units(change))
        if change.changed:
            self.notify_events()
        return change

    async def reschedule_message(self, message_id: str, at: float) -> MessageChange:
        """Move what is not yet sent to `at`; NotFound for an unknown id."""
        change = await self._writer.run(
            lambda conn: manage.reschedule_job(conn, message_id, at, time.time())
        )
        if change.changed:
            self.notify_events()
            self.work_available.set()
        return change

    # -- stats -----------------------------------------------------------------------------------

    async def stats(
        self, since: float, until: float, group_by: StatsGrouping | None = None
    ) -> list[StatsGroup]:
        """Delivery figures for the messages accepted in [since, until) (store/stats.py)."""
        async with self._read() as conn:
            return await stats.stats(conn, since, until, group_by)
    # -- sending: domains, suppressions, templates, unsubscribe ---------------------------------

    async def list_domains(self) -> list[DomainKeys]:
        """Every sending domain with its keys; UnreadableKeys when one's keys do not decrypt
        (`inspect_domains` shows the others and marks that one)."""
        found = []
        for keys, damage in await self.inspect_domains():
            if damage is not None:
                raise damage
            found.append(keys)
        return found

    async def inspect_domains(self) -> list[tuple[DomainKeys, UnreadableKeys | None]]:
        """Every sending domain, each with its keys opened, or with its damage.

        The DNS records of a domain are derived from its private keys (no public key is stored),
        so listing decrypts them. A row that does not decrypt comes with its UnreadableKeys and
        its keys emptied (`rsa_key` b"", `ed25519_key` b"" when it had one, so the algorithm
        still shows): one damaged row is shown as damaged instead of failing the whole list.
        """
        async with self._read() as conn, conn.execute(Q["list_domains"]) as cur:
            rows = await cur.fetchall()
        return [self._inspect_keys(DomainKeys.from_row(row)) for row in rows]

    async def inspect_domain(self, name: str) -> tuple[DomainKeys, UnreadableKeys | None]:
        """One sending domain as `inspect_domains` gives it; NotFound when it was never added."""
        async with self._read() as conn:
            async with conn.execute(Q["domain_keys"], {"name": name.lower()}) as cur:
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no sending domain {name.lower()}")
        return self._inspect_keys(DomainKeys.from_row(row))

    def _inspect_keys(self, sealed: DomainKeys) -> tuple[DomainKeys, UnreadableKeys | None]:
        try:
            return self._open_keys(sealed), None
        except UnreadableKeys as exc:
            emptied = dataclasses.replace(
                sealed, rsa_key=b"", ed25519_key=None if sealed.ed25519_key is None else b""
            )
            return emptied, exc

    async def get_domain(self, name: str) -> DomainKeys:
        """A sending domain; NotFound when it was never added, UnreadableKeys when its keys do
        not decrypt."""
        keys = await self.domain_keys(name)
        if keys is None:
            raise NotFound(f"no sending domain {name.lower()}")
        return keys

    async def remove_domain(self, name: str) -> None:
        """Remove a sending domain and its keys; its mail is no longer signed (nor, by default,
        accepted)."""

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(Q["delete_domain"], {"name": name.lower()}).rowcount == 0:
                raise NotFound(f"no sending domain {name.lower()}")

        await self._writer.run(job)

    async def set_default_sender_name(self, name: str, sender_name: str | None) -> None:
        def job(conn: sqlite3.Connection) -> None:
            params = {"name": name.lower(), "sender_name": sender_name}
            if conn.execute(Q["set_domain_sender_name"], params).rowcount == 0:
                raise NotFound(f"no sending domain {name.lower()}")

        await self._writer.run(job)

    async def default_sender_names(self, domains: Iterable[str]) -> dict[str, str]:
        """The default sender names of those of `domains` that have one."""
        names = json.dumps(sorted({d.lower() for d in domains}))
        rows = await self._point_read(Q["sender_names_among"], {"names": names})
        return {row[0]: row[1] for row in rows}

    async def add_suppressions(self, entries: Sequence[NewSuppression]) -> list[bool]:
        """Suppress addresses; for each, whether it was new (False: already suppressed)."""
        applied = await self._writer.run(
            lambda conn: suppressions.add_job(conn, entries, time.time())
        )
        suppressions.log_changes(applied.changes)
        if applied.changes:
            self.notify_events()
        return list(applied.added)

    async def remove_suppression(self, email: str) -> None:
        """Take an address off the list (`suppression.deleted`); NotFound when it is not on it."""
        removed = await self._writer.run(
            lambda conn: suppressions.remove_job(conn, email, time.time())
        )
        suppressions.log_changes([removed])
        self.notify_events()

    async def get_suppression(self, email: str) -> Suppression:
        async with self._read() as conn:
            return await suppressions.get(conn, email, time.time())

    async def list_suppressions(
        self, where: SuppressionFilter, after: str = "", limit: int = 50
    ) -> list[Suppression]:
        """Live suppressions in address order, after the address `after`."""
        async with self._read() as conn:
            return await suppressions.list_page(conn, where, after, limit, time.time())

    async def unsubscribe(self, message_id: str, email: str) -> bool:
        """Record a one-click unsubscribe; whether the address was newly suppressed."""
        applied = await self._writer.run(
            lambda conn: suppressions.unsubscribe_job(conn, message_id, email, time.time())
        )
        suppressions.log_unsubscribed(applied, message_id)
        if applied.changes:
            self.notify_events()
        return applied.added[0]

    async def unsubscribe_secret(self) -> bytes:
        """The key of unsubscribe tokens, generated with the spool (migration 0005)."""
        if self._unsubscribe_secret is None:
            async with self._read() as conn:
                async with conn.execute(Q["spool_secret"], {"name": "unsubscribe"}) as cur:
                    row = await cur.fetchone()
            if row is None:
                raise StoreError("the spool has no unsubscribe secret")
            self._unsubscribe_secret = bytes(row[0])
        return self._unsubscribe_secret

    async def create_template(
        self, name: str, subject: str, html: str | None, text: str | None
    ) -> Template:
        """Store a template; Conflict when the name is taken."""
        return await self._writer.run(
            lambda conn: templates.create_job(conn, name, subject, html, text, time.time())
        )

    async def update_template(
        self, ref: str, name: str, subject: str, html: str | None, text: str | None
    ) -> Template:
        """Replace a template (by id or name); NotFound, or Conflict for a taken name."""
        return await self._writer.run(
            lambda conn: templates.update_job(conn, ref, name, subject, html, text, time.time())
        )

    async def delete_template(self, ref: str) -> None:
        await self._writer.run(lambda conn: templates.delete_job(conn, ref))

    async def get_template(self, ref: str) -> Template:
        """A template by id or name; NotFound when there is none."""
        async with self._read() as conn:
            return await templates.get(conn, ref)

    async def list_templates(self) -> list[Template]:
        async with self._read() as conn:
            return await templates.list_all(conn)


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
