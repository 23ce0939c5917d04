"""Pure composition of an RFC 5322 message from an API request.

Owns turning a validated `SendRequest` into bytes with the standard library's `EmailMessage`:
text, html or multipart/alternative; inline images (`content_id`) as multipart/related beside the
html; attachments as multipart/mixed; encoded UTF-8 headers; `Date` and `Message-ID`; rendered
with `policy.SMTP`, so line endings are CRLF. Headers are never built by string formatting. The
envelope is to + cc + bcc; Bcc never appears in the headers.
"""

from __future__ import annotations

import functools
import mimetypes
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from api.models import AttachmentIn, SendRequest, mailbox_address, parse_mailbox
from store import SMTP_POLICY


def envelope_sender(request: SendRequest) -> str:
    """The address part of `from` (domain in ASCII): the envelope sender of API mail."""
    return mailbox_address(request.from_)


def envelope_recipients(request: SendRequest) -> list[tuple[str, str]]:
    """(field path, ASCII address) of every recipient: to, then cc, then bcc."""
    return [
        (f"{name}[{index}]", mailbox_address(value))
        for name, values in (("to", request.to), ("cc", request.cc), ("bcc", request.bcc))
        for index, value in enumerate(values)
    ]


def _addresses(values: list[str]) -> str:
    """An address-list header's text, each mailbox written by the email package's `Address`.

    Text rather than `Address` objects, because the policy remembers the header it parsed for
    a recent text (store/headers.py): a batch's one sender is parsed once, not per message. The
    bytes rendered are the same either way.
    """
    return ", ".join(_mailbox(value) for value in values)


@functools.lru_cache(maxsize=4096)
def _mailbox(value: str) -> str:
    """One mailbox as header text; remembered, since `Address` parses its addr-spec again."""
    name, address = parse_mailbox(value)
    return str(Address(display_name=name, addr_spec=address))


def _mime_type(attachment: AttachmentIn) -> tuple[str, str]:
    guessed = attachment.content_type or mimetypes.guess_type(attachment.filename)[0]
    maintype, _, subtype = (guessed or "application/octet-stream").partition("/")
    return maintype, subtype


def compose(request: SendRequest, hostname: str, now: float) -> bytes:
    """The message as bytes, CRLF line endings. Raises ValueError for what EmailMessage refuses."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = _addresses([request.from_])
    if request.to:
        msg["To"] = _addresses(request.to)
    if request.cc:
        msg["Cc"] = _addresses(request.cc)
    if request.reply_to:
        msg["Reply-To"] = _addresses(request.reply_to)
    msg["Subject"] = request.subject
    msg["Date"] = formatdate(now, localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=hostname)
    for name, value in request.headers.items():
        msg[name] = value
    if request.text is not None:
        msg.set_content(request.text)
        if request.html is not None:
            msg.add_alternative(request.html, subtype="html")
    elif request.html is not None:
        msg.set_content(request.html, subtype="html")
    html = msg.get_body(("html",)) if request.html is not None else None
    for attachment in request.attachments:
        maintype, subtype = _mime_type(attachment)
        if attachment.content_id and isinstance(html, EmailMessage):
            # An inline image belongs with the html it illustrates (RFC 2387 multipart/related).
            html.add_related(
                attachment.content,
                maintype,
                subtype,
                cid=f"<{attachment.content_id.strip('<>')}>",
                filename=attachment.filename,
                disposition="inline",
            )
            continue
        msg.add_attachment(attachment.content, maintype, subtype, filename=attachment.filename)
        if attachment.content_id:  # no html to relate it to: an attachment with its Content-ID
            *_, last = msg.iter_attachments()
            last["Content-ID"] = f"<{attachment.content_id.strip('<>')}>"
    return msg.as_bytes()
