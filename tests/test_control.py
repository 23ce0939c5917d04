"""Submission control headers: read, validated and stripped; idempotency shared with the API."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time

import pytest

from relay.control import ControlError, read_controls
from store import MessageType, Priority, RecipientStatus, Scope, Tag
from tests.conftest import Running
from tests.support import MxSink, wait_until

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "check"),
    [
        pytest.param(b"Postroom-Tags: a, campaign=spring\r\n",
                     lambda c: c.tags == (Tag("a"), Tag("campaign", "spring")), id="tags"),
        pytest.param(b"Postroom-Metadata-User-Id: 42\r\n",
                     lambda c: dict(c.metadata) == {"User-Id": "42"}, id="metadata"),
        pytest.param(b"postroom-message-type: Marketing\r\n",
                     lambda c: c.message_type is MessageType.MARKETING, id="type, any case"),
        pytest.param(b"Postroom-Priority: high\r\n",
                     lambda c: c.priority is Priority.HIGH, id="priority"),
        pytest.param(b"Postroom-Scheduled-At: 2030-01-01T00:00:00Z\r\n",
                     lambda c: c.scheduled_at == 1893456000.0, id="scheduled"),
        pytest.param(b"Postroom-Idempotency-Key: order-7\r\n",
                     lambda c: c.idempotency_key == "order-7", id="idempotency key"),
        pytest.param(b"Postroom-Tags: a,\r\n b\r\n",
                     lambda c: c.tags == (Tag("a"), Tag("b")), id="folded"),
    ],
)
def test_control_headers_are_read_and_stripped(header: bytes, check):
    message = b"From: a@acme.test\r\n" + header + b"Subject: s\r\n\r\nPostroom-Tags: body\r\n"
    content, controls = read_controls(message, NOW)
    assert check(controls)
    assert content == b"From: a@acme.test\r\nSubject: s\r\n\r\nPostroom-Tags: body\r\n"


@pytest.mark.parametrize(
    "header",
    [
        b"Postroom-Colour: red",
        b"Postroom-Message-Type: spam",
        b"Postroom-Scheduled-At: yesterday",
        b"Postroom-Scheduled-At: 2001-01-01T00:00:00Z",
        b"Postroom-Scheduled-At: 2030-01-01T00:00:00",
        b"Postroom-Idempotency-Key: has space",
        b"Postroom-Metadata-: x",
    ],
)
def test_bad_control_headers_are_refused(header: bytes):
    with pytest.raises(ControlError):
        read_controls(b"Subject: s\r\n" + header + b"\r\n\r\nbody\r\n", NOW)


def test_messages_without_controls_are_untouched():
    message = b"Subject: s\nFrom: a@b.test\n\nbody\n"
    content, _ = read_controls(message, NOW)
    assert content is message


def smtp_send(port: int, tls: ssl.SSLContext, key: str, message: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=tls)
        client.login("app", key)
        client.mail("app@acme.test")
        client.rcpt("user@example.test")
        code, reply = client.data(message)
        return code, reply.decode()


async def test_control_headers_are_honoured_and_never_delivered(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext
):
    key = await postroom.new_key()
    message = (
        b"From: app@acme.test\r\nSubject: controlled\r\nPostroom-Tags: welcome\r\n"
        b"Postroom-Metadata-User: 42\r\nPostroom-Message-Type: marketing\r\n\r\nHello\r\n"
    )
    code, reply = await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, key, message
    )
    assert code == 250
    [received] = await mx_sink.wait_for_messages(1)
    assert b"Postroom-" not in received.data
    assert b"Subject: controlled\r\n" in received.data
    stored = await postroom.spool.get_message(reply.rsplit(" ", 1)[1])
    queued = stored.events[0]
    assert queued.data["tags"] == ["welcome"]
    assert queued.data["metadata"] == {"User": "42"}


async def test_scheduled_at_over_smtp_holds_the_message(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext
):
    key = await postroom.new_key()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    message = f"Subject: later\r\nPostroom-Scheduled-At: {when}\r\n\r\nHi\r\n".encode()
    code, reply = await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, key, message
    )
    assert code == 250
    stored = await postroom.spool.get_message(reply.rsplit(" ", 1)[1])
    assert stored.recipients[0].status is RecipientStatus.SCHEDULED
    assert [e.type.value for e in stored.events] == ["email.scheduled"]
    assert mx_sink.messages == []


async def test_bad_control_header_is_550_and_nothing_stored(
    postroom: Running, client_tls: ssl.SSLContext
):
    key = await postroom.new_key()
    code, reply = await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, key, b"Postroom-Colour: red\r\n\r\nx\r\n"
    )
    assert code == 550 and reply.startswith("5.6.0")
    assert await postroom.spool.list_messages() == []


async def test_idempotency_key_over_smtp_and_across_doors(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext
):
    key = await postroom.new_key()
    message = b"Subject: once\r\nPostroom-Idempotency-Key: order-1\r\n\r\nHello\r\n"
    first = await asyncio.to_thread(smtp_send, postroom.smtp_port, client_tls, key, message)
    again = await asyncio.to_thread(smtp_send, postroom.smtp_port, client_tls, key, message)
    assert first[0] == again[0] == 250
    assert first[1] == again[1]  # the same queue id: no second message
    changed = message.replace(b"Hello", b"Goodbye")
    code, reply = await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, key, changed
    )
    assert code == 550 and reply.startswith("5.7.0")
    # The API shares the key's namespace: the same key string with another request is refused.
    async with postroom.http(key) as http:
        response = await http.post(
            "/v1/messages",
            headers={"Idempotency-Key": "order-1"},
            json={"from": "app@acme.test", "to": "user@example.test", "subject": "x",
                  "text": "y"},
        )
    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_key_reused"
    await mx_sink.wait_for_messages(1)
    assert len(await postroom.spool.list_messages()) == 1


async def test_sender_domain_restriction_over_smtp(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext
):
    new = await postroom.spool.create_key("acme only", Scope.SEND, ["acme.test"])
    ok = b"From: app@acme.test\r\nSubject: ok\r\n\r\nx\r\n"
    forged = b"From: ceo@other.test\r\nSubject: forged\r\n\r\nx\r\n"
    assert (await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, new.secret, ok))[0] == 250
    code, reply = await asyncio.to_thread(
        smtp_send, postroom.smtp_port, client_tls, new.secret, forged
    )
    assert code == 550 and reply.startswith("5.7.1")
    await wait_until(lambda: len(mx_sink.messages) == 1)
    assert len(await postroom.spool.list_messages()) == 1
