"""One SMTP transaction to one host address, through aiosmtplib.

Owns the conversation with a receiving MTA: connect to the resolved IP, EHLO with our hostname,
opportunistic STARTTLS (certificate not verified, as MTAs do; the MX name is the SNI), MAIL, one
RCPT per recipient, DATA when any recipient was accepted, QUIT. It returns the reply each
recipient got, or a session-level failure that tells the engine to try the next address.
aiosmtplib's exceptions never leave this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiosmtplib

from relay.outcome import make_reply
from store import DeliveryJob, Reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    command: float
    data: float


@dataclass(frozen=True, slots=True)
class SessionResult:
    """Either `replies` (recipient id → the reply it got) or a session-level `failure`."""

    host: str
    address: str
    replies: dict[int, Reply]
    failure: Reply | None = None
    tls: str | None = None


async def send(
    job: DeliveryJob,
    host: str,
    address: str,
    port: int,
    local_hostname: str,
    timeouts: Timeouts,
) -> SessionResult:
    """Run one transaction for `job`'s recipients against `address` (which is `host`'s)."""
    smtp = aiosmtplib.SMTP(
        hostname=address,
        port=port,
        local_hostname=local_hostname,
        timeout=timeouts.command,
        start_tls=False,
        validate_certs=False,
    )

    def failed(code: int, enhanced: str, text: str) -> SessionResult:
        reply = Reply(code=code, enhanced=enhanced, text=text)
        return SessionResult(host=host, address=address, replies={}, failure=reply)

    try:
        await smtp.connect(timeout=timeouts.connect)
    except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        return failed(451, "4.4.1", f"connect to {host}[{address}]:{port} failed: {exc}")
    except aiosmtplib.SMTPConnectResponseError as exc:
        reply = make_reply(exc.code, exc.message)
        return SessionResult(host=host, address=address, replies={}, failure=reply)
    tls: str | None = None
    try:
        await smtp.ehlo()
        if smtp.supports_extension("starttls"):
            await smtp.starttls(server_hostname=host, validate_certs=False)
            tls = str(smtp.get_transport_info("ssl_object").version())
            await smtp.ehlo()
        try:
            await smtp.mail(job.mail_from)
        except aiosmtplib.SMTPSenderRefused as exc:
            reply = make_reply(exc.code, exc.message)
            return SessionResult(host=host, address=address, replies={}, failure=reply, tls=tls)
        replies: dict[int, Reply] = {}
        accepted: list[int] = []
        for rcpt in job.recipients:
            try:
                resp = await smtp.rcpt(rcpt.email)
            except aiosmtplib.SMTPRecipientRefused as exc:
                replies[rcpt.id] = make_reply(exc.code, exc.message)
            else:
                replies[rcpt.id] = make_reply(resp.code, resp.message)
                accepted.append(rcpt.id)
        if accepted:
            try:
                resp = await smtp.data(job.content, timeout=timeouts.data)
                final = make_reply(resp.code, resp.message)
            except aiosmtplib.SMTPDataError as exc:
                final = make_reply(exc.code, exc.message)
            # The reply after the final dot is every accepted recipient's outcome.
            for rid in accepted:
                replies[rid] = final
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            pass
        return SessionResult(host=host, address=address, replies=replies, tls=tls)
    except aiosmtplib.SMTPResponseException as exc:
        reply = make_reply(exc.code, exc.message)
        return SessionResult(host=host, address=address, replies={}, failure=reply, tls=tls)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        return failed(451, "4.4.2", f"{host}[{address}] lost the connection: {exc}")
    finally:
        smtp.close()
