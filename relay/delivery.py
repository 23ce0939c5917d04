"""The delivery engine (Postfix's qmgr): claim due units, attempt them, record the outcomes.

Owns the loop that leases a bounded batch of due units from the spool (round-robin over
destinations, at most `max_connections_per_destination` per destination per claim), runs one
attempt per (message, destination) job under a global connection limit, and records each
recipient's outcome with its event in one spool write. It wakes when intake commits new work and
polls otherwise. On stop it lets running attempts finish within the shutdown timeout and gives
every other lease back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from config import Settings
from relay.mx import MxResolver
from relay.outcome import decide
from relay.transport import SessionResult, Timeouts, send
from store import DeliveryJob, Outcome, Reply, Spool, StoreError

logger = logging.getLogger(__name__)


class DeliveryEngine:
    """Runs until `stop()`; one instance per service."""

    def __init__(self, spool: Spool, settings: Settings, resolver: MxResolver) -> None:
        self._spool = spool
        self._settings = settings
        self._resolver = resolver
        cfg = settings.delivery
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._timeouts = Timeouts(cfg.connect_timeout, cfg.command_timeout, cfg.data_timeout)
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        cfg = self._settings.delivery
        while not self._stopping.is_set():
            free = cfg.max_connections - len(self._running)
            jobs: list[DeliveryJob] = []
            if free > 0:
                self._spool.work_available.clear()
                jobs = await self._spool.claim_due(
                    max_units=min(free, cfg.claim_batch),
                    per_destination=cfg.max_connections_per_destination,
                    lease=cfg.lease,
                )
            if jobs and self._stopping.is_set():  # stop() came during the claim: give it back
                await self._spool.release(r.id for job in jobs for r in job.recipients)
                break
            for job in jobs:
                task = asyncio.create_task(self._attempt(job), name=f"deliver {job.message_id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if jobs and len(self._running) < cfg.max_connections:
                continue  # there may be more due work right now
            await self._wait_for_work(cfg.poll_interval)

    async def _wait_for_work(self, timeout: float) -> None:  # noqa: ASYNC109
        waiters = [
            asyncio.ensure_future(self._spool.work_available.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop claiming; let running attempts finish within `timeout`, then release the rest."""
        self._stopping.set()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=timeout)
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)

    async def _attempt(self, job: DeliveryJob) -> None:
        result: SessionResult
        try:
            async with self._slots:
                result = await asyncio.wait_for(
                    self._deliver(job), self._settings.delivery.attempt_timeout
                )
        except asyncio.CancelledError:
            # Shutdown cut the attempt short: the units go back, due now.
            await asyncio.shield(self._spool.release(r.id for r in job.recipients))
            raise
        except TimeoutError:
            result = _failed(Reply(451, "4.4.7", "delivery attempt timed out"))
        except Exception:
            logger.exception("%s: delivery attempt failed inside Postroom", job.message_id)
            result = _failed(Reply(451, "4.3.0", "internal error during delivery"))
        outcomes = self._outcomes(job, result)
        try:
            await self._spool.record_outcomes(job, outcomes)
        except StoreError as exc:
            # The lease expires and the units are tried again: at-least-once.
            logger.error("%s: cannot record outcomes: %s", job.message_id, exc)
            return
        self._log(job, outcomes, result)

    async def _deliver(self, job: DeliveryJob) -> SessionResult:
        route = await self._resolver.route(job.destination)
        if route.failure is not None:
            return _failed(route.failure)
        last: SessionResult | None = None
        for host in route.hosts:
            for address in host.addresses:
                last = await send(
                    job,
                    host.name,
                    address,
                    self._settings.delivery.mx_port,
                    self._settings.server.hostname,
                    self._timeouts,
                )
                if last.failure is None:
                    return last
                if last.failure.code >= 500:
                    return last  # a permanent refusal of the session is not the host's fault
        assert last is not None
        return last

    def _outcomes(self, job: DeliveryJob, result: SessionResult) -> list[Outcome]:
        now = time.time()
        schedule = self._settings.delivery.retry_schedule
        outcomes = []
        details = (
            {"mx": result.host, "ip": result.address, "tls": result.tls} if result.host else {}
        )
        for rcpt in job.recipients:
            reply = result.failure or result.replies.get(rcpt.id)
            if reply is None:
                reply = Reply(451, "4.3.0", "no reply recorded")
            outcomes.append(decide(rcpt.id, rcpt.attempts, reply, schedule, now, details))
        return outcomes

    @staticmethod
    def _log(job: DeliveryJob, outcomes: list[Outcome], result: SessionResult) -> None:
        relay = f"{result.host}[{result.address}]" if result.host else "none"
        emails = {r.id: r.email for r in job.recipients}
        for outcome in outcomes:
            reply = outcome.reply
            logger.info(
                "%s: to=<%s> relay=%s dsn=%s status=%s (%s %s)",
                job.message_id,
                emails[outcome.recipient_id],
                relay,
                reply.enhanced if reply else "",
                outcome.status.value,
                reply.code if reply else "",
                reply.text if reply else "",
            )


def _failed(reply: Reply) -> SessionResult:
    """A result where no host was reached: `reply` stands for every recipient."""
    return SessionResult(host="", address="", replies={}, failure=reply)
