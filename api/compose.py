"""Pure composition of an RFC 5322 message from an API request.

Owns turning a validated `SendRequest` into bytes with the standard library's `EmailMessage`
(multipart/alternative when both text and html are given, encoded UTF-8 headers, `Date` and
`Message-ID`), rendered with `policy.SMTP` so line endings are CRLF. Headers are never built by
string formatting: `EmailMessage` refuses CR/LF in header values, which the caller maps to a 422.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from api.models import SendRequest, mailbox_address


def envelope_sender(request: SendRequest) -> str:
    """The address part of `from`: the envelope sender of API mail."""
    return mailbox_address(request.from_)


def compose(request: SendRequest, hostname: str) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = request.from_
    msg["To"] = ", ".join(request.to)
    msg["Subject"] = request.subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=hostname)
    if request.text is not None:
        msg.set_content(request.text)
    if request.html is not None:
        if request.text is None:
            msg.set_content(request.html, subtype="html")
        else:
            msg.add_alternative(request.html, subtype="html")
    return msg.as_bytes()
