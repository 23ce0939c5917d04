"""Connection reuse per destination host: sessions kept open, closed when idle or stale."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from store import RecipientStatus, Source, Submission
from tests.conftest import Running
from tests.support import MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def submit(postroom: Running, *recipients: str) -> str:
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", recipients, CONTENT, Source.API)
    )
    return accepted.id


async def delivered(postroom: Running, message_id: str) -> int:
    """Wait until the message is delivered; its recipient's attempts."""

    async def check() -> int | None:
        message = await postroom.spool.get_message(message_id)
        [rcpt] = message.recipients
        assert rcpt.status not in (RecipientStatus.DEFERRED, RecipientStatus.BOUNCED), rcpt
        return rcpt.attempts if rcpt.status is RecipientStatus.DELIVERED else None

    attempts: int = await wait_until(check, message=f"{message_id} was not delivered")
    return attempts


async def test_fifty_messages_go_over_a_few_connections(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"connection_idle_timeout": "60s"})
    for i in range(50):
        await submit(postroom, f"user{i}@example.test")
    await mx_sink.wait_for_messages(50)
    assert len(mx_sink.messages) == 50
    # Never more sessions than attempts may run at once for the destination (10 by default).
    assert 1 <= mx_sink.sessions_total <= 10


async def test_reuse_limit_of_one_means_a_connection_per_message(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"connection_reuse_limit": 1})
    for i in range(5):
        assert await delivered(postroom, await submit(postroom, f"user{i}@example.test")) == 1
    assert mx_sink.sessions_total == 5


async def test_an_idle_connection_is_closed(start: Callable[..., Any], mx_sink: MxSink):
    postroom = await start(delivery={"connection_idle_timeout": "0.2s"})
    await delivered(postroom, await submit(postroom, "user@example.test"))
    await wait_until(lambda: mx_sink.active_sessions == 0, message="the session stayed open")


async def test_a_connection_the_server_closed_is_replaced(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"connection_idle_timeout": "60s"})
    assert await delivered(postroom, await submit(postroom, "a@example.test")) == 1
    await wait_until(lambda: mx_sink.active_sessions == 1, message="no session kept open")
    mx_sink.drop_sessions()
    await wait_until(lambda: mx_sink.active_sessions == 0, message="the session was not dropped")
    # Not a deferral: the next message goes over a new session at its first attempt.
    assert await delivered(postroom, await submit(postroom, "b@example.test")) == 1
    assert mx_sink.sessions_total == 2


async def test_a_421_on_a_reused_connection_opens_a_new_one(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"connection_idle_timeout": "60s"})
    assert await delivered(postroom, await submit(postroom, "a@example.test")) == 1
    mx_sink.script_mail("421 4.3.2 Closing idle connection")
    assert await delivered(postroom, await submit(postroom, "b@example.test")) == 1
    assert mx_sink.sessions_total == 2
    assert [m.rcpt_tos for m in mx_sink.messages] == [["a@example.test"], ["b@example.test"]]


async def test_a_refused_transaction_is_reset_before_reuse(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"connection_idle_timeout": "60s"})
    mx_sink.script_rcpt("gone@example.test", "550 5.1.1 No such user")
    gone = await submit(postroom, "gone@example.test")

    async def bounced() -> bool:
        message = await postroom.spool.get_message(gone)
        return message.recipients[0].status is RecipientStatus.BOUNCED

    await wait_until(bounced, message="not bounced")
    assert await delivered(postroom, await submit(postroom, "ok@example.test")) == 1
    assert mx_sink.sessions_total == 1
    [received] = mx_sink.messages
    assert received.rcpt_tos == ["ok@example.test"]


async def test_stop_closes_the_cached_connections(start: Callable[..., Any], mx_sink: MxSink):
    postroom = await start(delivery={"connection_idle_timeout": "60s"})
    await delivered(postroom, await submit(postroom, "user@example.test"))
    await wait_until(lambda: mx_sink.active_sessions == 1, message="no session kept open")
    await asyncio.wait_for(postroom.stop(), 30)
    await wait_until(lambda: mx_sink.active_sessions == 0, message="the session stayed open")
