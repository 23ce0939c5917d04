"""Spool methods for the queue tools: summary, shape, retry, cancel, purge (store/queue.py)."""

from __future__ import annotations

import time

from store import queue
from store.records import (
    CancelResult,
    MessageStatus,
    PurgeBatch,
    QueueShape,
    QueueSummary,
    RecipientStatus,
)
from store.spool_base import SpoolBase
from store.sql import Q


class SpoolQueue(SpoolBase):
    """The queue as operators see and handle it (`postroom queue …`)."""

    # -- operations: queue tools --------------------------------------------------------------

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
            ),
            bulk=True,
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
            lambda conn: queue.purge_job(conn, statuses, cutoff, after, limit), bulk=True
        )
