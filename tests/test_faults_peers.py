"""Hostile and broken MX hosts: their mail is deferred, never lost, and healthy mail keeps flowing.

Each hostile MX listens on its own loopback address (127.0.0.2-5) on the port `delivery.mx_port`
names, where the healthy sink listens on 127.0.0.1; the DNS server points one domain at each.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from store import EventType, RecipientStatus
from tests.conftest import Running
from tests.support import DnsServer, MxSink, wait_until
from tests.support.hostile_mx import Behaviour, HostileMx

HOSTILE = {
    Behaviour.SILENT: ("silent.test", "127.0.0.2"),
    Behaviour.STALL: ("stall.test", "127.0.0.3"),
    Behaviour.DROP: ("drop.test", "127.0.0.4"),
    Behaviour.GARBAGE: ("garbage.test", "127.0.0.5"),
}
# Short enough to keep the test quick, long enough for healthy mail to pass the hanging ones.
TIMEOUT = "5s"


@pytest.fixture
async def hostile(dns: DnsServer, mx_sink: MxSink) -> AsyncIterator[dict[Behaviour, HostileMx]]:
    async with AsyncExitStack() as stack:
        servers = {}
        for behaviour, (domain, ip) in HOSTILE.items():
            dns.add_mx(domain, f"mx.{domain}")
            dns.add_a(f"mx.{domain}", ip)
            servers[behaviour] = await stack.enter_async_context(
                HostileMx(behaviour, ip, mx_sink.port)
            )
        yield servers


def mail(to: str, subject: str) -> dict[str, Any]:
    return {"from": "app@acme.test", "to": to, "subject": subject, "text": "hello"}


async def test_hostile_mx_hosts_defer_while_healthy_mail_flows(
    start: Callable[..., Any], mx_sink: MxSink, hostile: dict[Behaviour, HostileMx],
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    postroom: Running = await start(delivery={
        "connect_timeout": TIMEOUT, "command_timeout": TIMEOUT, "data_timeout": TIMEOUT,
        "retry_schedule": ["1h"],  # one attempt each within the test
    })
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        ids = {}
        for behaviour, (domain, _) in HOSTILE.items():
            response = await http.post("/v1/messages", json=mail(f"user@{domain}", domain))
            assert response.status_code == 202
            ids[behaviour] = response.json()["id"]
        silent, stall = hostile[Behaviour.SILENT], hostile[Behaviour.STALL]
        await wait_until(lambda: silent.hanging and stall.hanging,
                         message="the silent and stalling MX hosts were never reached")

        for i in range(10):
            response = await http.post("/v1/messages", json=mail(f"u{i}@example.test", f"ok {i}"))
            assert response.status_code == 202
        received = await mx_sink.wait_for_messages(10)
        # Healthy mail got through while both hostile attempts were still hanging.
        assert silent.hanging and stall.hanging
        assert len(received) == 10

    async def all_deferred() -> bool:
        for message_id in ids.values():
            message = await postroom.spool.get_message(message_id)
            if message.recipients[0].status is not RecipientStatus.DEFERRED:
                return False
        return True

    await wait_until(all_deferred, timeout=20, message="hostile mail was not deferred")
    for behaviour, message_id in ids.items():
        message = await postroom.spool.get_message(message_id)
        [rcpt] = message.recipients
        assert rcpt.status is RecipientStatus.DEFERRED, behaviour
        assert rcpt.last_reply is not None and rcpt.last_reply.code == 451, behaviour
        assert [e.type for e in message.events] == [
            EventType.EMAIL_QUEUED, EventType.EMAIL_DEFERRED
        ], behaviour
    assert hostile[Behaviour.DROP].dots == 1 and hostile[Behaviour.STALL].dots == 1
    assert all(server.connections >= 1 for server in hostile.values())
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_an_attempt_past_attempt_timeout_is_cut_short_and_deferred(
    start: Callable[..., Any], hostile: dict[Behaviour, HostileMx]
):
    """`delivery.attempt_timeout` bounds the whole attempt, whatever the per-command timeouts
    allow: an MX that stalls after DATA is cut off and the recipient deferred with 4.4.7."""
    postroom: Running = await start(delivery={
        "command_timeout": "1m", "data_timeout": "1m", "attempt_timeout": "2s",
        "retry_schedule": ["1h"],
    })
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json=mail("user@stall.test", "stall"))
    assert response.status_code == 202
    message_id = response.json()["id"]

    async def deferred() -> bool:
        message = await postroom.spool.get_message(message_id)
        return message.recipients[0].status is RecipientStatus.DEFERRED

    await wait_until(deferred, timeout=15, message="the stalled attempt was not cut short")
    [rcpt] = (await postroom.spool.get_message(message_id)).recipients
    assert rcpt.last_reply is not None
    assert (rcpt.last_reply.code, rcpt.last_reply.enhanced) == (451, "4.4.7")
    assert "timed out" in rcpt.last_reply.text
    assert hostile[Behaviour.STALL].dots == 1
