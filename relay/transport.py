"""SMTP transactions with one host address, through aiosmtplib.

Owns the conversation with a receiving MTA or smarthost: connect (to the resolved IP, from
`delivery.source_address` when set), EHLO with our hostname, the TLS policy (opportunistic
STARTTLS without certificate checks as MTAs do, `required`, `verify` against the MX name sent as
SNI, or implicit TLS to a smarthost), AUTH for smarthosts, then MAIL, one RCPT per recipient and
DATA when any recipient was accepted. Recipients refused with `552` at RCPT ("too many
recipients", RFC 5321 §4.5.3.1.10) get a new transaction on the same connection. It returns each
recipient's reply, or a session-level failure that tells the engine to try the next address.
Any timeout drops the connection. aiosmtplib's exceptions never leave this module.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib

from relay.outcome import make_reply
from store import Reply

logger = logging.getLogger(__name__)

TlsMode = Literal["opportunistic", "required", "verify", "implicit"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per phase (RFC 5321 §4.5.3.2): the reply after the final dot may take minutes."""

    connect: float
    command: float
    data: float


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How to talk to a host: our name, TLS, AUTH (smarthosts), the source address."""

    local_hostname: str
    timeouts: Timeouts
    tls: TlsMode = "opportunistic"
    tls_ca_file: str | None = None
    source_address: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message for some recipients of one destination: (recipient id, address) pairs."""

    mail_from: str
    recipients: tuple[tuple[int, str], ...]
    content: bytes


@dataclass(frozen=True, slots=True)
class SessionResult:
    """Either `replies` (recipient id → the reply it got) or a session-level `failure`.

    `at_rcpt` names the recipients whose reply came at RCPT (not after DATA): a `552` there
    means "too many recipients", a temporary condition.
    """

    host: str
    address: str
    replies: dict[int, Reply]
    failure: Reply | None = None
    tls: str | None = None
    at_rcpt: frozenset[int] = frozenset()


class _SessionFailed(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def tls_context(mode: TlsMode, ca_file: str | None) -> ssl.SSLContext:
    """Opportunistic TLS encrypts without checking the certificate (RFC 7435); `verify` checks
    the chain and the MX name."""
    if mode in ("verify", "implicit"):
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def send(
    envelope: Envelope, host: str, address: str, port: int, policy: SessionPolicy
) -> SessionResult:
    """Run the transaction(s) for `envelope` against `address` (which is `host`'s)."""
    implicit = policy.tls == "implicit"
    smtp = aiosmtplib.SMTP(
        hostname=address,
        port=port,
        local_hostname=policy.local_hostname,
        source_address=(policy.source_address, 0) if policy.source_address else None,
        timeout=policy.timeouts.command,
        use_tls=implicit,
        start_tls=False,
        tls_context=tls_context(policy.tls, policy.tls_ca_file) if implicit else None,
    )
    where = f"{host}[{address}]:{port}"

    def failed(reply: Reply, tls: str | None = None) -> SessionResult:
        return SessionResult(host=host, address=address, replies={}, failure=reply, tls=tls)

    try:
        await smtp.connect(timeout=policy.timeouts.connect)
    except aiosmtplib.SMTPConnectResponseError as exc:
        return failed(make_reply(exc.code, exc.message))
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        return failed(Reply(451, "4.4.1", f"connect to {where} failed: {exc}"))
    tls: str | None = _tls_version(smtp) if implicit else None
    try:
        tls = await _start_session(smtp, host, where, policy) or tls
        replies, at_rcpt = await _transactions(smtp, envelope, policy.timeouts)
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        return SessionResult(host, address, replies, tls=tls, at_rcpt=frozenset(at_rcpt))
    except _SessionFailed as exc:
        return failed(exc.reply, tls)
    except aiosmtplib.SMTPResponseException as exc:
        return failed(make_reply(exc.code, exc.message), tls)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        # A timeout or a lost connection: the connection is dropped below, never reused.
        return failed(Reply(451, "4.4.2", f"{where} lost the connection: {exc}"), tls)
    finally:
        smtp.close()


async def _start_session(
    smtp: aiosmtplib.SMTP, host: str, where: str, policy: SessionPolicy
) -> str | None:
    """EHLO, STARTTLS per policy, AUTH when configured; the TLS version in use, if any."""
    await smtp.ehlo()
    tls: str | None = None
    if policy.tls != "implicit":
        if smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(
                    server_hostname=host,
                    tls_context=tls_context(policy.tls, policy.tls_ca_file),
                    timeout=policy.timeouts.command,
                )
            except aiosmtplib.SMTPResponseException as exc:
                if policy.tls != "opportunistic":
                    raise _SessionFailed(
                        Reply(451, "4.7.5", f"{where} refused STARTTLS: {exc.code} {exc.message}")
                    ) from None
                # Opportunistic: the server declined; the session goes on in plaintext.
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                raise _SessionFailed(
                    Reply(451, "4.7.5", f"TLS handshake with {where} failed: {exc}")
                ) from None
            else:
                tls = _tls_version(smtp)
                await smtp.ehlo()
        elif policy.tls in ("required", "verify"):
            raise _SessionFailed(
                Reply(451, "4.7.4", f"TLS is required, but {where} does not offer STARTTLS")
            )
    if policy.username:
        try:
            await smtp.login(policy.username, policy.password or "")
        except aiosmtplib.SMTPResponseException as exc:
            # A refused login is our configuration's problem, not the message's: defer.
            reply = make_reply(exc.code, exc.message)
            raise _SessionFailed(
                Reply(454, "4.7.0", f"authentication to {where} failed: {reply.code} "
                      f"{reply.enhanced or ''} {reply.text}".replace("  ", " "))
            ) from None
        except aiosmtplib.SMTPException as exc:
            raise _SessionFailed(Reply(454, "4.7.0", f"AUTH with {where}: {exc}")) from None
    return tls


async def _transactions(
    smtp: aiosmtplib.SMTP, envelope: Envelope, timeouts: Timeouts
) -> tuple[dict[int, Reply], set[int]]:
    replies: dict[int, Reply] = {}
    at_rcpt: set[int] = set()
    pending: Sequence[tuple[int, str]] = envelope.recipients
    while pending:
        try:
            await smtp.mail(envelope.mail_from)
        except aiosmtplib.SMTPSenderRefused as exc:
            if replies:  # a later transaction: its recipients get the refusal
                for rid, _ in pending:
                    replies[rid] = make_reply(exc.code, exc.message)
                return replies, at_rcpt
            raise _SessionFailed(make_reply(exc.code, exc.message)) from None
        accepted: list[int] = []
        too_many: list[tuple[int, str]] = []
        for rid, email in pending:
            try:
                resp = await smtp.rcpt(email)
            except aiosmtplib.SMTPRecipientRefused as exc:
                replies[rid] = make_reply(exc.code, exc.message)
                at_rcpt.add(rid)
                if exc.code == 552:
                    too_many.append((rid, email))
            else:
                replies[rid] = make_reply(resp.code, resp.message)
                at_rcpt.discard(rid)
                accepted.append(rid)
        if accepted:
            try:
                resp = await smtp.data(envelope.content, timeout=timeouts.data)
                final = make_reply(resp.code, resp.message)
            except aiosmtplib.SMTPDataError as exc:
                final = make_reply(exc.code, exc.message)
            # The reply after the final dot is every accepted recipient's outcome.
            for rid in accepted:
                replies[rid] = final
        if not accepted or not too_many:
            break  # no progress: what is left keeps its 552 (deferred: see outcome.classify)
        pending = too_many
    return replies, at_rcpt


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    return None if ssl_object is None else str(ssl_object.version())
