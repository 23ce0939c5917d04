"""Spool methods for reading and managing messages, and their delivery figures."""

from __future__ import annotations

import time

from store import manage, queue, stats
from store.errors import NotFound
from store.records import (
    Event,
    Message,
    MessageChange,
    MessageQuery,
    Recipient,
    RecipientStatus,
    StatsGroup,
    StatsGrouping,
)
from store.spool_base import SpoolBase
from store.sql import Q


class SpoolMessages(SpoolBase):
    """Reading messages, cancelling and rescheduling them (store/manage.py), stats."""

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
            return await manage.messages_with_recipients(conn, Q["list_messages"], params)

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
