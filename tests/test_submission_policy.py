"""The SMTP front door's policy: never an open relay, limits with the right replies, integrity.

Raw sockets throughout: every byte the client sends is the one the test means.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import types
from typing import Any, cast

import pytest

from relay.submission import (
    Admission,
    Door,
    SubmissionHandler,
    SubmissionSMTP,
    _Prototype,
    enhance_reply,
    is_trusted,
    parse_networks,
    protocol_factory,
)
from store import Scope
from tests.conftest import Running
from tests.support import MxSink, RawSmtp, wait_until

TRUSTED = {"trusted_networks": ["127.0.0.0/8"]}
MESSAGE = b"From: cron@acme.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"

# Every form an open-relay probe uses; none may be accepted from an unauthenticated client.
RELAY_ADDRESSES = [
    "<victim@example.test>",
    "victim@example.test",
    "< victim@example.test >",
    "<VICTIM@EXAMPLE.TEST>",
    "<victim@Example.Test>",
    "<victim@example.test.>",
    "<victim%example.test@postroom.test>",
    "<victim%example.test>",
    "<example.test!victim>",
    "<example.test!victim@postroom.test>",
    "<@postroom.test:victim@example.test>",
    "<@a.test,@b.test:victim@example.test>",
    '<"victim@example.test">',
    '<"victim@example.test"@postroom.test>',
    '<"victim%example.test"@postroom.test>',
    "<victim\\@example.test@postroom.test>",
    "<victim@[192.0.2.1]>",
    "<victim@[IPv6:2001:db8::1]>",
    "<victim@[127.0.0.1]>",
    "<victim@localhost>",
    "<victim@postroom.test>",
    "<postmaster>",
    "<victim@example.test> NOTIFY=NEVER",
    "<victim@example.test@>",
]


async def relay_attempt(port: int, rcpt: str, before: list[str], tls: ssl.SSLContext) -> str:
    """The reply to RCPT after the `before` steps; DATA must then find no recipient."""
    async with await RawSmtp.open(port) as client:
        await client.command("EHLO probe.test")
        for step in before:
            if step == "STARTTLS":
                await client.command("STARTTLS")
                await client.start_tls(tls)
                await client.command("EHLO probe.test")
            else:
                await client.command(step)
        await client.command("MAIL FROM:<spammer@evil.test>")
        reply = await client.command(f"RCPT TO:{rcpt}")
        data = await client.command("DATA")
        assert data.startswith("503"), (rcpt, before, data)
        return reply


async def test_no_address_form_relays_without_auth(postroom: Running, client_tls):
    bad_plain = base64.b64encode(b"\0x\0pr_bad").decode()
    cases = [(rcpt, []) for rcpt in RELAY_ADDRESSES] + [
        ("<victim@example.test>", ["RSET"]),
        ("<victim@example.test>", ["MAIL FROM:<a@acme.test>", "RSET"]),
        ("<victim@example.test>", ["STARTTLS"]),
        ("<victim@example.test>", ["STARTTLS", f"AUTH PLAIN {bad_plain}"]),
        ("<victim@example.test>", [f"AUTH PLAIN {bad_plain}"]),  # refused before TLS: 538
        ("<victim@example.test>", ["STARTTLS", "AUTH LOGIN", "*"]),  # an aborted AUTH
        ("<victim@example.test>", ["HELO probe.test"]),
    ]
    assert len(cases) >= 20
    refused = []
    for rcpt, before in cases:
        reply = await relay_attempt(postroom.smtp_port, rcpt, before, client_tls)
        refused.append((rcpt, before, reply[:9]))
    assert {r[2] for r in refused} <= {"530 5.7.0", "550 5.7.1"}, refused
    assert await postroom.spool.list_messages() == []


async def test_trusted_network_may_relay(start, mx_sink: MxSink):
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO cron.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        assert (await client.command("RCPT TO:<user@example.test>")).startswith("250 2.1.5")
        await client.command("DATA")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0 Ok: queued as")
    [received] = await mx_sink.wait_for_messages(1)
    assert b"with ESMTP\r\n" in received.data  # no TLS, no AUTH


async def test_a_null_sender_message_is_accepted_and_relayed_with_a_null_sender(
    start, mx_sink: MxSink
):
    """Bounces and other automatic replies use the null reverse-path `<>` (RFC 5321 §4.5.5)."""
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO cron.test")
        assert (await client.command("MAIL FROM:<>")).startswith("250 2.1.0")
        assert (await client.command("RCPT TO:<user@example.test>")).startswith("250 2.1.5")
        await client.command("DATA")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0 Ok: queued as")
    [received] = await mx_sink.wait_for_messages(1)
    assert received.mail_from in ("", "<>")
    [message] = await postroom.spool.list_messages()
    assert message.mail_from == ""


@pytest.mark.parametrize(
    ("networks", "peer", "trusted"),
    [
        (["10.0.0.0/8"], ("10.1.2.3", 25), True),
        (["10.0.0.0/8"], ("::ffff:10.1.2.3", 25, 0, 0), True),
        (["::ffff:10.0.0.0/104"], ("10.1.2.3", 25), True),
        (["::ffff:10.0.0.0/104"], ("::ffff:10.1.2.3", 25, 0, 0), True),
        (["::ffff:10.0.0.0/104"], ("11.1.2.3", 25), False),
        (["2001:db8::/32"], ("2001:db8::1", 25, 0, 0), True),
        (["2001:db8::/32"], ("2001:db9::1", 25, 0, 0), False),
        (["fe80::/10"], ("fe80::1%eth0", 25, 0, 2), True),
        (["10.0.0.0/8"], ("192.0.2.1", 25), False),
        ([], ("127.0.0.1", 25), False),
        (["0.0.0.0/0"], "not a peer", False),
    ],
)
def test_trusted_networks(networks: list[str], peer: object, trusted: bool):
    assert is_trusted(peer, parse_networks(networks)) is trusted


# -- limits ---------------------------------------------------------------------------------------


async def test_declared_size_over_the_limit_is_refused_at_mail(start):
    postroom = await start(smtp={**TRUSTED, "max_message_size": 2000})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        reply = await client.command("MAIL FROM:<cron@acme.test> SIZE=2001")
        assert reply.startswith("552 5.3.4")
        assert (await client.command("MAIL FROM:<cron@acme.test> SIZE=1500")).startswith("250")


async def test_oversized_data_is_552_and_the_session_goes_on(start):
    postroom = await start(smtp={**TRUSTED, "max_message_size": 2000})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        reply = await client.command(MESSAGE + (b"x" * 70 + b"\r\n") * 40 + b".")
        assert reply.startswith("552 5.3.4")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0")
    assert len(await postroom.spool.list_messages()) == 1


async def test_too_many_recipients_is_452(start):
    postroom = await start(smtp={**TRUSTED, "max_recipients": 2})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        replies = [await client.command(f"RCPT TO:<u{n}@example.test>") for n in range(3)]
        assert [r[:9] for r in replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3"]


async def test_lines_longer_than_rfc_5321_allows_are_500(start):
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        assert (await client.command("NOOP " + "x" * 1200)).startswith("500 5.5.2")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        reply = await client.command(MESSAGE + b"y" * 1100 + b"\r\n.")
        assert reply.startswith("500 5.5.2")
        assert (await client.command("NOOP")).startswith("250 2.0.0")
    assert await postroom.spool.list_messages() == []


async def test_a_new_session_leaves_the_line_limits_of_open_ones_alone(start):
    # EHLO raises the MAIL line limit by what SIZE= and SMTPUTF8 add (512 + 36); aiosmtpd keeps
    # the limits in one dict of its class, which every new connection used to reset.
    postroom = await start(smtp=TRUSTED)
    long_mail = "MAIL FROM:<cron@acme.test> SIZE=100 SMTPUTF8 " + "x" * 490
    assert 512 < len(long_mail) <= 548
    async with await RawSmtp.open(postroom.smtp_port) as first:
        await first.command("EHLO first.test")
        async with await RawSmtp.open(postroom.smtp_port) as second:  # greeted: a session
            reply = await first.command(long_mail)
            assert not reply.startswith("500"), reply
            assert (await second.command(long_mail)).startswith("500 5.5.2")  # no EHLO yet
            assert (await second.command("EHLO second.test")).startswith("250")
            assert (await second.command(long_mail + "x" * 40)).startswith("500 5.5.2")


def _shape(session: SubmissionSMTP, handler: SubmissionHandler) -> dict[str, object]:
    """A session's attributes, with its bound methods as (function, owner) and what every
    session must have its own of (futures, streams, buffers) as its type."""

    def shape(value: object) -> object:
        if isinstance(value, types.MethodType):
            owner = {id(session): "session", id(handler): "handler"}.get(id(value.__self__))
            return (value.__func__, owner)
        if isinstance(value, dict) and not isinstance(value, collections.defaultdict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return (type(value), *map(shape, value))
        if value is None or value is handler or isinstance(
            value, (bool, int, float, str, types.FunctionType, asyncio.AbstractEventLoop,
                    Admission)
        ):
            return value
        return type(value)

    return {name: shape(value) for name, value in vars(session).items()}


async def test_sessions_after_the_first_are_built_as_aiosmtpd_builds_them(make_settings):
    # Only the first session of a kind runs aiosmtpd's introspecting __init__; the next ones
    # copy it (relay/submission.py `_Prototype`). They must come out the same, bound to
    # themselves, or a later aiosmtpd must make every session go the long way.
    handler = SubmissionHandler(cast(Door, None), make_settings())
    factory = protocol_factory(handler, None, is_implicit_tls=False)
    admission = Admission(client="127.0.0.1", is_trusted=True)
    first, second = (cast(Any, factory())._make_session(admission) for _ in range(2))
    assert [type(p) for p in handler.prototypes.values()] == [_Prototype]
    assert _shape(second, handler) == _shape(first, handler)
    assert second._smtp_methods["MAIL"] == second.smtp_MAIL
    assert second._auth_methods["PLAIN"].method == handler.auth_PLAIN
    assert second.command_size_limits is not first.command_size_limits


async def test_sessions_per_ip_and_in_all_are_limited(start):
    postroom = await start(smtp={"max_sessions": 3, "max_sessions_per_ip": 2,
                                 "trusted_networks": ["127.0.0.3/32"]})
    port = postroom.smtp_port
    first = await RawSmtp.open(port, source="127.0.0.1")
    second = await RawSmtp.open(port, source="127.0.0.1")
    async with await RawSmtp.open(port, source="127.0.0.1") as third:
        assert third.greeting.startswith("421 4.7.0")
        assert await third.is_closed_by_server()
    # Another address has its own count; the total still holds.
    async with await RawSmtp.open(port, source="127.0.0.2") as other:
        assert other.greeting.startswith("220 ")
        async with await RawSmtp.open(port, source="127.0.0.3") as trusted:
            assert trusted.greeting.startswith("421 4.7.0"), "over max_sessions"
    await first.command("QUIT")
    await first.close()

    async def admitted() -> bool:
        async with await RawSmtp.open(port, source="127.0.0.1") as again:
            return again.greeting.startswith("220 ")

    await wait_until(admitted, message="a freed session slot was not reused")
    await second.close()


async def test_trusted_networks_skip_the_per_ip_limit(start):
    postroom = await start(smtp={**TRUSTED, "max_sessions_per_ip": 1})
    clients = [await RawSmtp.open(postroom.smtp_port) for _ in range(3)]
    assert all(c.greeting.startswith("220 ") for c in clients)
    for client in clients:
        await client.close()


async def test_idle_and_total_session_timeouts(start):
    postroom = await start(smtp={"timeout": "0.3s", "session_timeout": "60s"})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        assert (await client.reply(timeout=10)).startswith("421 4.4.2 Idle timeout")
        assert await client.is_closed_by_server()

    postroom = await start(smtp={"timeout": "60s", "session_timeout": "0.5s"})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        assert (await client.command("EHLO client.test")).startswith("250")
        # Nothing more is sent: a command in flight when the server closes would draw a reset.
        assert (await client.reply(timeout=10)).startswith("421 4.4.2")
        assert await client.is_closed_by_server()


@pytest.mark.parametrize(
    ("reply", "enhanced"),
    [
        ("552 Error: Too much mail data", "552 5.3.4 Message too big"),
        ("500 Command line too long", "500 5.5.2 Line too long"),
        ("503 Error: need RCPT command", "503 5.5.1 need RCPT command"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("500 Error: command \"X\" not recognized", "500 5.5.2 command \"X\" not recognized"),
        ("421 Try later", "421 4.0.0 Try later"),
        ("530 5.7.0 Authentication required", "530 5.7.0 Authentication required"),
        ("250 OK", "250 2.0.0 Ok"),
        ("250-SIZE 1000", "250-SIZE 1000"),
        ("250 HELP", "250 HELP"),
        ("252 Cannot VRFY user, but will accept message and attempt delivery",
         "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
        ("250 Supported commands: AUTH DATA", "214 2.0.0 Supported commands: AUTH DATA"),
        ("250 Syntax: MAIL FROM: <address>", "214 2.0.0 Syntax: MAIL FROM: <address>"),
        ("220 postroom.test Postroom ESMTP", "220 postroom.test Postroom ESMTP"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ],
)
def test_replies_carry_enhanced_status_codes(reply: str, enhanced: str):
    assert enhance_reply(reply) == enhanced


# -- integrity ------------------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")


@pytest.mark.parametrize(
    "separator",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\r\n.\r\r\n", b"\r\n.\n", b"\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CR.CR", "CRLF.CR", "CRCRLF.CRCRLF", "CRLF.LF", "LF.CR"],
)
async def test_smtp_smuggling_yields_exactly_one_message(start, mx_sink: MxSink, separator):
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        # Everything in one write, as a smuggling client pipelines it.
        await client.send(
            b"MAIL FROM:<cron@acme.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
            + MESSAGE + b"before" + separator + SMUGGLED + b".\r\nQUIT\r\n"
        )
        replies = [await client.reply() for _ in range(5)]
        assert [r[:3] for r in replies] == ["250", "250", "354", "250", "221"], replies
        assert await client.is_closed_by_server()
    assert len(await postroom.spool.list_messages()) == 1
    [received] = await mx_sink.wait_for_messages(1)
    assert received.rcpt_tos == ["user@example.test"]
    assert b"MAIL FROM:<evil@evil.test>" in received.data  # in the body, where it was sent
    assert b"\n" not in received.data.replace(b"\r\n", b"")
    assert b"\r" not in received.data.replace(b"\r\n", b"")


async def test_commands_pipelined_with_starttls_are_discarded(start, client_tls):
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.send(b"STARTTLS\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<v@example.test>\r\n")
        assert (await client.reply()).startswith("220 2.0.0")
        await client.start_tls(client_tls)
        # Had the injected commands run, their replies would come first.
        assert (await client.command("EHLO client.test")).startswith("250-postroom.test")
        assert (await client.command("RCPT TO:<v@example.test>")).startswith("503")
        assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("250 2.1.0")


@pytest.mark.parametrize(
    "line",
    [b"EHLO evil.test\rX-Injected: yes", b"HELO evil.test\rX-Injected: yes",
     b"EHLO evil\x00.test", b"EHLO evil\x7f.test", b"EHLO evil\x1b[31m.test",
     b"EHLO evil\xff.test", b"EHLO evil\tspace.test"],
    ids=["EHLO-CR", "HELO-CR", "NUL", "DEL", "ESC", "not-UTF-8", "TAB"],
)
async def test_ehlo_names_with_control_characters_are_refused(
    start, mx_sink: MxSink, line: bytes
):
    postroom = await start(smtp=TRUSTED)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        assert (await client.command(line)).startswith("501 5.5.4")
        assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("503")
        await client.command("EHLO earlier.test")
        assert (await client.command(line)).startswith("501 5.5.4")
        assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("503")
        await client.command("EHLO good.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0")
    [received] = await mx_sink.wait_for_messages(1)
    assert received.data.startswith(b"Received: from good.test ([127.0.0.1])\r\n")
    assert b"X-Injected" not in received.data and b"evil" not in received.data


async def test_message_id_and_date_are_added_only_when_missing(start, mx_sink: MxSink):
    postroom = await start(smtp=TRUSTED)
    with_both = (b"Message-ID: <own@acme.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
                 + MESSAGE)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        for content in (MESSAGE, with_both):
            await client.command("MAIL FROM:<cron@acme.test>")
            await client.command("RCPT TO:<user@example.test>")
            await client.command("DATA")
            assert (await client.command(content + b".")).startswith("250 2.0.0")
    bare, own = await mx_sink.wait_for_messages(2)
    if b"<own@acme.test>" in bare.data:
        bare, own = own, bare
    bare_head = bare.data.split(b"\r\n\r\n", 1)[0]
    assert bare_head.count(b"\r\nMessage-ID: <") == 1 and b"@postroom.test>" in bare_head
    assert bare_head.count(b"\r\nDate: ") == 1
    own_head = own.data.split(b"\r\n\r\n", 1)[0]
    assert own_head.count(b"Message-ID:") == 1 and own_head.count(b"Date:") == 1


# -- sender authorisation -------------------------------------------------------------------------


async def authenticated(port: int, tls: ssl.SSLContext, key: str) -> RawSmtp:
    """A session after STARTTLS and AUTH PLAIN with `key` (close it)."""
    client = await RawSmtp.open(port)
    await client.command("EHLO client.test")
    await client.command("STARTTLS")
    await client.start_tls(tls)
    await client.command("EHLO client.test")
    plain = base64.b64encode(f"\0anyone\0{key}".encode()).decode()
    assert (await client.command(f"AUTH PLAIN {plain}")).startswith("235 2.7.0")
    return client


async def send_headers(client: RawSmtp, headers: bytes) -> str:
    """One transaction from app@acme.test whose message has `headers`; the reply to its end."""
    assert (await client.command("MAIL FROM:<app@acme.test>")).startswith("250")
    assert (await client.command("RCPT TO:<user@example.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    return await client.command(headers + b"Subject: s\r\n\r\nbody\r\n.")


@pytest.mark.parametrize(
    "forged",
    [
        b"From: app@acme.test\r\nSender: ceo@other.test\r\n",
        b"From: app@acme.test\r\nSender: Boss <ceo@Other.Test>\r\n",
        b"From: app@acme.test\r\nSender: ops@acme.test\r\nSender: ceo@other.test\r\n",
        b"From: app@acme.test\r\nFrom: ceo@other.test\r\n",
    ],
    ids=["sender", "sender-display-name", "second-sender", "second-from"],
)
async def test_sender_header_outside_the_keys_domains_is_refused(
    postroom: Running, client_tls, forged: bytes
):
    new = await postroom.spool.create_key("acme only", Scope.SEND, ["acme.test"])
    client = await authenticated(postroom.smtp_port, client_tls, new.secret)
    async with client:
        reply = await send_headers(client, forged)
        assert reply.startswith("550 5.7.1 this API key may not send from other.test"), reply
        assert await postroom.spool.list_messages() == []
        # The session goes on: a Sender: inside the key's domains is fine.
        reply = await send_headers(client, b"From: app@acme.test\r\nSender: ops@acme.test\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as msg_"), reply
    assert len(await postroom.spool.list_messages()) == 1
