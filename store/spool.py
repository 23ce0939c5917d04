"""The Spool: Postroom's only shared state, behind a narrow typed interface.

Owns the database: opening it (migrations applied), the group-commit writer, a small pool of
read-only connections, and one method per operation the rest of Postroom needs — each one read or
one write job, typed records in and out. A second backend (PostgreSQL) would implement these same
methods; nothing outside `store/` would change.

This module holds the core: opening and closing, API keys, intake, events and idempotency. The
other methods live in one mixin per resource, which `Spool` inherits: delivery claims and outcomes
(store/spool_delivery.py), webhooks (store/spool_webhooks.py), messages and stats
(store/spool_messages.py), queue tools (store/spool_queue.py), domains, suppressions and templates
(store/spool_sending.py), retention, re-encryption and diagnostics (store/spool_maintenance.py).
Their shared attributes and the read paths are declared in store/spool_base.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from config import Settings
from store import idempotency, intake
from store.crypto import Sealer, verify_key
from store.db import connect_point_reader, connect_reader, connect_writer, opening
from store.errors import IdempotencyConflict, NotFound, StoreError
from store.events import last_event_id, list_events
from store.ids import new_id
from store.migrate import apply_migrations
from store.observer import NullObserver, SpoolObserver
from store.recent import Recent
from store.records import (
    Accepted,
    ApiKey,
    Event,
    EventFilter,
    IdempotencyKey,
    NewKey,
    Principal,
    Scope,
    Submission,
)
from store.spool_delivery import SpoolDelivery
from store.spool_maintenance import SpoolMaintenance
from store.spool_messages import SpoolMessages
from store.spool_queue import SpoolQueue
from store.spool_sending import SpoolSending
from store.spool_webhooks import SpoolWebhooks
from store.sql import Q
from store.writer import Writer

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


class Spool(
    SpoolDelivery,
    SpoolWebhooks,
    SpoolMessages,
    SpoolQueue,
    SpoolSending,
    SpoolMaintenance,
):
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
        ttl, size = settings.api.lookup_cache_ttl, settings.api.lookup_cache_size
        self._recent_keys: Recent[bytes, Principal] = Recent(ttl, size)
        self._recent_names: Recent[str, str | None] = Recent(ttl, size)

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
        self._recent_keys.drop()

    async def authenticate(self, secret: str) -> Principal | None:
        """The principal for a presented key, or None when unknown or revoked."""
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = self._digest(secret)
        recent = self._recent_keys
        kept, principal = recent.get(digest)
        if kept:
            return principal
        generation = recent.generation
        rows = await self._point_read(Q["key_by_digest"], {"digest": digest})
        row = rows[0] if rows else None
        if row is None or not hmac.compare_digest(row["digest"], digest):
            return None
        key = ApiKey.from_row(row)
        if key.is_revoked:
            return None
        principal = Principal(
            key_id=key.id,
            name=key.name,
            scope=key.scope,
            sender_domains=key.sender_domains,
            is_test=key.is_test,
            rate_limit=key.rate_limit,
        )
        recent.keep(digest, principal, generation)
        return principal

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

    # -- events (notify_events: store/spool_base.py) ---------------------------------------

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
