"""The SMTP front door in production shape: listeners, AUTH and its throttle, logs without secrets.

Real Postroom, real sockets: smtplib where a well-behaved client is the point, `RawSmtp` where
exact bytes matter. Relay refusals, limits and integrity are in test_submission_policy.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import sqlite3
import ssl

import pytest

from relay.service import StartupError
from store import Scope
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import MxSink, RawSmtp

MESSAGE = b"From: App <app@acme.test>\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"

pytestmark = WITH_AND_WITHOUT_WORKERS


def plain(key: str) -> str:
    return base64.b64encode(f"\0anyone\0{key}".encode()).decode()


def ehlo_keywords(reply: str) -> list[str]:
    return [line[4:].split(" ")[0].upper() for line in reply.splitlines()[1:]]


async def test_ehlo_advertises_the_submission_extensions(postroom: Running, client_tls):
    async with await RawSmtp.open(postroom.smtp_port) as client:
        assert client.greeting.startswith("220 postroom.test ")
        keywords = ehlo_keywords(await client.command("EHLO client.test"))
        assert keywords == ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                            "STARTTLS", "HELP"]
        assert (await client.command("STARTTLS")).startswith("220 2.0.0")
        await client.start_tls(client_tls)
        reply = await client.command("EHLO client.test")
        assert ehlo_keywords(reply) == ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8",
                                        "ENHANCEDSTATUSCODES", "AUTH", "HELP"]
        assert "250-AUTH LOGIN PLAIN" in reply
        assert "250-SIZE 50000000" in reply


async def test_implicit_tls_listener_offers_auth_at_once_and_delivers(
    start, mx_sink: MxSink, client_tls: ssl.SSLContext
):
    postroom = await start(smtp={"tls_listen": ["127.0.0.1:0"]})
    key = await postroom.new_key()

    def submit() -> list[str]:
        with smtplib.SMTP_SSL("127.0.0.1", postroom.smtps_port, local_hostname="client.test",
                              context=client_tls, timeout=10) as client:
            client.ehlo()
            offered = sorted(client.esmtp_features)
            client.login("anyone", key)
            client.sendmail("app@acme.test", ["user@example.test"], MESSAGE)
            return offered

    offered = await asyncio.to_thread(submit)
    assert "auth" in offered and "starttls" not in offered
    [received] = await mx_sink.wait_for_messages(1)
    first = received.data.split(b"\r\n\r\n", 1)[0].decode()
    assert first.startswith("Received: from client.test ([127.0.0.1])")
    assert "with ESMTPSA" in first and "(using TLSv1.3 with cipher" in first
    assert key not in first


async def test_auth_login_over_implicit_tls(start, client_tls: ssl.SSLContext):
    postroom = await start(smtp={"tls_listen": ["127.0.0.1:0"]})
    key = await postroom.new_key()
    async with await RawSmtp.open(postroom.smtps_port, tls=client_tls) as client:
        await client.command("EHLO client.test")
        assert (await client.command("AUTH LOGIN")).startswith("334 ")
        assert (await client.command(base64.b64encode(b"anyone"))).startswith("334 ")
        assert (await client.command(base64.b64encode(key.encode()))).startswith("235 2.7.0")


async def test_plaintext_auth_only_on_loopback_and_only_when_allowed(postroom: Running, start):
    key = await postroom.new_key()
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        assert (await client.command(f"AUTH PLAIN {plain(key)}")).startswith("538 5.7.11")

    lenient = await start(smtp={"allow_plaintext_auth_loopback": True})
    key = await lenient.new_key()
    async with await RawSmtp.open(lenient.smtp_port) as client:
        assert "AUTH" in ehlo_keywords(await client.command("EHLO client.test"))
        assert (await client.command(f"AUTH PLAIN {plain(key)}")).startswith("235 2.7.0")


async def failed_auths(port: int, tls: ssl.SSLContext, times: int, source: str) -> list[str]:
    """Replies to `times` bad AUTH PLAIN attempts in one session ("" once the server hung up)."""
    replies = []
    async with await RawSmtp.open(port, tls=tls, source=source) as client:
        await client.command("EHLO client.test")
        for _ in range(times):
            reply = await client.command(f"AUTH PLAIN {plain('pr_guess')}")
            replies.append(reply)
            if not reply.startswith("535"):
                assert await client.is_closed_by_server()
                break
    return replies


async def test_repeated_auth_failures_lock_out_that_client_only(start, client_tls):
    postroom = await start(smtp={
        "tls_listen": ["127.0.0.1:0"], "auth_max_failures": 3,
        "trusted_networks": ["127.0.0.3/32"],
    })
    port = postroom.smtps_port
    key = await postroom.new_key()

    replies = await failed_auths(port, client_tls, 5, "127.0.0.1")
    assert [r[:9] for r in replies] == ["535 5.7.8", "535 5.7.8", "421 4.7.0"]
    # The cool-down: a new connection from that address is turned away at once.
    async with await RawSmtp.open(port, tls=client_tls, source="127.0.0.1") as client:
        assert client.greeting.startswith("421 4.7.0")
        assert await client.is_closed_by_server()
    # Another client is unaffected.
    async with await RawSmtp.open(port, tls=client_tls, source="127.0.0.2") as client:
        assert client.greeting.startswith("220 ")
        await client.command("EHLO other.test")
        assert (await client.command(f"AUTH PLAIN {plain(key)}")).startswith("235 2.7.0")
    # Trusted networks are never locked out.
    replies = await failed_auths(port, client_tls, 6, "127.0.0.3")
    assert [r[:9] for r in replies] == ["535 5.7.8"] * 6


async def test_revoked_key_fails_at_once(postroom: Running, client_tls):
    new = await postroom.spool.create_key("soon revoked", Scope.SEND)
    await postroom.spool.revoke_key(new.key.id)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("STARTTLS")
        await client.start_tls(client_tls)
        await client.command("EHLO client.test")
        assert (await client.command(f"AUTH PLAIN {plain(new.secret)}")).startswith("535 5.7.8")


async def test_logs_never_carry_auth_data_or_bodies(
    start, mx_sink: MxSink, client_tls, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
):
    caplog.set_level(logging.DEBUG)
    postroom = await start(server={"log_level": "DEBUG"})  # SMTP workers log to stderr
    key = await postroom.new_key()
    secret_body = b"Body-Marker-7f3a: nobody may log this line\r\n"
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("STARTTLS")
        await client.start_tls(client_tls)
        await client.command("EHLO client.test")
        # A LOGIN password that is not base64 (aiosmtpd logs those raw at DEBUG), a bad key,
        # a password sent out of turn as if it were a command, then a good key.
        await client.command("AUTH LOGIN")
        await client.command(base64.b64encode(b"anyone"))
        assert (await client.command("pr_raw-password-not-base64")).startswith("501")
        assert (await client.command(f"AUTH PLAIN {plain('pr_wrong-key-123')}")).startswith("535")
        assert (await client.command("cHJfb3V0LW9mLXR1cm4=")).startswith("500 5.5.2")
        assert (await client.command(f"AUTH PLAIN {plain(key)}")).startswith("235")
        await client.command("MAIL FROM:<app@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        reply = await client.command(b"Subject: logged?\r\n\r\n" + secret_body + b".")
        assert reply.startswith("250 2.0.0 Ok: queued as ")
    await mx_sink.wait_for_messages(1)
    await postroom.stop()  # the workers' last lines are written
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records) + capfd.readouterr().err
    for secret in ("pr_raw-password-not-base64", "pr_wrong-key-123", key, plain(key),
                   "cHJfb3V0LW9mLXR1cm4=", "CHJFB3V0LW9MLXR1CM4=", "Body-Marker-7f3a"):
        assert secret not in logged, secret
    assert all(r.levelno >= logging.WARNING for r in caplog.records if r.name == "mail.log")
    assert "AUTH PLAIN failed: client=127.0.0.1" in logged  # what an operator needs


async def test_a_failure_inside_postroom_is_451_and_the_session_goes_on(
    start, caplog: pytest.LogCaptureFixture
):
    postroom = await start(smtp={"trusted_networks": ["127.0.0.0/8"]})
    db = sqlite3.connect(postroom.service.settings.spool_path)
    db.execute("CREATE TRIGGER fail BEFORE INSERT ON messages "
               "BEGIN SELECT RAISE(ABORT, 'injected fault'); END")
    db.commit()
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")

        async def send() -> str:
            await client.command("MAIL FROM:<cron@acme.test>")
            await client.command("RCPT TO:<user@example.test>")
            await client.command("DATA")
            return await client.command(MESSAGE + b".")

        reply = await send()
        assert reply == "451 4.3.0 Internal error, try again later"
        db.execute("DROP TRIGGER fail")
        db.commit()
        assert (await send()).startswith("250 2.0.0 Ok: queued as msg_")
    db.close()
    [record] = [r for r in caplog.records if r.name == "relay.frontdoor" and r.exc_info]
    assert "injected fault" in caplog.text and "Traceback" in caplog.text
    assert record.levelno == logging.ERROR


async def test_implicit_tls_without_a_certificate_stops_start_up(start):
    with pytest.raises(StartupError, match="tls_listen needs a certificate"):
        await start(smtp={"tls_listen": ["127.0.0.1:0"], "tls_cert": None, "tls_key": None})


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        (b"MAIL FROM:<app\xff@acme.test>", "553 5.1.7"),
        (b"MAIL FROM:<app@acme\xc3(.test>", "553 5.1.7"),
        (b"MAIL FROM:<no-domain>", "553 5.1.7"),
        (b"RCPT TO:<user\xfe@example.test>", "553 5.1.3"),
        (b"RCPT TO:<user@\xed\xa0\x80.test>", "553 5.1.3"),  # an encoded surrogate: not UTF-8
    ],
    ids=["mail-invalid-byte", "mail-truncated-sequence", "mail-no-domain", "rcpt-invalid-byte",
         "rcpt-surrogate"],
)
async def test_addresses_that_are_not_utf8_are_refused_for_good_at_once(
    start, mx_sink: MxSink, caplog: pytest.LogCaptureFixture, command: bytes, refusal: str
):
    postroom = await start(smtp={"trusted_networks": ["127.0.0.0/8"]})
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        if command.startswith(b"RCPT"):
            assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("250")
        assert (await client.command(command)).startswith(refusal)
        # Nothing of the refused address is kept: the transaction goes on without it.
        if command.startswith(b"MAIL"):
            assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("250")
        assert (await client.command("RCPT TO:<user@example.test>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0 Ok: queued as")
    [received] = await mx_sink.wait_for_messages(1)
    assert (received.mail_from, received.rcpt_tos) == ("cron@acme.test", ["user@example.test"])
    assert "Traceback" not in caplog.text


async def test_a_key_revoked_during_a_session_stops_at_the_next_mail(
    postroom: Running, mx_sink: MxSink, client_tls
):
    new = await postroom.spool.create_key("soon revoked", Scope.SEND)
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("STARTTLS")
        await client.start_tls(client_tls)
        await client.command("EHLO client.test")
        assert (await client.command(f"AUTH PLAIN {plain(new.secret)}")).startswith("235")

        async def send() -> str:
            reply = await client.command("MAIL FROM:<app@acme.test>")
            if not reply.startswith("250"):
                return reply
            await client.command("RCPT TO:<user@example.test>")
            await client.command("DATA")
            return await client.command(MESSAGE + b".")

        assert (await send()).startswith("250 2.0.0 Ok: queued as msg_")
        await postroom.spool.revoke_key(new.key.id)
        assert (await send()).startswith("530 5.7.0")
        # The session is no longer authenticated: relaying is refused, nothing more spooled.
        await client.command("MAIL FROM:<app@acme.test>")
        assert (await client.command("RCPT TO:<user@example.test>")).startswith("530 5.7.0")
        # Another key may take over in the same session.
        key = await postroom.new_key(Scope.SEND)
        assert (await client.command(f"AUTH PLAIN {plain(key)}")).startswith("235")
        await client.command("RSET")
        assert (await send()).startswith("250 2.0.0 Ok: queued as msg_")
    assert len(await postroom.spool.list_messages()) == 2
    await mx_sink.wait_for_messages(2)
