"""Spool methods for upkeep: the retention sweep, re-encryption at rest, diagnostics."""

from __future__ import annotations

import time

from store import crypto, diagnostics, retention, suppressions
from store.errors import SpoolClosed
from store.records import RetentionPolicy, StoragePragmas, SweepCursor, SweepStep
from store.spool_base import SpoolBase


class SpoolMaintenance(SpoolBase):
    """Retention, key rotation of the sealed data, and the storage diagnostics."""

    # -- operations: data lifecycle -----------------------------------------------------------

    async def sweep(
        self, policy: RetentionPolicy, cursor: SweepCursor, limit: int, now: float | None = None
    ) -> SweepStep:
        """One batch of a retention sweep (store/retention.py); go on from `SweepStep.next`."""
        at = time.time() if now is None else now
        swept = await self._writer.run(
            lambda conn: retention.sweep_job(conn, policy, cursor, limit, at), bulk=True
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
        return await self._writer.run(
            lambda conn: crypto.reseal_bodies(conn, sealer, after, limit), bulk=True
        )

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
