"""The SMTP front door: STARTTLS, AUTH with an API key, and no open relay."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from store import Scope
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import MxSink

MESSAGE = (
    b"From: App <app@acme.test>\r\nTo: user@example.test\r\nSubject: SMTP hello\r\n\r\n"
    b"Hello over SMTP.\r\n"
)

pytestmark = WITH_AND_WITHOUT_WORKERS


def smtp_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def submit(port: int, tls: ssl.SSLContext, key: str, *, login: bool = False) -> str:
    with smtp_session(port) as client:
        client.starttls(context=tls)
        client.ehlo()
        if login:
            client.user, client.password = "anyone", key
            client.auth("LOGIN", client.auth_login)
        else:
            client.login("anyone", key)
        code, reply = client.mail("app@acme.test")
        assert code == 250
        code, reply = client.rcpt("user@example.test")
        assert code == 250
        code, reply = client.data(MESSAGE)
        assert code == 250, reply
        return reply.decode()


@pytest.mark.parametrize("login", [False, True], ids=["PLAIN", "LOGIN"])
async def test_starttls_auth_submission_is_delivered(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext, login: bool
):
    key = await postroom.new_key()
    reply = await asyncio.to_thread(submit, postroom.smtp_port, client_tls, key, login=login)
    assert reply.startswith("2.0.0 Ok: queued as msg_")
    message_id = reply.rsplit(" ", 1)[1]

    [received] = await mx_sink.wait_for_messages(1)
    assert received.mail_from == "app@acme.test"
    assert received.rcpt_tos == ["user@example.test"]
    assert b"Subject: SMTP hello\r\n" in received.data
    assert received.data.endswith(b"Hello over SMTP.\r\n")
    # The queue id in the 250 is the id the API knows.
    message = await postroom.spool.get_message(message_id)
    assert message.subject == "SMTP hello"


async def test_ehlo_offers_starttls_and_auth_only_after_it(postroom: Running, client_tls):
    def converse() -> None:
        with smtp_session(postroom.smtp_port) as client:
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            code, reply = client.docmd("AUTH", "PLAIN AGFueW9uZQBwcl94")
            assert code == 538 and reply.startswith(b"5.7.11")
            client.starttls(context=client_tls)
            client.ehlo()
            assert "PLAIN" in client.esmtp_features["auth"]
            assert "LOGIN" in client.esmtp_features["auth"]

    await asyncio.to_thread(converse)


async def test_bad_or_revoked_key_is_535(postroom: Running, client_tls):
    new = await postroom.spool.create_key("revoked", Scope.FULL)
    await postroom.spool.revoke_key(new.key.id)

    def attempt(password: str) -> int:
        with smtp_session(postroom.smtp_port) as client:
            client.starttls(context=client_tls)
            client.ehlo()
            try:
                client.login("anyone", password)
            except smtplib.SMTPAuthenticationError as exc:
                assert exc.smtp_error.startswith(b"5.7.8")
                return exc.smtp_code
            return 235

    assert await asyncio.to_thread(attempt, "pr_wrong") == 535
    assert await asyncio.to_thread(attempt, new.secret) == 535


async def test_unauthenticated_relay_is_refused_and_nothing_spooled(
    postroom: Running, client_tls
):
    def try_relay(with_tls: bool) -> tuple[int, bytes]:
        with smtp_session(postroom.smtp_port) as client:
            if with_tls:
                client.starttls(context=client_tls)
                client.ehlo()
            client.mail("spammer@evil.test")
            code, reply = client.rcpt("victim@example.test")
            if code == 250:
                client.data(MESSAGE)
            return code, reply

    for with_tls in (False, True):
        code, reply = await asyncio.to_thread(try_relay, with_tls)
        assert (code, reply[:5]) == (530, b"5.7.0")
    assert await postroom.spool.list_messages() == []


async def test_trusted_network_relays_without_auth(start, mx_sink: MxSink):
    postroom = await start(smtp={"trusted_networks": ["127.0.0.0/8"]})

    def send() -> tuple[int, bytes]:
        with smtp_session(postroom.smtp_port) as client:
            client.mail("cron@acme.test")
            assert client.rcpt("user@example.test")[0] == 250
            return client.data(MESSAGE)

    code, reply = await asyncio.to_thread(send)
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as msg_")
    [received] = await mx_sink.wait_for_messages(1)
    assert received.mail_from == "cron@acme.test"


async def test_every_listen_address_serves_ipv4_and_ipv6_alike(start, mx_sink: MxSink):
    """Each `smtp.listen` entry is its own listener, an IPv6 one too (with workers, the service
    binds these sockets itself and the workers accept on them)."""
    postroom = await start(smtp={
        "listen": ["127.0.0.1:0", "[::1]:0"], "trusted_networks": ["127.0.0.0/8", "::1/128"],
    })
    [(v4_host, v4_port), (v6_host, v6_port)] = postroom.service.smtp_addresses
    assert (v4_host, v6_host) == ("127.0.0.1", "::1")

    def send(host: str, port: int) -> tuple[int, bytes]:
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.ehlo()
            client.mail("cron@acme.test")
            assert client.rcpt("user@example.test")[0] == 250
            return client.data(MESSAGE)

    for host, port in ((v4_host, v4_port), (v6_host, v6_port)):
        code, reply = await asyncio.to_thread(send, host, port)
        assert code == 250, reply
    assert len(await mx_sink.wait_for_messages(2)) == 2


async def test_bare_lf_line_endings_are_normalised_to_crlf(start, mx_sink: MxSink):
    postroom = await start(smtp={"trusted_networks": ["127.0.0.0/8"]})

    def send() -> None:
        with smtp_session(postroom.smtp_port) as client:
            client.sendmail(
                "cron@acme.test", ["user@example.test"],
                b"Subject: lf\nFrom: cron@acme.test\n\nline one\nline two\rthree",
            )

    await asyncio.to_thread(send)
    [received] = await mx_sink.wait_for_messages(1)
    assert received.data.endswith(b"\r\n\r\nline one\r\nline two\r\nthree\r\n")
    assert b"\n" not in received.data.replace(b"\r\n", b"")
    assert b"\r" not in received.data.replace(b"\r\n", b"")


async def test_vrfy_and_help_answer_with_enhanced_codes(postroom: Running):
    def converse() -> list[tuple[int, bytes]]:
        with smtp_session(postroom.smtp_port) as client:
            return [client.verify("user@example.test"), client.docmd("HELP"),
                    client.docmd("HELP MAIL")]

    vrfy, help_all, help_mail = await asyncio.to_thread(converse)
    assert (vrfy[0], vrfy[1][:6]) == (252, b"2.0.0 ")
    assert help_all[0] == 214 and help_all[1].startswith(b"2.0.0 Supported commands: ")
    assert b"MAIL" in help_all[1]
    assert (help_mail[0], help_mail[1][:14]) == (214, b"2.0.0 Syntax: ")
