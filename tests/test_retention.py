"""The data lifecycle: retention sweeps with a clock moved on, and store_content = false."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from config import Settings
from relay.retention import DAY, RetentionSweeper, policy_at
from store import EventFilter, MessageStatus, NewSuppression, Source, Submission
from tests.conftest import Running
from tests.support import MxSink, wait_until

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
