"""Proves the tests/support servers work with real clients (dnspython, aiosmtplib, httpx)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator, Iterator

import aiosmtplib
import dns.asyncresolver
import dns.message
import dns.name
import dns.resolver
import httpx
import pytest
import trustme

from tests.support import DnsServer, MxSink, WebhookSink, wait_until

# -- DNS ----------------------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def resolver(dns_server: DnsServer) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    res.port = dns_server.port  # before `nameservers`: each nameserver captures the port
    res.nameservers = ["127.0.0.1"]
    res.lifetime = 3
    return res


async def test_dns_mx_a_aaaa_case_and_trailing_dot(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_mx("Example.TEST.", "mx2.example.test", preference=20)
    dns_server.add_mx("example.test", "MX1.example.test.", preference=10, ttl=300)
    dns_server.add_a("mx1.example.test", "127.0.0.1")
    dns_server.add_aaaa("mx1.example.test", "::1")

    mx = await resolver.resolve("EXAMPLE.test.", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "MX1.example.test."),  # like real DNS, the case of rdata names is preserved
        (20, "mx2.example.test."),
    ]
    assert mx.rrset is not None and mx.rrset.ttl == 60  # one RRset gets the smallest TTL
    assert [r.address for r in await resolver.resolve("mx1.example.test", "A")] == ["127.0.0.1"]
    assert [r.address for r in await resolver.resolve("mx1.example.test", "AAAA")] == ["::1"]
    assert ("example.test", "MX") in dns_server.queries
    assert ("mx1.example.test", "AAAA") in dns_server.queries


async def test_dns_long_txt_over_udp_fallback_and_tcp(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    key = "v=DKIM1; k=rsa; p=" + "A" * 600
    dns_server.add_txt("sel._domainkey.example.test", key)
    for tcp in (False, True):  # UDP reply is > 512 bytes: TC set, dnspython retries on TCP
        answer = await resolver.resolve("sel._domainkey.example.test", "TXT", tcp=tcp)
        (record,) = answer
        assert [len(s) for s in record.strings] == [255, 255, 108]
        assert b"".join(record.strings).decode() == key

    # A raw UDP query shows the truncation itself, with the question kept.
    query = dns.message.make_query("sel._domainkey.example.test", "TXT")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert reply.flags & dns.flags.TC and not reply.answer and reply.question == query.question


async def test_dns_nxdomain_nodata_null_mx_servfail(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_a("mx.example.test", "127.0.0.1")
    dns_server.add_null_mx("nomail.test")
    dns_server.set_servfail("broken.test")

    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("missing.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # exists with another type: NODATA
        await resolver.resolve("mx.example.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal is not NXDOMAIN
        await resolver.resolve("example.test", "MX")
    (null_mx,) = await resolver.resolve("nomail.test", "MX")
    assert null_mx.preference == 0 and null_mx.exchange == dns.name.root
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        await resolver.resolve("broken.test", "MX")


async def test_dns_mutation_from_other_threads_while_running(dns_server: DnsServer) -> None:
    threads = [
        threading.Thread(target=dns_server.add_a, args=("multi.test", f"127.0.0.{i}"))
        for i in range(1, 6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answer = await dns_server.resolver().resolve("multi.test", "A")
    assert len(answer) == 5
    dns_server.remove("multi.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await dns_server.resolver().resolve("multi.test", "A")


# -- SMTP ---------------------------------------------------------------------------------------

MESSAGE = (
    b"From: a@sender.test\r\nTo: rcpt@x.test\r\nSubject: hi\r\n\r\n"
    b"line one\r\n.leading dot survives\r\n\xc3\xa9 8bit\r\n"
)


@pytest.fixture
async def mx_sink() -> AsyncIterator[MxSink]:
    async with MxSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_mx_scripted_rcpt_451_then_accepts(mx_sink: MxSink) -> None:
    mx_sink.script_rcpt("RCPT@x.test", "451 4.3.0 try later")

    async def send() -> None:
        await aiosmtplib.send(
            MESSAGE,
            sender="a@sender.test",
            recipients=["rcpt@x.test"],
            hostname="127.0.0.1",
            port=mx_sink.port,
        )

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send()
    assert refused.value.recipients[0].code == 451
    assert mx_sink.messages == []

    await send()
    (msg,) = await mx_sink.wait_for_messages(1)
    assert (msg.mail_from, msg.rcpt_tos, msg.tls) == ("a@sender.test", ["rcpt@x.test"], False)
    assert msg.data == MESSAGE
    assert msg.peer.startswith("127.0.0.1:")
    assert mx_sink.sessions_total == 2


async def test_mx_scripted_data_reply_and_null_sender(mx_sink: MxSink) -> None:
    mx_sink.script_data("554 5.7.1 looks like spam")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mx_sink.port) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
            await client.sendmail("", ["x@any.domain"], MESSAGE)
        assert rejected.value.code == 554
        await client.sendmail("", ["x@any.domain", "y@other.domain"], MESSAGE)
    (msg,) = mx_sink.messages
    assert msg.mail_from == "<>" and msg.rcpt_tos == ["x@any.domain", "y@other.domain"]


async def test_mx_starttls(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_contexts
    async with MxSink(tls_context=server_ctx) as sink:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sink.port, tls_context=client_ctx, start_tls=False
        ) as client:
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls()
            await client.sendmail("a@sender.test", ["b@x.test"], MESSAGE)
        (msg,) = await sink.wait_for_messages(1)
        assert msg.tls and msg.data == MESSAGE
        assert sink.sessions_total == 1  # the post-STARTTLS handshake is not a new session


async def test_mx_counts_concurrent_sessions(mx_sink: MxSink) -> None:
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=mx_sink.port) for _ in range(3)]
    await asyncio.gather(*(c.connect() for c in clients))
    await wait_until(lambda: mx_sink.active_sessions == 3, message="3 sessions open")
    await asyncio.gather(*(c.quit() for c in clients))
    await wait_until(lambda: mx_sink.active_sessions == 0, message="sessions closed")
    await aiosmtplib.send(
        MESSAGE, sender="a@s.test", recipients=["b@x.test"], hostname="127.0.0.1", port=mx_sink.port
    )
    assert (mx_sink.max_concurrent_sessions, mx_sink.sessions_total) == (3, 4)


async def test_mx_wait_times_out_helpfully_and_stop_closes_sessions() -> None:
    sink = await MxSink().start()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port)
    await client.connect()
    with pytest.raises(TimeoutError, match=r"0 of 1 messages.*open: 1"):
        await sink.wait_for_messages(1, timeout=0.2)
    await sink.stop()  # must not hang on the open session
    assert sink.active_sessions == 0
    client.close()


# -- webhook ------------------------------------------------------------------------------------


async def test_webhook_scripted_500_keepalive_and_chunked() -> None:
    async with WebhookSink() as sink, httpx.AsyncClient() as client:
        sink.script_status(500)
        first = await client.post(sink.url + "hook?x=1", json={"event": "delivered"})
        second = await client.post(sink.url + "hook", content=b"raw", headers={"X-Sig": "abc"})

        async def chunks() -> AsyncIterator[bytes]:
            yield b"part1-"
            yield b"part2"

        third = await client.post(sink.url + "stream", content=chunks())
        assert [r.status_code for r in (first, second, third)] == [500, 200, 200]
        reqs = await sink.wait_for_requests(3, timeout=5)

    assert (reqs[0].method, reqs[0].path, reqs[0].json()) == (
        "POST",
        "/hook?x=1",
        {"event": "delivered"},
    )
    assert reqs[0].headers["content-type"] == "application/json"
    assert reqs[1].headers["x-sig"] == "abc" and reqs[1].body == b"raw"
    assert reqs[2].headers["transfer-encoding"] == "chunked" and reqs[2].body == b"part1-part2"


async def test_webhook_wait_timeout() -> None:
    async with WebhookSink() as sink:
        with pytest.raises(TimeoutError, match="0 of 1 requests"):
            await sink.wait_for_requests(1, timeout=0.1)


# -- wait_until ---------------------------------------------------------------------------------


async def test_wait_until_sync_async_and_deadline() -> None:
    calls: list[int] = []

    def sync_pred() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    async def async_pred() -> str:
        return "ready"

    assert await wait_until(sync_pred, interval=0.001) == 3
    assert await wait_until(async_pred) == "ready"
    with pytest.raises(AssertionError, match="never"):
        await wait_until(lambda: None, timeout=0.05, message="never")
