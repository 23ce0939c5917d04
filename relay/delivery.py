"""The delivery engine (Postfix's qmgr): claim due units, attempt them, record the outcomes.

Owns the loop that asks pacing what each destination may start now, leases exactly that from the
spool (round-robin over destinations), and runs one attempt per (message, destination) job: route
(smarthost from `delivery.routes`, else MX with loop and private-address screening), DKIM-sign
with the From domain's keys, try hosts and addresses in order, then record each recipient's
outcome with its event in one spool write. It wakes when intake commits new work or an attempt
frees a slot, and polls otherwise. On stop it lets running attempts finish within the shutdown
timeout and gives every other lease back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from config import RouteSettings, Settings
from relay.dkim import DkimError, KeyRing
from relay.mx import MxResolver, screen
from relay.outcome import decide
from relay.pacing import Limits, Pacer
from relay.tasks import drain, first_of
from relay.transport import (
    ConnectionCache,
    Envelope,
    SessionPolicy,
    SessionResult,
    Timeouts,
    send,
)
from relay.unsubscribe import add_headers, unsubscribe_url
from store import DeliveryJob, MessageType, Outcome, Reply, Source, Spool, StoreError, make_token

logger = logging.getLogger(__name__)

_TEST_REPLY = Reply(250, "2.0.0", "test mode: accepted, not sent")

# Session failures that mean "no host of this destination could be reached".
_UNREACHABLE = frozenset({"4.4.1", "4.4.2"})


class DeliveryEngine:
    """Runs until `stop()`; one instance per service."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        resolver: MxResolver,
        own_listeners: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._spool = spool
        self._settings = settings
        self._resolver = resolver
        self._own_listeners = tuple(own_listeners)
        cfg = settings.delivery
        self._timeouts = Timeouts(cfg.connect_timeout, cfg.command_timeout, cfg.data_timeout)
        self._policy = SessionPolicy(
            local_hostname=settings.server.hostname,
            timeouts=self._timeouts,
            tls=cfg.tls,
            tls_ca_file=str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
            source_address=cfg.source_address,
        )
        self._keys = KeyRing(spool.domain_keys, ttl=cfg.key_cache_ttl)
        self._pacer = Pacer(
            limits=lambda d: _limits(self._settings, d),
            default=_limits(settings, ""),
            overridden={d: _limits(settings, d) for d in cfg.destinations},
            backoff=cfg.destination_backoff,
            backoff_cap=min([cfg.destination_backoff, *cfg.retry_schedule]),
        )
        self._connections = ConnectionCache(
            reuse_limit=cfg.connection_reuse_limit,
            idle_timeout=cfg.connection_idle_timeout,
            max_idle=cfg.max_connections,
        )
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            cfg = self._settings.delivery  # read each round: a reload may have changed it
            free = cfg.max_connections - len(self._running)
            jobs: list[DeliveryJob] = []
            if free > 0:
                rooms, default_room = self._pacer.rooms()
                self._spool.work_available.clear()
                self._slot_freed.clear()
                try:
                    jobs = await self._spool.claim_due(
                        max_units=min(free, cfg.claim_batch),
                        per_destination=default_room,
                        lease=cfg.lease,
                        rooms=rooms,
                        aging=cfg.priority_aging,
                    )
                except StoreError as exc:
                    # A failed commit (write lock held too long, full disk) is the spool's
                    # trouble, not the engine's end: try again at the next poll.
                    logger.error("cannot claim delivery work: %s", exc)
            if jobs and self._stopping.is_set():  # stop() came during the claim: give it back
                await self._spool.release(r.id for job in jobs for r in job.recipients)
                break
            for job in jobs:
                self._pacer.started(job.destination)
                task = asyncio.create_task(self._attempt(job), name=f"deliver {job.message_id}")
                self._running.add(task)
                task.add_done_callback(self._done)
            if jobs and len(self._running) < cfg.max_connections:
                continue  # there may be more due work that can start now
            await self._wait_for_work(cfg.poll_interval)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_freed.set()

    def reconfigure(self, settings: Settings) -> None:
        """Routes, pacing and retry settings from a reload (SIGHUP); attempts under way keep
        what they started with, the next claim and the next attempt use the new ones."""
        cfg = settings.delivery
        self._settings = settings
        self._pacer.reconfigure(
            default=_limits(settings, ""),
            overridden={d: _limits(settings, d) for d in cfg.destinations},
            backoff=cfg.destination_backoff,
            backoff_cap=min([cfg.destination_backoff, *cfg.retry_schedule]),
        )

    async def _wait_for_work(self, timeout: float) -> None:  # noqa: ASYNC109
        await first_of(
            (
                self._spool.work_available.wait(),
                self._slot_freed.wait(),
                self._stopping.wait(),
            ),
            timeout,
        )

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop claiming; let running attempts finish within `timeout`, then release the rest."""
        self._stopping.set()
        await drain(self._running, timeout)
        await self._connections.close()

    async def _attempt(self, job: DeliveryJob) -> None:
        result: SessionResult
        unreachable = False
        try:
            result, unreachable = await asyncio.wait_for(
                self._deliver(job), self._settings.delivery.attempt_timeout
            )
        except asyncio.CancelledError:
            # Shutdown cut the attempt short: the units go back, due now.
            self._pacer.finished(job.destination, is_unreachable=False)
            await asyncio.shield(self._spool.release(r.id for r in job.recipients))
            raise
        except TimeoutError:
            result = _failed(Reply(451, "4.4.7", "delivery attempt timed out"))
        except Exception:
            logger.exception("%s: delivery attempt failed inside Postroom", job.message_id)
            result = _failed(Reply(451, "4.3.0", "internal error during delivery"))
        self._pacer.finished(job.destination, is_unreachable=unreachable)
        outcomes = self._outcomes(job, result)
        try:
            await self._spool.record_outcomes(job, outcomes)
        except StoreError as exc:
            # The lease expires and the units are tried again: at-least-once.
            logger.error("%s: cannot record outcomes: %s", job.message_id, exc)
            return
        self._log(job, outcomes, result)

    async def _deliver(self, job: DeliveryJob) -> tuple[SessionResult, bool]:
        """The attempt's result, and whether no host of the destination could be reached."""
        if job.is_test:
            # A test-mode key's message never leaves the machine: every recipient is recorded
            # delivered, as hosted APIs report their test sends, with `test: true` in the event.
            return SessionResult(
                host="",
                address="",
                replies={r.id: _TEST_REPLY for r in job.recipients},
            ), False
        cfg = self._settings.delivery
        envelope = Envelope(
            mail_from=self._mail_from(job),
            recipients=tuple((r.id, r.email) for r in job.recipients),
            content=await self._sign(job),
        )
        smarthost = cfg.route_for(job.destination)
        if smarthost is not None:
            result = await send(
                envelope, smarthost.host, smarthost.host, smarthost.port,
                self._smarthost_policy(smarthost), self._connections,
            )
            return result, _is_unreachable(result)
        route = screen(
            await self._resolver.route(job.destination),
            self._settings.server.hostname,
            self._own_listeners,
            cfg.mx_port,
            cfg.allow_private_mx,
        )
        if route.failure is not None:
            return _failed(route.failure), False
        last: SessionResult | None = None
        unreachable = True
        for host in route.hosts:
            for address in host.addresses:
                last = await send(
                    envelope, host.name, address, cfg.mx_port, self._policy, self._connections
                )
                unreachable = unreachable and _is_unreachable(last)
                if last.failure is None:
                    return last, False
                if last.failure.code >= 500:
                    # A permanent refusal of the session is not the host's fault.
                    return last, False
        assert last is not None
        return last, unreachable

    def _mail_from(self, job: DeliveryJob) -> str:
        """The envelope sender: `delivery.return_path` for API mail when set; `<>` stays."""
        return_path = self._settings.delivery.return_path
        if return_path and job.source is Source.API and job.mail_from:
            return return_path
        return job.mail_from

    async def _sign(self, job: DeliveryJob) -> bytes:
        """The bytes to send: signed with the From domain's keys, or as stored when it has none."""
        content = await self._with_unsubscribe(job)
        signer = await self._keys.signer_for(content)
        if signer is None:
            return content
        try:
            return signer.sign(content)
        except DkimError as exc:
            logger.warning("%s: sent unsigned: %s", job.message_id, exc)
            return content

    async def _with_unsubscribe(self, job: DeliveryJob) -> bytes:
        """Marketing mail (one recipient per job) gets the one-click unsubscribe headers."""
        public_url = self._settings.api.public_url
        if (
            job.message_type is not MessageType.MARKETING
            or public_url is None
            or len(job.recipients) != 1
        ):
            return job.content
        secret = await self._spool.unsubscribe_secret()
        token = make_token(secret, job.message_id, job.recipients[0].email)
        try:
            return add_headers(
                job.content, unsubscribe_url(public_url, token),
                self._settings.api.unsubscribe_mailto,
            )
        except ValueError as exc:
            logger.warning("%s: no List-Unsubscribe: %s", job.message_id, exc)
            return job.content

    def _smarthost_policy(self, route: RouteSettings) -> SessionPolicy:
        return SessionPolicy(
            local_hostname=self._settings.server.hostname,
            timeouts=self._timeouts,
            tls=route.tls,
            tls_ca_file=self._policy.tls_ca_file,
            source_address=self._policy.source_address,
            username=route.username,
            password=route.password.get_secret_value() if route.password else None,
        )

    def _outcomes(self, job: DeliveryJob, result: SessionResult) -> list[Outcome]:
        now = time.time()
        cfg = self._settings.delivery
        expires_at = job.created_at + cfg.max_age if job.created_at else None
        outcomes = []
        details: dict[str, object] = (
            {"mx": result.host, "ip": result.address, "tls": result.tls} if result.host else {}
        )
        if job.is_test:
            details = {"test": True}
        for rcpt in job.recipients:
            reply = result.failure or result.replies.get(rcpt.id)
            if reply is None:
                reply = Reply(451, "4.3.0", "no reply recorded")
            outcomes.append(
                decide(
                    rcpt.id, rcpt.attempts, reply, cfg.retry_schedule, now, details,
                    at_rcpt=result.failure is None and rcpt.id in result.at_rcpt,
                    expires_at=expires_at,
                )
            )
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


def _limits(settings: Settings, destination: str) -> Limits:
    dest = settings.delivery.destination(destination)
    assert dest.max_connections is not None and dest.message_rate is not None
    return Limits(dest.max_connections, dest.message_rate)


def _is_unreachable(result: SessionResult) -> bool:
    return result.failure is not None and result.failure.enhanced in _UNREACHABLE


def _failed(reply: Reply) -> SessionResult:
    """A result where no host was reached: `reply` stands for every recipient."""
    return SessionResult(host="", address="", replies={}, failure=reply)
