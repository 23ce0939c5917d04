"""Retries on a clock the test advances: a real spool and delivery engine, the test DNS server
and a scripted MX sink, and the default retry schedule walked step by step without waiting it.

The engine is wired as relay/service.py wires it, plus `clock=`: the clock decides what the
claim finds due, when a deferred unit is tried again, when a message has expired, and stamps
the recorded outcomes. It stands still unless a test moves it, so "not retried yet" is checked
with a short real wait while the engine keeps polling (every 0.1 s in the test settings).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from config import Settings
from config.settings import DeliverySettings
from relay.delivery import DeliveryEngine
from relay.mx import MxResolver, build_resolver
from store import Message, Recipient, RecipientStatus, Source, Spool, Submission, format_time
from tests.support import MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"
RCPT = "user@example.test"
DEFAULT_SCHEDULE = [30.0, 300.0, 1800.0, 7200.0, 18000.0]  # 30 s, 5 min, 30 min, 2 h, 5 h
STILL = 0.5  # real seconds the engine gets (five polls) to show it does not retry early


class Clock:
    """UNIX time that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def catch_up(self) -> None:
        """Not behind the wall clock, which intake stamps new mail with (so it is due)."""
        self.now = max(self.now, time.time())


@dataclass
class Relay:
    spool: Spool
    clock: Clock
    settings: Settings

    async def submit(self, *recipients: str) -> str:
        accepted = await self.spool.accept(
            Submission("app@acme.test", recipients or (RCPT,), CONTENT, Source.API)
        )
        self.clock.catch_up()
        return accepted.id

    async def recipient(self, message_id: str) -> Recipient:
        [rcpt] = (await self.spool.get_message(message_id)).recipients
        return rcpt

    async def after_attempt(self, message_id: str, attempts: int) -> Recipient:
        """Wait until the recipient's `attempts`-th attempt is recorded, and return it."""

        async def check() -> Recipient | None:
            rcpt = await self.recipient(message_id)
            recorded = rcpt.status is not RecipientStatus.SENDING and rcpt.attempts == attempts
            return rcpt if recorded else None

        rcpt: Recipient = await wait_until(check, message=f"attempt {attempts} never recorded")
        return rcpt

    async def assert_not_retried(self, message_id: str, attempts: int) -> None:
        """The clock stands still: polls come and go, and no further attempt starts."""
        await asyncio.sleep(STILL)
        rcpt = await self.recipient(message_id)
        assert (rcpt.status, rcpt.attempts) == (RecipientStatus.DEFERRED, attempts)

    async def message(self, message_id: str) -> Message:
        return await self.spool.get_message(message_id)


Launch = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def relay(make_settings: Callable[..., Settings]) -> AsyncIterator[Launch]:
    """`await relay(delivery={...})`: a spool and an engine on a test clock (default retry
    schedule unless given); both stopped at teardown."""
    started: list[tuple[Spool, DeliveryEngine, asyncio.Task[None]]] = []

    async def launch(**sections: dict[str, object]) -> Relay:
        delivery = {"retry_schedule": DEFAULT_SCHEDULE, **sections.pop("delivery", {})}
        settings = make_settings(delivery=delivery, **sections)
        clock = Clock()
        spool = await Spool.open(settings)
        engine = DeliveryEngine(
            spool, settings, MxResolver(build_resolver(settings)), clock=clock
        )
        task = asyncio.create_task(engine.run(), name="delivery")
        started.append((spool, engine, task))
        return Relay(spool, clock, settings)

    yield launch
    for spool, engine, task in started:
        await engine.stop(5)
        await asyncio.wait_for(task, 10)
        await spool.close()


def test_the_default_schedule_is_the_one_walked_here():
    assert DeliverySettings().retry_schedule == DEFAULT_SCHEDULE
    assert DeliverySettings().max_age == 5 * 86400


async def test_deferred_then_delivered_when_the_clock_passes_the_first_step(
    relay: Launch, mx_sink: MxSink
):
    r: Relay = await relay()
    mx_sink.script_rcpt(RCPT, "451 4.2.0 Mailbox busy, try later")
    message_id = await r.submit()
    first = await r.after_attempt(message_id, 1)
    t0 = r.clock.now
    assert first.status is RecipientStatus.DEFERRED
    assert first.next_attempt_at == t0 + 30

    await r.assert_not_retried(message_id, 1)
    r.clock.now = t0 + 29.9  # just short of the step: still waiting
    await r.assert_not_retried(message_id, 1)
    assert mx_sink.messages == []

    r.clock.now = t0 + 30.5
    second = await r.after_attempt(message_id, 2)
    assert second.status is RecipientStatus.DELIVERED
    assert second.delivered_at == t0 + 30.5  # the outcome is stamped by the engine's clock
    assert [m.rcpt_tos for m in mx_sink.messages] == [[RCPT]]

    message = await r.message(message_id)
    assert [e.type.value for e in message.events] == [
        "email.queued", "email.deferred", "email.delivered",
    ]
    deferred, delivered = message.events[1:]
    assert deferred.data["next_attempt_at"] == format_time(t0 + 30)
    assert (deferred.created_at, delivered.created_at) == (t0, t0 + 30.5)


async def test_every_step_of_the_default_schedule_then_retries_exhausted(
    relay: Launch, mx_sink: MxSink
):
    r: Relay = await relay()
    mx_sink.script_rcpt(RCPT, *["452 4.2.2 Mailbox full"] * 10)  # every attempt, and more
    message_id = await r.submit()
    for attempt, step in enumerate(DEFAULT_SCHEDULE, start=1):
        rcpt = await r.after_attempt(message_id, attempt)
        failed_at = r.clock.now
        assert rcpt.status is RecipientStatus.DEFERRED, f"attempt {attempt}"
        assert rcpt.next_attempt_at == failed_at + step, f"attempt {attempt}"
        events = (await r.message(message_id)).events
        assert events[-1].data["next_attempt_at"] == format_time(failed_at + step)
        r.clock.now = failed_at + step - 1  # a second early: not yet
        await r.assert_not_retried(message_id, attempt)
        r.clock.now = failed_at + step  # due exactly at the step

    final = await r.after_attempt(message_id, len(DEFAULT_SCHEDULE) + 1)
    assert final.status is RecipientStatus.BOUNCED
    assert final.next_attempt_at is None
    assert final.last_reply is not None and final.last_reply.enhanced == "4.2.2"
    message = await r.message(message_id)
    assert [e.type.value for e in message.events] == [
        "email.queued", *["email.deferred"] * 5, "email.bounced",
    ]
    assert message.events[-1].data["reason"] == "retries exhausted"
    assert "next_attempt_at" not in message.events[-1].data
    assert mx_sink.messages == []
    assert await r.spool.suppression(RCPT) is None  # a 4xx says nothing of the address


async def test_max_age_bounces_before_the_schedule_ends(
    relay: Launch, mx_sink: MxSink
):
    # delivery.max_age stays at its default (5 days). The second step (6 days) is longer than
    # that: relay/outcome.py does not shorten a step to the expiry, it bounces the deferral
    # that comes at or after it, although the schedule still has a step left.
    r: Relay = await relay(delivery={"retry_schedule": ["1h", "6d", "1d"]})
    assert r.settings.delivery.max_age == 5 * 86400
    mx_sink.script_rcpt(RCPT, *["451 4.2.0 Mailbox busy, try later"] * 5)
    message_id = await r.submit()
    created_at = (await r.message(message_id)).created_at

    await r.after_attempt(message_id, 1)
    r.clock.now += 3600
    second = await r.after_attempt(message_id, 2)
    assert second.status is RecipientStatus.DEFERRED  # one hour old: still young
    assert second.next_attempt_at == r.clock.now + 6 * 86400  # past the expiry, not cut to it

    r.clock.now = created_at + 5 * 86400 - 60  # a minute before expiry: not due, nothing happens
    await r.assert_not_retried(message_id, 2)
    assert second.next_attempt_at is not None
    r.clock.now = second.next_attempt_at  # the 6-day step is due
    third = await r.after_attempt(message_id, 3)
    assert third.status is RecipientStatus.BOUNCED
    assert third.next_attempt_at is None
    message = await r.message(message_id)
    assert [e.type.value for e in message.events] == [
        "email.queued", "email.deferred", "email.deferred", "email.bounced",
    ]
    assert message.events[-1].data["reason"] == "message expired"
    assert await r.spool.suppression(RCPT) is None
