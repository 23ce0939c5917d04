"""Trace fields for mail submitted over SMTP: `Received:`, and `Message-ID`/`Date` when missing.

Owns what the SMTP door writes into a message's header (RFC 5321 §4.4; the `with` keywords of
RFC 3848) and the check of the client's EHLO name before it may appear there: a name with CR, LF
or other control characters could forge header lines (aiosmtpd passes a bare CR through). Pure:
the time and the new Message-ID are arguments; `relay/submission.py` calls `stamp` and hands the
result to intake, which normalises line endings once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

MAX_HELO_LENGTH = 255  # a domain name's limit (RFC 5321 §4.5.3.1.2)

# A header field name (RFC 5322 §3.6.8) then a colon; a line starting with space or tab continues
# the field before it.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|$)")
# What may appear of a client-supplied name in our header: printable ASCII without the characters
# that would end or nest a comment; anything else is shown as "?" (Postfix's printable(3)).
_UNSAFE = re.compile(r"[^!-'*-~]")


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What a `Received:` header tells about the SMTP session a message came in."""

    helo: str
    client_ip: str
    is_esmtp: bool = True
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    auth_key_id: str | None = None


def is_valid_helo(name: str) -> bool:
    """Whether an EHLO/HELO argument may be recorded: no controls, spaces or undecodable bytes."""
    if not name or len(name) > MAX_HELO_LENGTH:
        return False
    # aiosmtpd decodes with surrogateescape: a lone surrogate stands for a byte that is not UTF-8.
    return not any(ch.isspace() or not ch.isprintable() or "\ud800" <= ch <= "\udfff"
                   for ch in name)


def printable(text: str) -> str:
    return _UNSAFE.sub("?", text)


_last_date: tuple[datetime, str] | None = None


def date_text(now: datetime) -> str:
    """`now` as RFC 5322 writes a date (`email.utils.format_datetime`), made once a second:
    it was a fiftieth of an SMTP worker's CPU per message (profiled under bench/vs_postfix.sh),
    where every message is stamped with the time it arrived."""
    global _last_date
    second = now.replace(microsecond=0)
    last = _last_date
    if last is not None and last[0] == second and last[0].utcoffset() == second.utcoffset():
        return last[1]
    text = format_datetime(second)
    _last_date = (second, text)
    return text


def received_header(
    facts: SessionFacts, *, hostname: str, recipients: Sequence[str], now: datetime
) -> str:
    """One `Received:` field, folded, without the final CRLF. Never carries AUTH data."""
    protocol = "ESMTP" if facts.is_esmtp else "SMTP"
    if facts.is_esmtp:
        protocol += ("S" if facts.tls_version else "") + ("A" if facts.auth_key_id else "")
    literal = f"IPv6:{facts.client_ip}" if ":" in facts.client_ip else facts.client_ip
    lines = [
        f"Received: from {printable(facts.helo)} ([{printable(literal)}])",
        f"by {printable(hostname)} (Postroom) with {protocol}",
    ]
    if facts.tls_version:
        bits = f" ({facts.tls_bits} bits)" if facts.tls_bits else ""
        lines.append(
            f"(using {printable(facts.tls_version)} with cipher "
            f"{printable(facts.tls_cipher or 'unknown')}{bits})"
        )
    if facts.auth_key_id:
        lines.append(f"(authenticated with API key {printable(facts.auth_key_id)})")
    # Name the recipient only when there is one, as Postfix does: never disclose the others.
    target = f"for <{printable(recipients[0])}>" if len(recipients) == 1 else ""
    lines.append(f"{target}; {date_text(now)}".lstrip())
    return "\r\n\t".join(lines)


def header_fields(content: bytes) -> tuple[set[str], int]:
    """The lower-cased field names of the message's header, and where the header ends.

    The header is the run of field lines (and their continuations) at the start; it ends at the
    first line that is neither, usually the empty line before the body. Any line ending counts.
    """
    names: set[str] = set()
    position = 0
    for match in _LINE.finditer(content):
        line = match.group(1)
        if line[:1] in (b" ", b"\t") and names:
            position = match.end()
            continue
        field = _FIELD.match(line)
        if field is None:
            break
        names.add(field.group(1).decode("ascii").lower())
        position = match.end()
        if not match.group(2):
            break
    return names, position


def stamp(
    content: bytes,
    facts: SessionFacts,
    *,
    hostname: str,
    recipients: Sequence[str],
    now: datetime,
    message_id: str,
) -> bytes:
    """The message with our `Received:` on top, and `Message-ID`/`Date` added when missing."""
    names, header_end = header_fields(content)
    fields = [received_header(facts, hostname=hostname, recipients=recipients, now=now)]
    if "message-id" not in names:
        fields.append(f"Message-ID: {message_id}")
    if "date" not in names:
        fields.append(f"Date: {date_text(now)}")
    head = ("\r\n".join(fields) + "\r\n").encode("utf-8")
    if header_end == 0 and not content.startswith((b"\r", b"\n")):
        head += b"\r\n"  # the message had no header at all: keep its first line in the body
    return head + content
