"""The delivery engine (Postfix's qmgr): claim due units, attempt them, record the outcomes.

Owns the loop that asks pacing what each destination (a recipient domain, or the smarthost it is
routed through) may start now, leases that from the spool (round-robin over recipient domains),
and runs one attempt per (message, domain) job: route (smarthost from `delivery.routes`, else MX
with loop and private-address screening), DKIM-sign with the From domain's keys, try hosts and
addresses in order, then record each recipient's outcome with its event in one spool write — or
`failed` when Postroom itself cannot try (the body is gone or does not decrypt, the message
cannot be signed). It wakes when intake commits new work or an attempt frees a slot, and polls
otherwise. On stop it lets running attempts finish within the shutdown timeout and gives every
other lease back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from config import RouteSettings, Settings
from relay import bounce
from relay.deadlines import Deadline
from relay.dkim import DkimError, KeyRing, SignWith, sign_here
from relay.mx import MxResolver, screen
from relay.outcome import decide, not_attempted
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
from store import (
    DeliveryJob,
    MessageType,
    Outcome,
    Reply,
    Source,
    Spool,
    StoreError,
    Submission,
    make_token,
)

logger = logging.getLogger(__name__)

_TEST_REPLY = Reply(250, "2.0.0", "test mode: accepted, not sent")

# Session failures that mean "no host of this destination could be reached".
_UNREACHABLE = frozenset({"4.4.1", "4.4.2"})


@dataclass(frozen=True, slots=True)
class _Routing:
    """`delivery.routes` worked out once per configuration: each claim asks it about every
    routed domain (100 routes made `pace_key` and the set of smarthosts ~5% of a drain's loop)."""

    #: Routed domain (or "*") -> its route and the session policy for it.
    routes: dict[str, tuple[RouteSettings, SessionPolicy]]
    #: Routed domain (or "*") -> its smarthost, the pacing destination (`host:port`).
    keys: dict[str, str]
    smarthosts: frozenset[str]

    @classmethod
    def of(cls, settings: Settings, policy: SessionPolicy) -> _Routing:
        routes = {
            domain: (route, _smarthost_policy(route, policy, settings.server.hostname))
            for domain, route in settings.delivery.routes.items()
        }
        keys = {domain: pace_key(settings, domain) for domain in settings.delivery.routes}
        return cls(routes, keys, frozenset(keys.values()))

    def route_of(self, domain: str) -> tuple[RouteSettings, SessionPolicy] | None:
        """As `DeliverySettings.route_for`: the domain's own route, else `"*"`, else None."""
        return self.routes.get(domain) or self.routes.get("*")

    def smarthost_of(self, domain: str) -> str | None:
        """The smarthost (`host:port`) a recipient domain is routed through; None: by MX."""
        return self.keys.get(domain) or self.keys.get("*")


@dataclass(frozen=True, slots=True)
class NotAttempted:
    """Postroom itself cannot try a job (no host was asked): its recipients are `failed`."""

    reason: str


class DeliveryEngine:
    """Runs until `stop()`; one instance per service."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        resolver: MxResolver,
        own_listeners: Sequence[tuple[str, int]] = (),
        clock: Callable[[], float] = time.time,
        sign_with: SignWith = sign_here,
    ) -> None:
        # `clock` (UNIX time) decides what is due, when a deferred unit is tried again, when a
        # message has expired, and stamps recorded outcomes: tests advance it through the retry
        # schedule. Pacing and connection reuse measure intervals on their own monotonic clocks.
        self._spool = spool
        self._clock = clock
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
        self._routing = _Routing.of(settings, self._policy)
        self._keys = KeyRing(spool.domain_keys, ttl=cfg.key_cache_ttl)
        self._sign_with = sign_with
        self._default_limits, self._overridden_limits = _pace_limits(settings)
        self._pacer = Pacer(
            limits=self._limits_of,
            default=self._default_limits,
            overridden=self._overridden_limits,
            backoff=cfg.destination_backoff,
            backoff_cap=min([cfg.destination_backoff, *cfg.retry_schedule]),
        )
        self._connections = ConnectionCache(
            reuse_limit=cfg.connection_reuse_limit,
            idle_timeout=cfg.connection_idle_timeout,
            max_idle=cfg.max_connections,
        )
        self._running: set[asyncio.Task[None]] = set()
        #: The attempts still talking to a host (the rest are recording their outcomes).
        self._sending: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            cfg = self._settings.delivery  # read each round: a reload may have changed it
            free = self._free()
            jobs: list[DeliveryJob] = []
            if free > 0:
                rooms, default_room, routed_room, smarthost_rooms = self._claim_rooms()
                self._spool.work_available.clear()
                self._slot_freed.clear()
                units = min(free, cfg.claim_batch, routed_room)
                try:
                    if units > 0:
                        jobs = await self._spool.claim_due(
                            max_units=units,
                            per_destination=default_room,
                            lease=cfg.lease,
                            rooms=rooms,
                            aging=cfg.priority_aging,
                            now=self._clock(),
                            shared=self._smarthost_of,
                            shared_rooms=smarthost_rooms,
                        )
                except StoreError as exc:
                    # A failed commit (write lock held too long, full disk) is the spool's
                    # trouble, not the engine's end: try again at the next poll.
                    logger.error("cannot claim delivery work: %s", exc)
            if jobs and self._stopping.is_set():  # stop() came during the claim: give it back
                await self._spool.release(r.id for job in jobs for r in job.recipients)
                break
            held: list[DeliveryJob] = []
            for job in jobs:
                key = self._routing.smarthost_of(job.destination) or job.destination
                if self._pacer.room(key) <= 0:
                    held.append(job)  # pacing changed since the claim: given back
                    continue
                self._pacer.started(key)
                task = asyncio.create_task(
                    self._attempt(job, key), name=f"deliver {job.message_id}"
                )
                self._running.add(task)
                self._sending.add(task)
                task.add_done_callback(self._done)
            if held:
                await self._spool.release(r.id for job in held for r in job.recipients)
            elif jobs and self._free() > 0:
                continue  # there may be more due work that can start now
            await self._wait_for_work(cfg.poll_interval)

    def _claim_rooms(self) -> tuple[dict[str, int], int, int, dict[str, int]]:
        """Pacing's rooms as the spool claims them: (per named recipient domain, any other
        domain, the most units in all, per smarthost). A domain routed through a smarthost gets
        the smarthost's room, and the domains of one smarthost share it (`_smarthost_of`), so
        the claim leases no more than the smarthost can start now.
        """
        cfg = self._settings.delivery
        routing = self._routing
        rooms, default = self._pacer.rooms()
        by_domain = {
            name: room for name, room in rooms.items()
            if ":" not in name and routing.smarthost_of(name) is None  # a domain delivered by MX
        }
        smarthosts = {key: self._pacer.room(key) for key in routing.smarthosts}
        for domain, key in routing.keys.items():
            by_domain[domain] = smarthosts[key]
        total = cfg.max_connections
        if "*" in routing.keys:
            default = by_domain.pop("*")
            total = sum(smarthosts.values())
        return by_domain, default, total, smarthosts

    def _smarthost_of(self, domain: str) -> str | None:
        """The smarthost (`host:port`) a recipient domain is routed through; None: by MX."""
        return self._routing.smarthost_of(domain)

    def _free(self) -> int:
        """How many attempts may start now. An attempt's connection is back in the cache (or
        closed) before its outcomes are committed, so one that is only waiting for that commit
        holds no connection: it counts against `max_connections` only while it talks to a host.
        But at most as many again may wait for a commit, so that a slow disk bounds the jobs
        (and their contents) held in memory."""
        limit = self._settings.delivery.max_connections
        return min(limit - len(self._sending), 2 * limit - len(self._running))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._sending.discard(task)
        self._slot_freed.set()

    def _sent(self) -> None:
        """The running attempt has finished with its host: it now only records outcomes."""
        task = asyncio.current_task()
        if task in self._sending:
            self._sending.discard(task)
            self._slot_freed.set()

    def reconfigure(self, settings: Settings) -> None:
        """Routes, pacing and retry settings from a reload (SIGHUP); attempts under way keep
        what they started with, the next claim and the next attempt use the new ones."""
        cfg = settings.delivery
        self._settings = settings
        self._routing = _Routing.of(settings, self._policy)
        self._default_limits, self._overridden_limits = _pace_limits(settings)
        self._pacer.reconfigure(
            default=self._default_limits,
            overridden=self._overridden_limits,
            backoff=cfg.destination_backoff,
            backoff_cap=min([cfg.destination_backoff, *cfg.retry_schedule]),
        )

    def _limits_of(self, key: str) -> Limits:
        """A pacing destination's limits: a smarthost's (`host:port`) come from
        `[delivery.destinations."HOST"]` (its host name as written in the route), a domain's from
        its own entry, else the defaults; from values computed at start and at each reload."""
        name = key.rpartition(":")[0] if ":" in key else key  # no domain name holds a ':'
        return self._overridden_limits.get(name, self._default_limits)

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

    async def _attempt(self, job: DeliveryJob, key: str) -> None:
        """Run one job; `key` is the pacing destination it started under."""
        result: SessionResult | NotAttempted
        unreachable = False
        try:
            # A Deadline, not wait_for (Python 3.11's wraps the coroutine in a second task) nor
            # asyncio.timeout (a loop timer armed and cancelled per attempt): relay/deadlines.py
            async with Deadline(self._settings.delivery.attempt_timeout):
                result, unreachable = await self._deliver(job)
        except asyncio.CancelledError:
            # Shutdown cut the attempt short: the units go back, due now.
            self._pacer.finished(key, is_unreachable=False)
            await asyncio.shield(self._spool.release(r.id for r in job.recipients))
            raise
        except TimeoutError:
            result = _failed(Reply(451, "4.4.7", "delivery attempt timed out"))
        except Exception:
            logger.exception("%s: delivery attempt failed inside Postroom", job.message_id)
            result = _failed(Reply(451, "4.3.0", "internal error during delivery"))
        self._pacer.finished(key, is_unreachable=unreachable)
        self._sent()
        if isinstance(result, NotAttempted):
            outcomes = [not_attempted(r.id, result.reason) for r in job.recipients]
            relay = "none"
        else:
            outcomes = self._outcomes(job, result)
            relay = f"{result.host}[{result.address}]" if result.host else "none"
        try:
            await self._spool.record_outcomes(job, outcomes, now=self._clock())
        except StoreError as exc:
            # The lease expires and the units are tried again: at-least-once.
            logger.error("%s: cannot record outcomes: %s", job.message_id, exc)
            return
        self._log(job, outcomes, relay)
        remote = "" if isinstance(result, NotAttempted) or _is_unreachable(result) else result.host
        emails = {r.id: r.email for r in job.recipients}
        failed = bounce.failures_to_report(
            self._settings.delivery.bounce_messages, job.source, job.mail_from,
            [(emails[o.recipient_id], o.status, o.reply) for o in outcomes],
        )
        if failed:  # shielded only then: a shield is a task, and most attempts have no DSN
            await asyncio.shield(self._bounce(job, failed, remote))

    async def _bounce(
        self, job: DeliveryJob, failed: tuple[bounce.FailedRecipient, ...], remote: str
    ) -> None:
        """Queue a DSN for the recipients this attempt made final-failed (relay/bounce.py).

        Only after their outcomes are recorded: one DSN per attempt that failed recipients, the
        recipients failing together (one job, one destination) in one DSN. It goes through the
        same intake as all mail, stored and delivered like any message, with a null envelope
        sender so that it never bounces itself. Failing to queue it is logged and changes
        nothing about the original message. API mail gets none: events and webhooks report it.
        """
        hostname = self._settings.server.hostname
        try:
            content = bounce.compose(
                bounce.Failure(
                    queue_id=job.message_id,
                    envelope_sender=job.mail_from,
                    reporting_host=hostname,
                    arrival=job.created_at,
                    now=self._clock(),
                    recipients=failed,
                    original=job.content,
                    remote_mta=remote,
                )
            )
            accepted = await self._spool.accept(
                Submission(
                    mail_from="",  # RFC 5321 §4.5.5: a DSN is sent from the null sender
                    recipients=(job.mail_from,),
                    content=content,
                    # Stored as SMTP mail: it leaves through the SMTP path with its own null
                    # sender (`delivery.return_path` is for API mail only).
                    source=Source.SMTP,
                    is_system=True,
                )
            )
        except (StoreError, ValueError) as exc:  # refused by intake, full disk, bad address
            logger.error(
                "%s: cannot queue bounce message to <%s>: %s", job.message_id, job.mail_from, exc
            )
            return
        except Exception:
            # The original's outcomes stand whatever happens here: the attempt task never dies.
            logger.exception("%s: cannot queue bounce message to <%s>", job.message_id,
                             job.mail_from)
            return
        logger.info(
            "%s: sender non-delivery notification: %s to=<%s>",
            job.message_id, accepted.id, job.mail_from,
        )

    async def _deliver(self, job: DeliveryJob) -> tuple[SessionResult | NotAttempted, bool]:
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
        if job.content_error is not None:
            # The stored body is damaged or sealed with a key that is not configured: no retry
            # opens it. The reason says so and holds neither the key nor the body.
            return NotAttempted(job.content_error), False
        if not job.content:
            # Retention removed the body of a unit still pending: there is nothing to send,
            # now or later.
            return NotAttempted("the stored message body is gone"), False
        content = await self._sign(job)
        if isinstance(content, NotAttempted):
            return content, False
        envelope = Envelope(
            mail_from=self._mail_from(job),
            recipients=tuple((r.id, r.email) for r in job.recipients),
            content=content,
        )
        routed = self._routing.route_of(job.destination)
        if routed is not None:
            smarthost, policy = routed
            result = await send(
                envelope, smarthost.host, smarthost.host, smarthost.port, policy,
                self._connections,
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
                # A session-level failure (the greeting, EHLO, STARTTLS or MAIL refused, or no
                # connection), even a 5xx, is this host's answer, not one about the recipient
                # or the message: the next address and host are tried, as Postfix does
                # (smtp_skip_5xx_greeting = yes). Replies to RCPT and after DATA are in
                # `replies`, not `failure`, and stand at once. When every host refused, the
                # last refusal stands: a 5xx bounces, anything else defers.
        assert last is not None
        return last, unreachable

    def _mail_from(self, job: DeliveryJob) -> str:
        """The envelope sender: `delivery.return_path` for API mail when set; `<>` stays."""
        return_path = self._settings.delivery.return_path
        if return_path and job.source is Source.API and job.mail_from:
            return return_path
        return job.mail_from

    async def _sign(self, job: DeliveryJob) -> bytes | NotAttempted:
        """The bytes to send: signed with the From domain's keys, or as stored when it has none.

        A domain with keys that cannot sign (a stored key that does not decrypt, a broken key, a
        message dkimpy cannot parse) is not sent unsigned: receivers enforcing the domain's DMARC
        policy would refuse or junk it, and a retry signs no better.
        """
        content = await self._with_unsubscribe(job)
        try:
            signer = await self._keys.signer_for(content)
            return content if signer is None else await self._sign_with(signer.keys, content)
        except DkimError as exc:
            return NotAttempted(str(exc))

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

    def _outcomes(self, job: DeliveryJob, result: SessionResult) -> list[Outcome]:
        now = self._clock()
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
    def _log(job: DeliveryJob, outcomes: list[Outcome], relay: str) -> None:
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


def pace_key(settings: Settings, domain: str) -> str:
    """The destination pacing counts a recipient domain's attempts under: the domain itself,
    or `host:port` of the smarthost it is routed through (issue 6: "per destination —
    recipient domain, or smarthost"), so that one smarthost's cap holds over all its domains."""
    route = settings.delivery.route_for(domain)
    return domain if route is None else f"{route.host.lower()}:{route.port}"


def _smarthost_policy(route: RouteSettings, policy: SessionPolicy, hostname: str) -> SessionPolicy:
    """The session policy for a smarthost route: the engine's, with the route's TLS and AUTH."""
    return SessionPolicy(
        local_hostname=hostname,
        timeouts=policy.timeouts,
        tls=route.tls,
        tls_ca_file=policy.tls_ca_file,
        source_address=policy.source_address,
        username=route.username,
        password=route.password.get_secret_value() if route.password else None,
    )


def _pace_limits(settings: Settings) -> tuple[Limits, dict[str, Limits]]:
    """Pacing's limits: the defaults, and those of each `[delivery.destinations]` entry."""

    def limits(name: str) -> Limits:
        dest = settings.delivery.destination(name)
        assert dest.max_connections is not None and dest.message_rate is not None
        return Limits(dest.max_connections, dest.message_rate)

    return limits(""), {name: limits(name) for name in settings.delivery.destinations}


def _is_unreachable(result: SessionResult) -> bool:
    return result.failure is not None and result.failure.enhanced in _UNREACHABLE


def _failed(reply: Reply) -> SessionResult:
    """A result where no host was reached: `reply` stands for every recipient."""
    return SessionResult(host="", address="", replies={}, failure=reply)
