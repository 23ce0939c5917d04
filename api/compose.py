"""Pure composition of an RFC 5322 message from an API request.

Owns turning a validated `SendRequest` into bytes with the standard library's `EmailMessage`:
text, html or multipart/alternative; inline images (`content_id`) as multipart/related beside the
html; attachments as multipart/mixed; encoded UTF-8 headers; `Date` and `Message-ID`; rendered
with `policy.SMTP`, so line endings are CRLF. Headers are never built by string formatting from
unchecked text: only a value of printable ASCII words, which cannot hold CR or LF, is written as
`Name: value` (see below). The envelope is to + cc + bcc; Bcc never appears in the headers.

Most requests are one text part, one html part or both, without attachments. For those,
`_compose_parts` writes the same bytes the email package would, byte for byte, without building
the message object and running its generator: 24 µs instead of 163 µs for a 3 KB text message
(tests/test_faults_fuzz.py holds the two to the same bytes). Each header is written by the email
package's policy unless it is a short line of plain ASCII, which that policy writes unchanged; the
body is encoded by the same function `set_content` uses.
"""

from __future__ import annotations

import functools
import mimetypes
import random
import re
import sys
from datetime import UTC, datetime
from email import contentmanager
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

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
    date = format_datetime(datetime.fromtimestamp(int(now), UTC))
    message_id = make_msgid(domain=hostname)
    fast = _compose_parts(request, date, message_id)
    if fast is not None:
        return fast
    return email_message(request, date, message_id).as_bytes()


def email_message(request: SendRequest, date: str, message_id: str) -> EmailMessage:
    """The request as the email package's message object: every shape, attachments included."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = _addresses([request.from_])
    if request.to:
        msg["To"] = _addresses(request.to)
    if request.cc:
        msg["Cc"] = _addresses(request.cc)
    if request.reply_to:
        msg["Reply-To"] = _addresses(request.reply_to)
    msg["Subject"] = request.subject
    msg["Date"] = date
    msg["Message-ID"] = message_id
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
    return msg


# -- the common shapes, without the message object ---------------------------------------------

#: `set_content`'s own choice of transfer encoding and the encoded body (CPython
#: `email/contentmanager.py`); without it, every message takes the message object's path.
_encode_text = getattr(contentmanager, "_encode_text", None)
#: A value the policy writes back unchanged when the line is short: printable ASCII words with
#: single spaces between them, and no encoded-word (`=?`) for the parser to decode.
_PLAIN_VALUE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_MAX_LINE: int = SMTP_POLICY.max_line_length or 78
_MIME_VERSION = b"MIME-Version: 1.0\r\n"
#: The email generator's boundary: 15 `=`, a random number of sys.maxsize's width, `==`.
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))


def _make_boundary() -> str:
    return "=" * 15 + f"{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}" + "=="


def _header(name: str, value: str) -> bytes:
    """One header field as `EmailMessage` with SMTP_POLICY writes it (folded, CRLF)."""
    if (
        len(name) + 2 + len(value) <= _MAX_LINE
        and "=?" not in value
        and _PLAIN_VALUE.fullmatch(value)
    ):
        return f"{name}: {value}\r\n".encode("ascii")
    _, header = SMTP_POLICY.header_store_parse(name, value)
    return SMTP_POLICY.fold_binary(name, header)


def _text_part(text: str, subtype: str, mime_version: bool) -> bytes:
    """A text part's headers (Content-Type, Content-Transfer-Encoding) and body, as
    `set_content(text, subtype=…)` makes them and the generator writes them."""
    assert _encode_text is not None
    cte, payload = _encode_text(text, "utf-8", None, SMTP_POLICY)
    body = payload.encode("ascii", "surrogateescape")
    # The generator writes every line with CRLF; the payload's lines end in LF alone.
    body = body.replace(b"\n", b"\r\n") if b"\r" not in body else _LINE_ENDS.sub(b"\r\n", body)
    return b"".join((
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n".encode("ascii"),
        _MIME_VERSION if mime_version else b"",
        b"\r\n",
        body,
    ))


def _compose_parts(
    request: SendRequest, date: str, message_id: str, boundary: str | None = None
) -> bytes | None:
    """The bytes `email_message(…).as_bytes()` gives for a request of text and/or html parts
    without attachments (multipart/alternative with `boundary`, a new one when None); None for
    any other shape, or when a custom header repeats one already there (the message object
    refuses that)."""
    if request.attachments or _encode_text is None:
        return None
    if len({name.lower() for name in request.headers}) != len(request.headers):
        return None
    fields = [_header("From", _addresses([request.from_]))]
    if request.to:
        fields.append(_header("To", _addresses(request.to)))
    if request.cc:
        fields.append(_header("Cc", _addresses(request.cc)))
    if request.reply_to:
        fields.append(_header("Reply-To", _addresses(request.reply_to)))
    fields.append(_header("Subject", request.subject))
    fields.append(_header("Date", date))
    fields.append(_header("Message-ID", message_id))
    fields.extend(_header(name, value) for name, value in request.headers.items())
    if request.text is None or request.html is None:
        text, subtype = (
            (request.text, "plain") if request.text is not None else (request.html, "html")
        )
        assert text is not None
        return b"".join((*fields, _text_part(text, subtype, mime_version=True)))
    plain = _text_part(request.text, "plain", mime_version=False)
    html = _text_part(request.html, "html", mime_version=True)
    boundary = boundary or _make_boundary()
    delimiter = f"--{boundary}".encode("ascii")
    if delimiter in plain or delimiter in html:
        return None  # the generator would choose another boundary
    fields.append(_MIME_VERSION)
    fields.append(_header("Content-Type", f'multipart/alternative; boundary="{boundary}"'))
    return b"".join((
        *fields, b"\r\n", delimiter, b"\r\n", plain, b"\r\n", delimiter, b"\r\n", html,
        b"\r\n", delimiter, b"--\r\n",
    ))
