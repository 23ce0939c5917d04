"""The delivery engine against a real DNS server and MX sink: outcomes, retries, timelines."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from typing import Any

from relay.dkim import generate_keys
from store import Message, RecipientStatus, Source, Submission
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import DnsServer, MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def submit(postroom: Running, *recipients: str) -> str:
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", recipients, CONTENT, Source.API)
    )
    return accepted.id


async def settled(postroom: Running, message_id: str) -> Message:
    """Wait until every recipient is final, and return the message."""

    async def check() -> Message | None:
        message = await postroom.spool.get_message(message_id)
        return message if all(r.status.is_final for r in message.recipients) else None

    result: Message = await wait_until(check, message=f"{message_id} never settled")
    return result


async def test_temporary_failure_is_retried_then_delivered(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("user@example.test", "451 4.2.0 Mailbox busy, try later")
    message_id = await submit(postroom, "user@example.test")
    message = await settled(postroom, message_id)
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.DELIVERED
    assert rcpt.attempts == 2
    assert [e.type.value for e in message.events] == [
        "email.queued", "email.deferred", "email.delivered",
    ]
    deferred = message.events[1]
    assert deferred.data["reply"] == {"code": 451, "enhanced": "4.2.0",
                                      "text": "Mailbox busy, try later"}
    assert "next_attempt_at" in deferred.data
    assert len(mx_sink.messages) == 1


async def test_permanent_failure_bounces_at_once(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("gone@example.test", "550 5.1.1 No such user")
    message_id = await submit(postroom, "gone@example.test", "ok@example.test")
    message = await settled(postroom, message_id)
    by_email = {r.email: r for r in message.recipients}
    assert by_email["gone@example.test"].status is RecipientStatus.BOUNCED
    assert by_email["gone@example.test"].attempts == 1
    reply = by_email["gone@example.test"].last_reply
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")
    # Partial acceptance: the other recipient of the same transaction is delivered.
    assert by_email["ok@example.test"].status is RecipientStatus.DELIVERED
    assert message.status.value == "partially_delivered"
    [received] = mx_sink.messages
    assert received.rcpt_tos == ["ok@example.test"]


async def test_data_refusal_applies_to_every_accepted_recipient(
    postroom: Running, mx_sink: MxSink
):
    mx_sink.script_data("554 5.7.1 Message rejected as spam")
    message_id = await submit(postroom, "a@example.test", "b@example.test")
    message = await settled(postroom, message_id)
    assert {r.status for r in message.recipients} == {RecipientStatus.BOUNCED}
    assert message.status.value == "bounced"


async def test_retries_exhausted_bounce(postroom: Running, mx_sink: MxSink):
    # The schedule in the tests has two steps: the third temporary failure bounces.
    mx_sink.script_rcpt("busy@example.test", *["452 4.2.2 Mailbox full"] * 3)
    message_id = await submit(postroom, "busy@example.test")
    message = await settled(postroom, message_id)
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.BOUNCED
    assert rcpt.attempts == 3
    assert [e.type.value for e in message.events] == [
        "email.queued", "email.deferred", "email.deferred", "email.bounced",
    ]
    assert message.events[-1].data["reason"] == "retries exhausted"
    assert mx_sink.messages == []


async def test_unknown_domain_bounces_without_connecting(postroom: Running, mx_sink: MxSink):
    message_id = await submit(postroom, "someone@no-such-domain.test")
    message = await settled(postroom, message_id)
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.BOUNCED
    assert rcpt.last_reply is not None and rcpt.last_reply.enhanced == "5.1.2"
    assert mx_sink.sessions_total == 0


async def test_dns_failure_defers(postroom: Running, dns: DnsServer, mx_sink: MxSink):
    dns.set_servfail("broken.test")
    message_id = await submit(postroom, "someone@broken.test")

    async def deferred() -> bool:
        message = await postroom.spool.get_message(message_id)
        return message.recipients[0].status is RecipientStatus.DEFERRED

    await wait_until(deferred, message="never deferred")
    message = await postroom.spool.get_message(message_id)
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "4.4.3"
    assert message.recipients[0].next_attempt_at is not None


async def test_implicit_mx_on_a_record(postroom: Running, dns: DnsServer, mx_sink: MxSink):
    dns.add_a("bare.test", "127.0.0.1")
    message_id = await submit(postroom, "user@bare.test")
    message = await settled(postroom, message_id)
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert message.events[-1].data["mx"] == "bare.test"


async def test_recipients_of_several_domains_are_separate_transactions(
    postroom: Running, dns: DnsServer, mx_sink: MxSink
):
    dns.add_mx("other.test", "mx.example.test")
    message_id = await submit(postroom, "a@example.test", "b@other.test")
    message = await settled(postroom, message_id)
    assert message.status.value == "delivered"
    assert sorted(r.rcpt_tos[0] for r in mx_sink.messages) == ["a@example.test", "b@other.test"]


# -- units Postroom cannot try: failed, not retried ------------------------------------------


async def test_a_pending_unit_whose_body_is_gone_fails(start: Any, mx_sink: MxSink):
    postroom: Running = await start(delivery={"retry_schedule": ["1h"]})
    mx_sink.script_rcpt("user@example.test", "451 4.2.0 Mailbox busy, try later")
    message_id = await submit(postroom, "user@example.test")
    await wait_until(
        lambda: status_of(postroom, message_id, RecipientStatus.DEFERRED), message="not deferred"
    )
    # The body goes while the recipient waits (what a retention sweep does to a finished
    # message; here a damaged or carelessly restored spool), then the retry comes.
    with sqlite3.connect(postroom.service.settings.spool_path, timeout=10) as conn:
        conn.execute(
            "UPDATE messages SET body = X'', content_removed_at = ? WHERE id = ?",
            (time.time(), message_id),
        )
    assert await postroom.spool.retry(message_id=message_id) == 1
    message = await settled(postroom, message_id)
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.FAILED and rcpt.attempts == 2
    assert [e.type.value for e in message.events] == [
        "email.queued", "email.deferred", "email.failed",
    ]
    assert message.events[-1].data["reason"] == "the stored message body is gone"
    assert mx_sink.messages == [] and mx_sink.sessions_total == 1  # nothing empty was sent

    async with postroom.http(await postroom.new_key()) as client:
        shown = (await client.get(f"/v1/messages/{message_id}")).json()
    assert shown["status"] == "failed"
    assert shown["recipients"][0]["status"] == "failed"
    assert shown["events"][-1]["type"] == "email.failed"
    assert shown["events"][-1]["data"]["reason"] == "the stored message body is gone"


@WITH_AND_WITHOUT_WORKERS  # with workers, a worker signs (and fails to)
async def test_a_domain_whose_dkim_key_cannot_sign_fails_at_once(
    postroom: Running, mx_sink: MxSink
):
    broken = dataclasses.replace(
        generate_keys("acme.test", "s1", False, time.time()), rsa_key=b"not a key"
    )
    await postroom.spool.add_domain(broken)
    message = await settled(postroom, await submit(postroom, "user@example.test"))
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.FAILED and rcpt.attempts == 1
    assert rcpt.last_reply is not None and rcpt.last_reply.enhanced == "5.3.0"
    assert message.status.value == "failed"
    assert [e.type.value for e in message.events] == ["email.queued", "email.failed"]
    assert message.events[-1].data["reason"].startswith("cannot sign for acme.test")
    assert "not a key" not in message.events[-1].data["reason"]
    assert mx_sink.sessions_total == 0  # never sent unsigned
    assert await postroom.spool.suppression("user@example.test") is None


async def status_of(postroom: Running, message_id: str, status: RecipientStatus) -> bool:
    message = await postroom.spool.get_message(message_id)
    return message.recipients[0].status is status
