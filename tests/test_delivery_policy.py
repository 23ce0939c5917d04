"""The delivery engine's policies against real DNS and MX sinks: classification, suppression,
MX edge cases, TLS, smarthost routes and per-destination pacing."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from store import Message, RecipientStatus, Source, Submission
from tests.conftest import MX_HOST, Running
from tests.support import DnsServer, MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def submit(postroom: Running, *recipients: str) -> str:
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", recipients, CONTENT, Source.API)
    )
    return accepted.id


async def until(
    postroom: Running, message_id: str, *statuses: RecipientStatus
) -> Message:
    """Wait until every recipient is in one of `statuses` (default: any final status)."""

    async def check() -> Message | None:
        message = await postroom.spool.get_message(message_id)
        if statuses:
            ok = all(r.status in statuses for r in message.recipients)
        else:
            ok = all(r.status.is_final for r in message.recipients)
        return message if ok else None

    result: Message = await wait_until(check, message=f"{message_id} never reached {statuses}")
    return result


def types(message: Message) -> list[str]:
    return [e.type.value for e in message.events]


# -- classification and suppression ---------------------------------------------------------


async def test_unknown_user_bounces_and_is_suppressed(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("gone@example.test", "550 5.1.1 No such user")
    message = await until(postroom, await submit(postroom, "gone@example.test"))
    assert message.recipients[0].status is RecipientStatus.BOUNCED
    assert types(message) == ["email.queued", "email.bounced", "suppression.created"]
    assert message.events[-1].data["reply"]["enhanced"] == "5.1.1"
    suppression = await postroom.spool.suppression("GONE@example.test")
    assert suppression is not None and suppression.reason == "hard_bounce"

    # Intake records the suppressed address and never delivers to it.
    second = await postroom.spool.accept(
        Submission("app@acme.test", ("Gone@Example.test", "ok@example.test"), CONTENT,
                   Source.API)
    )
    message = await until(postroom, second.id)
    by_email = {r.email: r for r in message.recipients}
    assert by_email["Gone@Example.test"].status is RecipientStatus.SUPPRESSED
    assert by_email["ok@example.test"].status is RecipientStatus.DELIVERED
    assert "email.suppressed" in types(message)
    assert [m.rcpt_tos for m in mx_sink.messages] == [["ok@example.test"]]


async def test_policy_bounce_does_not_suppress(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("picky@example.test", "550 5.7.1 Rejected by policy")
    message = await until(postroom, await submit(postroom, "picky@example.test"))
    assert message.recipients[0].status is RecipientStatus.BOUNCED
    assert "suppression.created" not in types(message)
    assert await postroom.spool.suppression("picky@example.test") is None


async def test_data_451_defers_every_recipient(postroom: Running, mx_sink: MxSink):
    mx_sink.script_data("451 4.3.0 Try again later")
    message_id = await submit(postroom, "a@example.test", "b@example.test")
    message = await until(postroom, message_id)
    assert {r.status for r in message.recipients} == {RecipientStatus.DELIVERED}
    assert types(message).count("email.deferred") == 2
    assert all(r.attempts == 2 for r in message.recipients)


async def test_552_to_rcpt_gets_a_new_transaction(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("b@example.test", "552 5.5.3 Too many recipients")
    message = await until(postroom, await submit(postroom, "a@example.test", "b@example.test"))
    assert {r.status for r in message.recipients} == {RecipientStatus.DELIVERED}
    assert all(r.attempts == 1 for r in message.recipients)
    assert [m.rcpt_tos for m in mx_sink.messages] == [["a@example.test"], ["b@example.test"]]
    assert mx_sink.sessions_total == 1


async def test_5xx_with_a_4xx_enhanced_code_defers(postroom: Running, mx_sink: MxSink):
    mx_sink.script_rcpt("grey@example.test", "550 4.7.1 Greylisted, come back later")
    message = await until(postroom, await submit(postroom, "grey@example.test"))
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert types(message) == ["email.queued", "email.deferred", "email.delivered"]


async def test_max_age_bounces_at_the_next_deferral(start: Callable[..., Any], mx_sink: MxSink):
    postroom = await start(delivery={"max_age": 0})
    mx_sink.script_rcpt("busy@example.test", "451 4.2.0 Busy")
    message = await until(postroom, await submit(postroom, "busy@example.test"))
    assert message.recipients[0].status is RecipientStatus.BOUNCED
    assert message.events[-1].data["reason"] == "message expired"


# -- MX edge cases ----------------------------------------------------------------------------


async def test_null_mx_bounces_without_connecting(
    postroom: Running, dns: DnsServer, mx_sink: MxSink
):
    dns.add_null_mx("nomail.test")
    message = await until(postroom, await submit(postroom, "x@nomail.test"))
    reply = message.recipients[0].last_reply
    assert reply is not None and (reply.code, reply.enhanced) == (556, "5.1.10")
    assert mx_sink.sessions_total == 0


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit MX", "MX host"])
async def test_servfail_on_addresses_defers(
    postroom: Running, dns: DnsServer, mx_sink: MxSink, implicit: bool
):
    if implicit:
        dns.add_txt("flaky.test", "v=spf1 -all")  # the name exists, with no MX
        dns.set_servfail("flaky.test", "A")
        dns.set_servfail("flaky.test", "AAAA")
    else:
        dns.add_mx("flaky.test", "mx.flaky.test")
        dns.set_servfail("mx.flaky.test")
    message_id = await submit(postroom, "x@flaky.test")
    message = await until(postroom, message_id, RecipientStatus.DEFERRED)
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "4.4.3"


async def test_mx_pointing_at_ourselves_is_a_mail_loop(
    postroom: Running, dns: DnsServer, mx_sink: MxSink
):
    dns.add_mx("loop.test", "postroom.test")  # server.hostname in the tests
    dns.add_a("postroom.test", "127.0.0.1")
    message = await until(postroom, await submit(postroom, "x@loop.test"))
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "5.4.6"
    assert mx_sink.sessions_total == 0


async def test_private_mx_refused_when_not_allowed(start: Callable[..., Any], mx_sink: MxSink):
    postroom = await start(delivery={"allow_private_mx": False})
    message = await until(postroom, await submit(postroom, "x@example.test"))
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "5.4.4"
    assert mx_sink.sessions_total == 0


async def test_fallback_to_the_next_mx_when_the_first_refuses(
    postroom: Running, dns: DnsServer, mx_sink: MxSink
):
    # 127.0.0.2 has no listener on the sink's port: connection refused, then the next host.
    dns.add_mx("two.test", "dead.two.test", preference=5)
    dns.add_a("dead.two.test", "127.0.0.2")
    dns.add_mx("two.test", MX_HOST, preference=10)
    message = await until(postroom, await submit(postroom, "x@two.test"))
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert message.events[-1].data["mx"] == MX_HOST


@pytest.fixture
async def second_mx(dns: DnsServer, mx_sink: MxSink) -> AsyncIterator[MxSink]:
    """two.test: preference 5 is `mx_sink` (127.0.0.1), preference 10 this sink (127.0.0.2)."""
    dns.add_mx("two.test", MX_HOST, preference=5)
    dns.add_mx("two.test", "backup.two.test", preference=10)
    dns.add_a("backup.two.test", "127.0.0.2")
    async with MxSink(hostname="backup.two.test", address="127.0.0.2", port=mx_sink.port) as sink:
        yield sink


def refuse(sink: MxSink, phase: str, reply: str) -> None:
    if phase == "greeting":
        sink.script_greeting(reply)
    else:
        sink.script_mail(reply)


@pytest.mark.parametrize("phase", ["greeting", "mail"])
async def test_a_5xx_session_refusal_falls_back_to_the_next_mx(
    postroom: Running, mx_sink: MxSink, second_mx: MxSink, phase: str
):
    # As Postfix's smtp_skip_5xx_greeting: one host's refusal of the session is that host's
    # answer, not the recipient's; the next MX is healthy.
    refuse(mx_sink, phase, "554 5.1.1 Not accepting mail from you")
    message = await until(postroom, await submit(postroom, "x@two.test"))
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert message.events[-1].data["mx"] == "backup.two.test"
    assert mx_sink.sessions_total == 1 and mx_sink.messages == []
    assert [m.rcpt_tos for m in second_mx.messages] == [["x@two.test"]]
    assert await postroom.spool.suppression("x@two.test") is None


@pytest.mark.parametrize("phase", ["greeting", "mail"])
async def test_when_every_mx_refuses_the_last_refusal_bounces(
    postroom: Running, mx_sink: MxSink, second_mx: MxSink, phase: str
):
    refuse(mx_sink, phase, "554 5.7.1 First says no")
    refuse(second_mx, phase, "550 5.7.1 Backup says no")
    message = await until(postroom, await submit(postroom, "x@two.test"))
    [rcpt] = message.recipients
    assert rcpt.status is RecipientStatus.BOUNCED and rcpt.attempts == 1
    assert rcpt.last_reply is not None
    assert (rcpt.last_reply.code, rcpt.last_reply.text) == (550, "Backup says no")
    assert mx_sink.sessions_total == 1 and second_mx.sessions_total == 1
    assert mx_sink.messages == [] and second_mx.messages == []


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def sink_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(MX_HOST).configure_cert(context)
    return context


@pytest.fixture
async def tls_sink(sink_tls: ssl.SSLContext) -> AsyncIterator[MxSink]:
    async with MxSink(hostname=MX_HOST, tls_context=sink_tls) as sink:
        yield sink


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return str(path)


async def test_required_tls_defers_when_starttls_is_not_offered(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"tls": "required"})
    message_id = await submit(postroom, "x@example.test")
    message = await until(postroom, message_id, RecipientStatus.DEFERRED)
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "4.7.4"
    assert mx_sink.messages == []  # never plaintext


async def test_opportunistic_starttls_to_a_self_signed_sink(
    start: Callable[..., Any], tls_sink: MxSink
):
    # The sink's certificate comes from a CA Postroom does not know: used anyway, unverified.
    postroom = await start(delivery={"mx_port": tls_sink.port})
    message = await until(postroom, await submit(postroom, "x@example.test"))
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert str(message.events[-1].data["tls"]).startswith("TLSv1")
    [received] = tls_sink.messages
    assert received.tls


async def test_verify_checks_the_certificate_against_the_mx_name(
    start: Callable[..., Any], tls_sink: MxSink, ca_file: str
):
    trusted = await start(
        delivery={"mx_port": tls_sink.port, "tls": "verify", "tls_ca_file": ca_file}
    )
    message = await until(trusted, await submit(trusted, "x@example.test"))
    assert message.recipients[0].status is RecipientStatus.DELIVERED
    await trusted.stop()

    untrusted = await start(delivery={"mx_port": tls_sink.port, "tls": "verify"})
    message_id = await submit(untrusted, "y@example.test")
    message = await until(untrusted, message_id, RecipientStatus.DEFERRED)
    reply = message.recipients[0].last_reply
    assert reply is not None and reply.enhanced == "4.7.5"


# -- smarthost ----------------------------------------------------------------------------------


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any
                   ) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", b"s3cret")
    # handled=False: aiosmtpd itself answers 535 to a failure.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
async def smarthost(sink_tls: ssl.SSLContext) -> AsyncIterator[MxSink]:
    async with MxSink(hostname="smarthost.test", tls_context=sink_tls,
                      authenticator=_authenticator) as sink:
        yield sink


@pytest.mark.parametrize("good_password", [True, False], ids=["auth ok", "auth refused"])
async def test_smarthost_route_with_auth(
    start: Callable[..., Any], smarthost: MxSink, mx_sink: MxSink, good_password: bool,
    tmp_path: Path,
):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n" if good_password else "wrong\n")
    route = {"host": "127.0.0.1", "port": smarthost.port, "username": "relay",
             "password_file": str(secret)}
    postroom = await start(delivery={"routes": {"*": route}})
    message_id = await submit(postroom, "someone@anywhere.test")
    if good_password:
        message = await until(postroom, message_id)
        assert message.recipients[0].status is RecipientStatus.DELIVERED
        [received] = smarthost.messages
        assert received.rcpt_tos == ["someone@anywhere.test"] and received.tls
    else:
        message = await until(postroom, message_id, RecipientStatus.DEFERRED)
        reply = message.recipients[0].last_reply
        assert reply is not None and reply.enhanced == "4.7.0"
        assert "s3cret" not in reply.text and "wrong" not in reply.text
    assert mx_sink.sessions_total == 0


# -- pacing -------------------------------------------------------------------------------------


async def test_per_destination_connection_cap_is_never_exceeded(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start(delivery={"max_connections_per_destination": 2})
    ids = [await submit(postroom, f"user{i}@example.test") for i in range(12)]
    for message_id in ids:
        await until(postroom, message_id)
    assert len(mx_sink.messages) == 12
    assert 1 <= mx_sink.max_concurrent_sessions <= 2


@pytest.mark.parametrize("routed", ["*", "each domain", "override"])
async def test_smarthost_connections_are_capped_across_recipient_domains(
    start: Callable[..., Any], mx_sink: MxSink, routed: str
):
    # The destination of routed mail is the smarthost: its cap holds over all domains, and
    # `[delivery.destinations."<route host>"]` overrides it.
    async with MxSink(hostname="relay.test") as relay:
        relay.data_delay = 0.2  # a slow smarthost: attempts overlap
        route = {"host": "127.0.0.1", "port": relay.port, "tls": "opportunistic"}
        domains = [f"d{i}.test" for i in range(8)]
        routes = {d: route for d in domains} if routed == "each domain" else {"*": route}
        pacing: dict[str, Any] = {"max_connections_per_destination": 2}
        if routed == "override":
            pacing = {"destinations": {"127.0.0.1": {"max_connections": 2}}}
        postroom = await start(delivery={"routes": routes, **pacing})
        ids = [await submit(postroom, f"user@{d}") for d in domains]
        for message_id in ids:
            message = await until(postroom, message_id)
            assert message.recipients[0].status is RecipientStatus.DELIVERED
        assert len(relay.messages) == 8
        assert relay.max_concurrent_sessions == 2
    assert mx_sink.sessions_total == 0


async def test_the_connection_cap_holds_across_destinations(
    start: Callable[..., Any], dns: DnsServer, mx_sink: MxSink
):
    # `max_connections` counts the attempts talking to a host. An attempt that has finished
    # with its host and only waits for its outcome's commit holds no connection, but the cap
    # on the sessions open at once must hold all the same.
    mx_sink.data_delay = 0.1  # attempts overlap
    domains = [f"d{i}.test" for i in range(4)]
    for domain in domains:
        dns.add_mx(domain, f"mx.{domain}")
        dns.add_a(f"mx.{domain}", "127.0.0.1")
    postroom = await start(delivery={"max_connections_per_destination": 2, "max_connections": 3})
    ids = [await submit(postroom, f"user{i}@{d}") for i in range(4) for d in domains]
    for message_id in ids:
        message = await until(postroom, message_id)
        assert message.recipients[0].status is RecipientStatus.DELIVERED
    assert len(mx_sink.messages) == 16
    assert mx_sink.max_concurrent_data == 3


async def test_one_slow_domain_does_not_slow_another(
    start: Callable[..., Any], dns: DnsServer, mx_sink: MxSink
):
    # slow.test's MX accepts connections and never greets: its attempts hang.
    hung: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    blackhole = await asyncio.start_server(silent, "127.0.0.3", mx_sink.port)
    dns.add_mx("slow.test", "mx.slow.test")
    dns.add_a("mx.slow.test", "127.0.0.3")
    try:
        postroom = await start(
            delivery={"max_connections_per_destination": 2, "max_connections": 3}
        )
        for i in range(6):
            await submit(postroom, f"user{i}@slow.test")
        await wait_until(lambda: len(hung) == 2, message="slow.test attempts did not start")
        message = await until(postroom, await submit(postroom, "quick@example.test"))
        assert message.recipients[0].status is RecipientStatus.DELIVERED
        assert len(hung) == 2  # the slow destination never got more than its cap
    finally:
        for writer in hung:
            writer.close()
        blackhole.close()
