"""Clients that hang up at the worst moment: the message is stored once or not at all, quietly.

An SMTP client that disconnects right after the final dot may or may not have its message stored
(the commit may already be under way: at-least-once, RFC 1047), but never twice; an HTTP client
that disconnects mid-request stores nothing. Neither leaves a traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Running
from tests.support import MxSink, RawSmtp, wait_until

TRUSTED = {"trusted_networks": ["127.0.0.0/8"]}


def reset_on_close(client: RawSmtp | asyncio.StreamWriter) -> None:
    """Make the next close an RST, as a crashing client's kernel sends."""
    writer = client.writer if isinstance(client, RawSmtp) else client
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def settled(postroom: Running, key: str) -> int:
    """The number of messages stored, once nothing queued earlier can still commit.

    The writer commits in order, so after a later acknowledged send every job a dropped client
    started has committed or never existed; that send itself is not counted.
    """
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "marker@example.test", "subject": "marker",
            "text": "marker",
        })
        assert response.status_code == 202
    return len(await postroom.spool.list_messages(limit=1000)) - 1


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("hangup", ["close", "reset"])
async def test_smtp_client_gone_right_after_the_final_dot(
    start: Callable[..., Any], mx_sink: MxSink, caplog: pytest.LogCaptureFixture, hangup: str
):
    postroom: Running = await start(smtp=TRUSTED)
    key = await postroom.new_key()
    sessions = postroom.service.sessions
    assert sessions is not None
    drops = 5
    for i in range(drops):
        client = await RawSmtp.open(postroom.smtp_port)
        for line in ("EHLO client.test", "MAIL FROM:<app@acme.test>",
                     f"RCPT TO:<drop{i}@example.test>", "DATA"):
            assert (await client.command(line))[:1] in ("2", "3")
        await client.send(f"Subject: drop {i}\r\n\r\nbye\r\n.\r\n".encode())
        if hangup == "reset":
            reset_on_close(client)
        await client.close()
    await wait_until(lambda: len(sessions) == 0, message="the dropped sessions did not end")
    stored = await settled(postroom, key)
    assert 0 <= stored <= drops
    received = await mx_sink.wait_for_messages(stored + 1)
    subjects = [r.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for r in received]
    assert len(subjects) == len(set(subjects)), "a dropped message was stored twice"
    messages = await postroom.spool.list_messages(limit=1000)
    assert len({m.subject for m in messages}) == len(messages)
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("cut", ["headers", "half body", "whole body"])
async def test_http_client_gone_mid_request(
    postroom: Running, caplog: pytest.LogCaptureFixture, cut: str
):
    key = await postroom.new_key()
    host, port = postroom.service.api_address or ("", 0)
    body = (
        b'{"from": "app@acme.test", "to": "user@example.test", "subject": "cut", '
        b'"text": "' + b"x" * 20_000 + b'"}'
    )
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sent = {"headers": head[: len(head) // 2], "half body": head + body[: len(body) // 2],
            "whole body": head + body}[cut]
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(sent)
    await writer.drain()
    reset_on_close(writer)
    writer.close()
    await writer.wait_closed()
    stored = await settled(postroom, key)
    # A cut request stores nothing; a whole one that lost its answer stores it at most once.
    if cut != "whole body":
        assert stored == 0
    assert stored <= 1
    assert tracebacks(caplog) == []
