"""Bounce messages: the delivery status notification (DSN, RFC 3464) for recipients that failed.

Owns two pure functions: `failures_to_report` decides whether an attempt's outcomes call for a
DSN (the setting is on, the message came in over SMTP, its envelope sender is not null, some
recipient is final-failed), and `compose` turns the facts of that failure into the DSN's bytes
(multipart/report, RFC 6522). The delivery engine hands the bytes to the spool's one intake
with a null envelope sender; no I/O or clock here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate

from store import SMTP_POLICY, RecipientStatus, Reply, Source

#: The final statuses a DSN reports: both are RFC 3464 `Action: failed` (§2.3.3) — `bounced`
#: was refused by (or never reached) the remote side, `failed` could not be tried at all.
FAILED_STATUSES = frozenset({RecipientStatus.BOUNCED, RecipientStatus.FAILED})

#: The local part of the DSN's From: at `server.hostname` (RFC 5321 §4.5.5: the MTA's own).
SENDER_LOCAL_PART = "MAILER-DAEMON"

# The original message's header is returned, never its body; a message without an empty line
# is all header, so the copy is bounded (cut at a line end).
_MAX_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient to report: its address and the reply that made it final."""

    email: str
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class Failure:
    """The facts a DSN states about one attempt of one message."""

    queue_id: str  # the original message's id
    envelope_sender: str  # the DSN's recipient
    reporting_host: str  # `server.hostname`
    arrival: float  # when the original message was accepted (UNIX time)
    now: float  # the DSN's Date:
    recipients: tuple[FailedRecipient, ...]
    original: bytes  # the original message as stored (CRLF); only its header is used
    #: The host that gave the replies (Remote-MTA); "" when no host answered (no route, no
    #: connection, or Postroom could not try).
    remote_mta: str = ""


def failures_to_report(
    is_enabled: bool,
    source: Source,
    mail_from: str,
    outcomes: Sequence[tuple[str, RecipientStatus, Reply | None]],
) -> tuple[FailedRecipient, ...]:
    """The recipients a DSN reports for one attempt's (email, status, reply)s; () for none.

    Only SMTP-submitted mail gets a DSN: API mail reports failures through its events and
    webhooks, and its caller never gave an address to send a bounce to. A null envelope sender
    (`<>`, stored as "") gets none, ever (RFC 5321 §4.5.5, RFC 3464 §2): that is what keeps a
    DSN, itself sent from `<>`, from bouncing in a loop.
    """
    if not is_enabled or source is not Source.SMTP or not mail_from:
        return ()
    return tuple(
        FailedRecipient(email, reply) for email, status, reply in outcomes
        if status in FAILED_STATUSES
    )


def status_code(reply: Reply | None) -> str:
    """The RFC 3463 status of a failed recipient: the reply's enhanced code, else its class."""
    if reply is None:
        return "5.0.0"
    if reply.enhanced:
        return reply.enhanced
    # A `failed` action may follow a 4xx (retries spent, message expired): the class stays.
    return "4.0.0" if 400 <= reply.code < 500 else "5.0.0"


def diagnostic_code(reply: Reply | None, remote_mta: str) -> str | None:
    """The Diagnostic-Code value: `smtp;` for a remote host's reply, Postroom's own otherwise."""
    if reply is None:
        return None
    text = _ascii(_reply_text(reply))
    return f"smtp; {text}" if remote_mta else f"X-Postroom; {text}"


def compose(failure: Failure) -> bytes:
    """The DSN as RFC 5322 bytes (CRLF): a human-readable part, message/delivery-status, and
    the original header as text/rfc822-headers, in one multipart/report (RFC 6522).

    Raises ValueError for a header value the email package refuses (CR/LF in an address).
    """
    host = failure.reporting_host
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = Address("Mail Delivery System", SENDER_LOCAL_PART, host)
    msg["To"] = failure.envelope_sender
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = formatdate(failure.now, localtime=False, usegmt=True)
    # Deterministic: one DSN per (message, attempt time); no randomness in a pure function.
    msg["Message-ID"] = f"<dsn.{failure.queue_id}.{int(failure.now * 1000)}@{host}>"
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5: no auto-responder answers it
    msg.set_content(_human_text(failure))
    msg.make_mixed()
    msg.attach(_delivery_status(failure))
    headers = EmailMessage(policy=SMTP_POLICY)
    headers.set_content(_original_header(failure.original), subtype="rfc822-headers")
    del headers["MIME-Version"]  # set_content adds it; a body part does not carry it
    msg.attach(headers)
    # RFC 6522 §3: multipart/report with report-type.
    msg.set_type("multipart/report")
    msg.set_param("report-type", "delivery-status")
    # A boundary of our own, not the email package's random one: the same facts give the same
    # bytes. It is a digest of the returned header, so that header cannot contain it.
    digest = hashlib.sha256(failure.original[:_MAX_HEADERS] + failure.queue_id.encode())
    msg.set_boundary(f"=_dsn_{digest.hexdigest()[:32]}")
    return msg.as_bytes()


def _human_text(failure: Failure) -> str:
    lines = [
        f"This is the mail system at host {failure.reporting_host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It will not be tried again. The mail system's reasons follow.",
        "",
    ]
    for rcpt in failure.recipients:
        reason = _reply_text(rcpt.reply) or "no reason recorded"
        where = f" (host {failure.remote_mta} said)" if failure.remote_mta and rcpt.reply else ""
        lines.append(f"<{rcpt.email}>{where}: {reason}")
    lines += ["", f"Queue id: {failure.queue_id}", ""]
    return "\n".join(lines)


def _delivery_status(failure: Failure) -> EmailMessage:
    """The message/delivery-status part: a per-message block, then one block per recipient.

    The email package renders this content type from a list of header blocks (its generator's
    `_handle_message_delivery_status`), so each block is an EmailMessage holding fields only.
    """
    per_message = EmailMessage(policy=SMTP_POLICY)
    per_message["Reporting-MTA"] = f"dns; {failure.reporting_host}"
    per_message["X-Postroom-Queue-ID"] = failure.queue_id
    per_message["Arrival-Date"] = formatdate(failure.arrival, localtime=False, usegmt=True)
    blocks = [per_message]
    for rcpt in failure.recipients:
        block = EmailMessage(policy=SMTP_POLICY)
        block["Final-Recipient"] = f"rfc822; {rcpt.email}"
        block["Action"] = "failed"
        block["Status"] = status_code(rcpt.reply)
        if failure.remote_mta:
            block["Remote-MTA"] = f"dns; {failure.remote_mta}"
        if (diagnostic := diagnostic_code(rcpt.reply, failure.remote_mta)) is not None:
            block["Diagnostic-Code"] = diagnostic
        blocks.append(block)
    part = EmailMessage(policy=SMTP_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Transfer-Encoding"] = "7bit"
    part.set_payload(blocks)  # type: ignore[arg-type]  # a list of blocks, see the docstring
    return part


def _original_header(original: bytes) -> str:
    end = original.find(b"\r\n\r\n")
    header = original[: end + 2] if end >= 0 else original
    if len(header) > _MAX_HEADERS:
        header = header[: header.rfind(b"\r\n", 0, _MAX_HEADERS) + 2]
    # The header as text; 8-bit bytes that are not UTF-8 become U+FFFD, never an error.
    return header.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _reply_text(reply: Reply | None) -> str:
    """`550 5.1.1 No such user`, as the reply was given."""
    if reply is None:
        return ""
    return " ".join(w for w in (str(reply.code), reply.enhanced or "", reply.text) if w)


def _ascii(text: str) -> str:
    """A reply text as DSN field text: ASCII only (RFC 3464 §2.1.2), control characters gone."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
