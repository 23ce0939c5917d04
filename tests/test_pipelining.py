"""Delivery with PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, replies read in order.

A scripted MX on raw asyncio streams shows what arrives in each read; the aiosmtpd sink of the
other tests offers PIPELINING too, or not (`MxSink.pipelining`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from store import Message, RecipientStatus, Source, Submission
from tests.conftest import Running
from tests.support import DnsServer, MxSink
from tests.test_delivery import settled as settled_message

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


class ScriptedMx:
    """An MX that offers PIPELINING and answers each batch of commands as scripted.

    `replies` maps a command verb to its reply; `reads` keeps the command lines of each read
    after EHLO, so a test sees which commands came together; `bodies` the message data.
    """

    def __init__(self, host: str, port: int, replies: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.replies = {"MAIL": "250 2.1.0 ok", "RCPT": "250 2.1.5 ok", "DATA": "354 go",
                        **(replies or {})}
        self.reads: list[list[str]] = []
        self.bodies: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedMx:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-scripted.test\r\n250 PIPELINING\r\n")
        while chunk := await reader.read(65536):
            lines = chunk.decode().splitlines()
            self.reads.append(lines)
            answers = []
            for line in lines:
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                answers.append(self.replies.get(verb, "250 ok"))
            writer.write("".join(f"{a}\r\n" for a in answers).encode())
            if answers and answers[-1].startswith("354"):
                body = b""
                while not body.endswith(b"\r\n.\r\n") and body != b".\r\n":
                    body += await reader.readuntil(b"\r\n")
                self.bodies.append(body)
                writer.write(b"250 2.0.0 queued\r\n")


@pytest.fixture
async def scripted(dns: DnsServer, mx_sink: MxSink) -> AsyncIterator[ScriptedMx]:
    dns.add_mx("pipes.test", "mx.pipes.test")
    dns.add_a("mx.pipes.test", "127.0.0.3")
    async with ScriptedMx("127.0.0.3", mx_sink.port) as mx:
        yield mx


async def settled(postroom: Running, *recipients: str) -> Message:
    """Accept CONTENT for `recipients` and wait until every one is final."""
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", recipients, CONTENT, Source.API)
    )
    return await settled_message(postroom, accepted.id)


async def test_mail_rcpt_and_data_go_in_one_write(postroom: Running, scripted: ScriptedMx):
    message = await settled(postroom, "a@pipes.test", "b@pipes.test")
    assert {r.status for r in message.recipients} == {RecipientStatus.DELIVERED}
    first = scripted.reads[0]
    assert first == ["MAIL FROM:<app@acme.test>", "RCPT TO:<a@pipes.test>",
                     "RCPT TO:<b@pipes.test>", "DATA"]
    [body] = scripted.bodies
    assert body.endswith(b"\r\n..leading dot\r\nbody\r\n.\r\n")  # dot-stuffed, then the dot


async def test_each_recipient_gets_its_own_reply(postroom: Running, scripted: ScriptedMx):
    scripted.replies["RCPT"] = "550 5.1.1 no such user"
    message = await settled(postroom, "gone@pipes.test")
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.BOUNCED
    assert rcpt.last_reply is not None and (rcpt.last_reply.code, rcpt.last_reply.enhanced) == (
        550, "5.1.1")
    # The MX said 354 although no recipient was accepted (RFC 2920 §3.1 says it must not):
    # the DATA is ended empty, and nothing of the message is sent.
    assert scripted.bodies == [b".\r\n"]


async def test_a_refused_sender_fails_the_transaction(postroom: Running, scripted: ScriptedMx):
    scripted.replies.update({"MAIL": "550 5.7.1 sender refused", "RCPT": "503 5.5.1 no MAIL",
                             "DATA": "503 5.5.1 no valid recipients"})
    message = await settled(postroom, "a@pipes.test")
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.BOUNCED
    assert rcpt.last_reply is not None and rcpt.last_reply.text == "sender refused"
    assert scripted.bodies == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_partial_acceptance_either_way(postroom: Running, mx_sink: MxSink, pipelining: bool):
    mx_sink.pipelining = pipelining
    mx_sink.script_rcpt("gone@example.test", "550 5.1.1 No such user")
    message = await settled(postroom, "gone@example.test", "ok@example.test")
    by_email = {r.email: r.status for r in message.recipients}
    assert by_email == {"gone@example.test": RecipientStatus.BOUNCED,
                        "ok@example.test": RecipientStatus.DELIVERED}
    [received] = mx_sink.messages
    assert received.rcpt_tos == ["ok@example.test"]
    assert received.data.endswith(b"\r\n.leading dot\r\nbody\r\n")
