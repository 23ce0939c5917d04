"""The retention sweeper: the timer task that keeps the spool's size under control.

Owns when and how fast the data lifecycle runs: every `retention.interval` it works out the
policy from `retention.*` and the clock (injected, so tests can move time on), then runs the
sweep batch by batch through the spool, pausing `retention.batch_pause` between batches so
intake and delivery never wait behind it. What each batch removes is the spool's business
(store/retention.py). relay/service.py starts and supervises it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from config import Settings
from store import RetentionPolicy, Spool, StoreError, SweepCursor

logger = logging.getLogger(__name__)

DAY = 86400.0


def policy_at(settings: Settings, now: float) -> RetentionPolicy:
    """The cutoffs `retention.*` means at `now` (0 days: keep; store_content = false: now)."""
    cfg = settings.retention
    content = now - cfg.content_days * DAY if cfg.content_days else None
    if not cfg.store_content:
        content = now
    metadata = now - cfg.metadata_days * DAY if cfg.metadata_days else None
    return RetentionPolicy(content_before=content, metadata_before=metadata)


class RetentionSweeper:
    def __init__(
        self, spool: Spool, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self._spool = spool
        self._settings = settings
        self._clock = clock

    async def sweep(self) -> int:
        """Run one whole sweep now; return how many rows it removed."""
        cfg = self._settings.retention
        now = self._clock()
        policy = policy_at(self._settings, now)
        removed = 0
        cursor: SweepCursor | None = SweepCursor()
        while cursor is not None:
            step = await self._spool.sweep(policy, cursor, cfg.batch_size, now)
            removed += step.removed
            cursor = step.next
            if cursor is not None:
                await asyncio.sleep(cfg.batch_pause)
        if removed:
            logger.info("retention: removed %d row(s) or bodies", removed)
        return removed

    async def run(self) -> None:
        """Sweep every `retention.interval`, the first time soon after start."""
        while True:
            try:
                await self.sweep()
            except StoreError as exc:
                # A busy or full spool is not a reason to stop the service: sweep next time.
                logger.error("retention sweep failed, retrying in %gs: %s",
                             self._settings.retention.interval, exc)
            await asyncio.sleep(self._settings.retention.interval)
