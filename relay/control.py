"""Submission control headers: what an SMTP client tells Postroom inside the message itself.

Owns reading and stripping the `Postroom-*` header fields of a submitted message — the SMTP door's
equivalent of the API's `idempotency_key`, `tags`, `metadata`, `message_type`, `priority` and
`scheduled_at`. They are read once at submission and removed before the message is stored, so no
recipient ever sees them and the bytes signed later are the bytes sent. Pure: no I/O, the clock is
passed in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from store import IdempotencyKey, MessageType, Priority, Tag

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_PREFIX = "postroom-"
_METADATA = "postroom-metadata-"
_TOKEN = re.compile(r"^[\x21-\x7e]{1,255}$")  # an idempotency key: printable ASCII, no spaces
_MAX_TEXT = 256
_MAX_TAGS = 50
_MAX_METADATA = 50

E = TypeVar("E", MessageType, Priority)


class ControlError(ValueError):
    """A control header is unknown or its value is not valid (the client's mistake)."""


@dataclass(frozen=True, slots=True)
class Controls:
    tags: tuple[Tag, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    message_type: MessageType = MessageType.TRANSACTIONAL
    priority: Priority = Priority.NORMAL
    scheduled_at: float | None = None
    idempotency_key: str | None = None


def read_controls(content: bytes, now: float) -> tuple[bytes, Controls]:
    """The message without its `Postroom-*` fields, and what they said."""
    end = _HEADER_END.search(content)
    # The head keeps its blank line, so that dropping fields never touches the body.
    head, body = (content[: end.end()], content[end.end() :]) if end else (content, b"")
    kept: list[bytes] = []
    found: list[tuple[str, str]] = []
    for raw in _fields(head):
        name, colon, value = raw.partition(b":")
        if not colon:  # the blank line, or a line that is no header field: kept as it is
            kept.append(raw)
            continue
        text = name.decode("ascii", "replace").strip()
        if text.lower().startswith(_PREFIX):
            unfolded = b" ".join(part.strip() for part in value.splitlines())
            found.append((text, unfolded.decode("utf-8", "replace").strip()))
        else:
            kept.append(raw)
    if not found:
        return content, Controls()
    return b"".join(kept) + body, _interpret(found, now)


def fingerprint(mail_from: str, recipients: Sequence[str], content: bytes) -> bytes:
    """What makes two submissions "the same request" for an idempotency key."""
    digest = hashlib.sha256()
    digest.update(mail_from.encode("utf-8", "surrogateescape") + b"\0")
    for rcpt in recipients:
        digest.update(rcpt.lower().encode("utf-8", "surrogateescape") + b"\0")
    digest.update(re.sub(rb"\r\n|\r|\n", b"\r\n", content))
    return digest.digest()


def idempotency_key(
    controls: Controls, mail_from: str, recipients: Sequence[str], content: bytes
) -> IdempotencyKey | None:
    """The message's idempotency key, if it named one; the fingerprint is computed only then
    (hashing a whole message that carries no key would be work for nothing)."""
    if controls.idempotency_key is None:
        return None
    return IdempotencyKey(controls.idempotency_key, fingerprint(mail_from, recipients, content))


def _fields(head: bytes) -> list[bytes]:
    """Header fields with their continuation lines (RFC 5322 §2.2.3 folding), line ends kept."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _interpret(found: list[tuple[str, str]], now: float) -> Controls:
    tags: list[Tag] = []
    metadata: dict[str, str] = {}
    message_type = MessageType.TRANSACTIONAL
    priority = Priority.NORMAL
    scheduled_at: float | None = None
    key: str | None = None
    for name, value in found:
        lower = name.lower()
        if lower.startswith(_METADATA):
            metadata[_text(name[len(_METADATA) :], name)] = _text(value, name)
        elif lower == "postroom-tags":
            tags.extend(_tag(item.strip(), name) for item in value.split(",") if item.strip())
        elif lower == "postroom-message-type":
            message_type = _choice(MessageType, value, name)
        elif lower == "postroom-priority":
            priority = _choice(Priority, value, name)
        elif lower == "postroom-scheduled-at":
            scheduled_at = _future_time(value, name, now)
        elif lower == "postroom-idempotency-key":
            if not _TOKEN.match(value):
                raise ControlError(f"{name} must be 1 to 255 printable ASCII characters")
            key = value
        else:
            raise ControlError(f"unknown control header {name}")
    if len(tags) > _MAX_TAGS or len(metadata) > _MAX_METADATA:
        raise ControlError(f"at most {_MAX_TAGS} tags and {_MAX_METADATA} metadata fields")
    return Controls(tuple(tags), metadata, message_type, priority, scheduled_at, key)


def _text(value: str, name: str) -> str:
    if not value or len(value) > _MAX_TEXT or any(ord(c) < 32 for c in value):
        raise ControlError(f"{name} needs 1 to {_MAX_TEXT} printable characters")
    return value


def _tag(item: str, name: str) -> Tag:
    tag, eq, value = item.partition("=")
    return Tag(_text(tag.strip(), name), _text(value.strip(), name) if eq else None)


def _choice(kind: type[E], value: str, name: str) -> E:
    try:
        return kind(value.strip().lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ControlError(f"{name} must be one of: {allowed}") from None


def _future_time(value: str, name: str, now: float) -> float:
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ControlError(f"{name} must be an ISO 8601 time with a time zone") from None
    if when.tzinfo is None:
        raise ControlError(f"{name} must be an ISO 8601 time with a time zone")
    if when.timestamp() <= now:
        raise ControlError(f"{name} must be in the future")
    return when.timestamp()
