"""The data lifecycle: retention sweeps with a clock moved on, and store_content = false."""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import pytest

from config import Settings
from relay.retention import DAY, RetentionSweeper, policy_at
from store import (
    EventFilter,
    EventType,
    MessageStatus,
    NewSuppression,
    RetentionPolicy,
    Source,
    Spool,
    Submission,
    SuppressionReason,
    SweepCursor,
)
from store.sql import Q
from tests.conftest import Running
from tests.support import MxSink, WebhookSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nthe secret body\r\n"


async def submit(running: Running, to: str) -> str:
    accepted = await running.spool.accept(Submission("app@acme.test", (to,), CONTENT, Source.API))
    return accepted.id


def bodies(running: Running) -> dict[str, bytes]:
    with sqlite3.connect(running.service.settings.spool_path) as conn:
        return {i: bytes(b) for i, b in conn.execute("SELECT id, body FROM messages")}


async def settled(running: Running, message_id: str, status: MessageStatus) -> None:
    async def check() -> bool:
        return (await running.spool.get_message(message_id)).status is status

    await wait_until(check, message=f"{message_id} never {status}")


def test_policy_from_settings():
    now = 1000 * DAY
    assert policy_at(Settings(), now).content_before == now - 30 * DAY
    assert policy_at(Settings(), now).metadata_before == now - 90 * DAY
    keep = Settings(retention={"content_days": 0, "metadata_days": 0})
    assert policy_at(keep, now).content_before is None
    assert policy_at(keep, now).metadata_before is None
    assert policy_at(Settings(retention={"store_content": False}), now).content_before == now


async def test_sweeps_remove_bodies_then_messages_in_batches(start: Any, mx_sink: MxSink):
    running: Running = await start(
        delivery={"retry_schedule": ["1h"]}, retention={"batch_size": 1, "batch_pause": 0}
    )
    mx_sink.script_rcpt("wait@example.test", "451 4.2.0 busy")
    done = [await submit(running, f"u{n}@example.test") for n in range(3)]
    pending = await submit(running, "wait@example.test")
    for message_id in done:
        await settled(running, message_id, MessageStatus.DELIVERED)
    await settled(running, pending, MessageStatus.DEFERRED)
    settings = running.service.settings
    now = time.time()

    # Within both retention periods nothing goes.
    assert await RetentionSweeper(running.spool, settings, lambda: now + DAY).sweep() == 0

    # Past content_days: the finished messages' bodies go; the rows and the pending body stay.
    await RetentionSweeper(running.spool, settings, lambda: now + 31 * DAY).sweep()
    kept = bodies(running)
    assert all(kept[m] == b"" for m in done)
    assert b"the secret body" in kept[pending]
    assert len(await running.spool.list_messages()) == 4

    # Past metadata_days: finished messages and their events go; the pending message stays.
    await RetentionSweeper(running.spool, settings, lambda: now + 91 * DAY).sweep()
    assert [m.id for m in await running.spool.list_messages()] == [pending]
    for message_id in done:
        assert not await running.spool.list_events(EventFilter(message_id=message_id))
    assert b"the secret body" in bodies(running)[pending]


async def test_store_content_false_drops_the_body_once_final(start: Any, mx_sink: MxSink):
    running: Running = await start(retention={"store_content": False})
    message_id = await submit(running, "user@example.test")
    await settled(running, message_id, MessageStatus.DELIVERED)
    assert bodies(running)[message_id] == b""
    [received] = mx_sink.messages
    assert b"the secret body" in received.data


async def test_store_content_false_drops_the_body_when_final_at_intake_or_cancelled(start: Any):
    running: Running = await start(retention={"store_content": False})
    spool = running.spool
    await spool.add_suppressions([NewSuppression("gone@example.test")])
    suppressed = await submit(running, "gone@example.test")
    assert (await spool.get_message(suppressed)).status is MessageStatus.SUPPRESSED
    later = time.time() + 3600

    async def scheduled(to: str) -> str:
        accepted = await spool.accept(
            Submission("app@acme.test", (to,), CONTENT, Source.API, scheduled_at=later)
        )
        return accepted.id

    by_api, by_id, by_domain = [await scheduled(f"{n}@{n}.test") for n in ("a", "b", "c")]
    kept = await scheduled("d@d.test")
    await spool.cancel_message(by_api)
    await spool.cancel(message_id=by_id)
    assert (await spool.cancel(domain="c.test")).cancelled == 1
    stored = bodies(running)
    assert [stored[m] for m in (suppressed, by_api, by_id, by_domain)] == [b""] * 4
    assert b"the secret body" in stored[kept]  # not final: its body stays


def suppression_rows(running: Running) -> list[str]:
    with sqlite3.connect(running.service.settings.spool_path) as conn:
        return [e for (e,) in conn.execute("SELECT email FROM suppressions ORDER BY email")]


def outbox_recipients(running: Running, event_type: EventType) -> list[str]:
    with sqlite3.connect(running.service.settings.spool_path) as conn:
        return [r for (r,) in conn.execute(
            "SELECT e.recipient FROM webhook_outbox o JOIN events e ON e.id = o.event_id"
            " WHERE e.type = ? ORDER BY e.recipient", (event_type.value,)
        )]


@pytest.mark.parametrize(
    "retention",
    [{}, {"content_days": 0, "metadata_days": 0}],  # expiry is no retention period: it always runs
    ids=["default", "keep_everything"],
)
async def test_sweep_expires_suppressions_with_events_webhooks_and_log_lines(
    start: Any, mx_sink: MxSink, caplog: pytest.LogCaptureFixture, retention: dict[str, Any]
):
    caplog.set_level(logging.INFO, logger="store")
    fast_hooks = {"allow_private_networks": True, "poll_interval": "50ms"}
    running: Running = await start(
        retention={**retention, "batch_size": 1, "batch_pause": 0}, webhooks=fast_hooks
    )
    spool = running.spool
    now = time.time()
    async with WebhookSink() as sink:
        await spool.create_webhook(sink.url, (EventType.SUPPRESSION_DELETED.value,))
        await spool.add_suppressions([
            NewSuppression("soon@example.test", SuppressionReason.COMPLAINT, now + 60),
            NewSuppression("later@example.test", expires_at=now + 3 * DAY),
            NewSuppression("also-soon@example.test", expires_at=now + 90),
            NewSuppression("never@example.test"),
        ])
        blocked = await submit(running, "soon@example.test")
        assert (await spool.get_message(blocked)).status is MessageStatus.SUPPRESSED

        # Before the expiry nothing goes; batches of one row walk past every entry.
        settings = running.service.settings
        assert await RetentionSweeper(spool, settings, lambda: now + 30).sweep() == 0
        assert len(suppression_rows(running)) == 4
        sweeper = RetentionSweeper(spool, settings, lambda: now + 120)
        assert await sweeper.sweep() == 2
        assert suppression_rows(running) == ["later@example.test", "never@example.test"]
        assert await sweeper.sweep() == 0  # gone once: no second event

        deleted = await spool.list_events(EventFilter(type=EventType.SUPPRESSION_DELETED))
        assert sorted((e.recipient, e.data["reason"], e.data["expired"]) for e in deleted) == [
            ("also-soon@example.test", "manual", True),
            ("soon@example.test", "complaint", True),
        ]
        assert {e.data["email"] for e in deleted} == {e.recipient for e in deleted}
        # Each event owes its webhook delivery through the outbox, like every other event (it is
        # due at the sweep's moved-on clock, so the test reads the rows rather than waiting).
        assert outbox_recipients(running, EventType.SUPPRESSION_DELETED) == [
            "also-soon@example.test", "soon@example.test"
        ]

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppression:")]
    assert sorted(line for line in lines if "action=expired" in line) == [
        "suppression: also-soon@example.test reason=manual action=expired",
        "suppression: soon@example.test reason=complaint action=expired",
    ]

    # The address can be mailed again.
    again = await submit(running, "soon@example.test")
    await settled(running, again, MessageStatus.DELIVERED)


async def test_expiry_reads_expired_rows_through_the_index_not_the_whole_list(
    make_settings: Any,
):
    spool = await Spool.open(make_settings())
    now = time.time()
    try:
        # A long list that never expires, three expired entries and one still live.
        await spool.add_suppressions(
            [NewSuppression(f"keep{n}@example.test") for n in range(600)]
            + [NewSuppression(f"gone{n}@example.test", expires_at=now - n - 1) for n in range(3)]
            + [NewSuppression("later@example.test", expires_at=now + 3600)]
        )
        keep_everything = RetentionPolicy(content_before=None, metadata_before=None)
        cursor: SweepCursor | None = SweepCursor()
        batches: list[int] = []
        while cursor is not None:
            step = await spool.sweep(keep_everything, cursor, 2, now)
            batches.append(step.removed)
            cursor = step.next
    finally:
        await spool.close()
    # Two phases that keep everything, then batches of at most two expired rows: the 600
    # entries that never expire cost no batch (a walk over the table took 300).
    assert batches == [0, 0, 2, 1]
    with sqlite3.connect(make_settings().spool_path) as conn:
        left = {e for (e,) in conn.execute("SELECT email FROM suppressions")}
        plan = " ".join(
            row[-1] for row in conn.execute(
                "EXPLAIN QUERY PLAN " + Q["delete_expired_batch"], {"now": now, "limit": 2}
            )
        )
    assert len(left) == 601 and "later@example.test" in left
    assert not any(e.startswith("gone") for e in left)
    assert "suppressions_expires" in plan, plan
