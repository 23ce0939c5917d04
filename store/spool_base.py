"""What every part of the `Spool` shares: its attributes and its read paths.

`Spool` (store/spool.py) is one class made of mixins, one module per resource
(store/spool_delivery.py, store/spool_webhooks.py, …). Each mixin derives from `SpoolBase`, which
declares the attributes `Spool.__init__` sets, so that every method type-checks where it is
written, and holds what all of them use: the reads and the event wake-up.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiosqlite

from config import Settings
from store import idempotency, intake
from store.errors import SpoolClosed
from store.observer import SpoolObserver
from store.recent import Recent
from store.records import Principal
from store.writer import Writer


class SpoolBase:
    """The state of an open spool, set by `Spool.__init__`, and the reads every part shares."""

    _settings: Settings
    _writer: Writer
    _point: sqlite3.Connection
    _readers: asyncio.Queue[aiosqlite.Connection]
    _reader_count: int
    _limits: intake.IntakeLimits
    _in_flight: idempotency.InFlight
    _key_secret: bytes | None
    _store_content: bool
    _closed: bool
    _rotation: int
    _observer: SpoolObserver
    #: Set after every commit that makes delivery work due; the engine waits on it.
    work_available: asyncio.Event
    _events_appended: asyncio.Event
    _unsubscribe_secret: bytes | None
    #: Principals by key digest, and default sender names (None: none) by domain, as read last.
    _recent_keys: Recent[bytes, Principal]
    _recent_names: Recent[str, str | None]

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

    def notify_events(self) -> None:
        """Wake everyone waiting for new events (after a commit that appended some)."""
        woken, self._events_appended = self._events_appended, asyncio.Event()
        woken.set()
