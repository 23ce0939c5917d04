"""Request and response bodies of the HTTP API (pydantic lives at the edges only)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from store import (
    ALL_EVENTS,
    AttemptResult,
    Event,
    EventType,
    Message,
    Recipient,
    WebhookAttempt,
    WebhookEndpoint,
    format_time,
)

# A pragmatic addr-spec: no whitespace, controls, angle brackets or commas; one @; a dotted or
# bracketed domain. RFC 5321 length limits: 64 for the local part, 254 for the whole path.
_ADDR = re.compile(r"^[^\s<>(),;:\"@\x00-\x1f\x7f]+@[^\s<>(),;:\"@\x00-\x1f\x7f]+$")


def check_address(value: str) -> str:
    if not _ADDR.match(value):
        raise ValueError("not a valid email address")
    local, _, domain = value.rpartition("@")
    if len(local) > 64 or len(value) > 254:
        raise ValueError("email address too long (RFC 5321 limits)")
    if domain.startswith(".") or ".." in domain:
        raise ValueError("not a valid email address domain")
    return value


_NAME_ADDR = re.compile(r'^\s*(?:"(?:[^"\\]|\\.)*"|[^<>"@,;:]*?)\s*<([^<>]+)>\s*$')


def mailbox_address(value: str) -> str:
    """The address of a bare address or a name-addr (`"Acme" <no-reply@acme.test>`)."""
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    m = _NAME_ADDR.match(value)
    return check_address(m.group(1) if m else value.strip())


def check_mailbox(value: str) -> str:
    mailbox_address(value)
    return value


def _no_controls(value: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    return value


Address = Annotated[str, AfterValidator(check_address)]
Mailbox = Annotated[str, AfterValidator(check_mailbox)]
HeaderText = Annotated[str, AfterValidator(_no_controls)]


class SendRequest(BaseModel):
    """`POST /v1/messages`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False)

    from_: Mailbox = Field(alias="from")
    to: list[Address] = Field(min_length=1, max_length=100)
    subject: HeaderText = Field(max_length=998)
    text: str | None = None
    html: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _to_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("to"), str):
            data = {**data, "to": [data["to"]]}
        return data

    @model_validator(mode="after")
    def _has_body(self) -> SendRequest:
        if self.text is None and self.html is None:
            raise ValueError("text or html is required")
        return self


class LastReply(BaseModel):
    code: int
    enhanced: str | None
    text: str


class RecipientOut(BaseModel):
    email: str
    status: str
    attempts: int
    last_reply: LastReply | None
    next_attempt_at: str | None
    delivered_at: str | None

    @classmethod
    def of(cls, rcpt: Recipient) -> RecipientOut:
        reply = rcpt.last_reply
        return cls(
            email=rcpt.email,
            status=rcpt.status.value,
            attempts=rcpt.attempts,
            last_reply=(
                LastReply(code=reply.code, enhanced=reply.enhanced, text=reply.text)
                if reply
                else None
            ),
            next_attempt_at=_time(rcpt.next_attempt_at),
            delivered_at=_time(rcpt.delivered_at),
        )


class EventOut(BaseModel):
    id: str
    type: str
    created_at: str
    recipient: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, event: Event) -> EventOut:
        return cls(
            id=event.public_id,
            type=event.type.value,
            created_at=format_time(event.created_at),
            recipient=event.recipient,
            data=dict(event.data),
        )


class MessageOut(BaseModel):
    """The shape of `GET /v1/messages/{id}` and `postroom queue show ID --json`."""

    id: str
    status: str
    created_at: str
    from_: str = Field(serialization_alias="from")
    subject: str
    recipients: list[RecipientOut]
    events: list[EventOut]

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls(
            id=message.id,
            status=message.status.value,
            created_at=format_time(message.created_at),
            from_=message.from_header or message.mail_from,
            subject=message.subject,
            recipients=[RecipientOut.of(r) for r in message.recipients],
            events=[EventOut.of(e) for e in message.events],
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class AcceptedOut(BaseModel):
    id: str
    status: str
    created_at: str


def _time(ts: float | None) -> str | None:
    return None if ts is None else format_time(ts)


# -- events and webhooks ------------------------------------------------------------------------


class EventItemOut(BaseModel):
    """One event in `GET /v1/events`, the stream and `postroom events tail --json`."""

    id: str
    type: str
    created_at: str
    message_id: str | None
    recipient: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, event: Event) -> EventItemOut:
        message_id = event.message_id or event.data.get("message_id")
        return cls(
            id=event.public_id,
            type=event.type.value,
            created_at=format_time(event.created_at),
            message_id=message_id if isinstance(message_id, str) else None,
            recipient=event.recipient,
            data=dict(event.data),
        )


class EventPageOut(BaseModel):
    data: list[EventItemOut]
    next_cursor: str | None


def _event_types(value: Any) -> Any:
    if value == ALL_EVENTS:
        return [ALL_EVENTS]
    return value


def _check_event_types(value: list[str]) -> list[str]:
    known = {e.value for e in EventType}
    for item in value:
        if item != ALL_EVENTS and item not in known:
            raise ValueError(f"unknown event type {item!r}")
    if ALL_EVENTS in value:
        return [ALL_EVENTS]
    return list(dict.fromkeys(value))


EventTypes = Annotated[
    list[str],
    BeforeValidator(_event_types),
    Field(min_length=1, max_length=50),
    AfterValidator(_check_event_types),
]
WebhookUrl = Annotated[str, Field(min_length=1, max_length=2048)]


class WebhookCreate(BaseModel):
    """`POST /v1/webhooks`."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: EventTypes = [ALL_EVENTS]
    description: str = Field(default="", max_length=500)
    enabled: bool = True


class WebhookPatch(BaseModel):
    """`PATCH /v1/webhooks/{id}`: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl | None = None
    events: EventTypes | None = None
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> WebhookOut:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=list(endpoint.event_types),
            description=endpoint.description,
            enabled=endpoint.is_enabled,
            disabled_reason=endpoint.disabled_reason,
            created_at=format_time(endpoint.created_at),
            updated_at=format_time(endpoint.updated_at),
        )


class WebhookSecretOut(WebhookOut):
    """An endpoint with its new signing secret: at creation and rotation only."""

    secret: str


class AttemptOut(BaseModel):
    """One entry of `GET /v1/webhooks/{id}/deliveries`, or the result of a test send."""

    event_id: str | None
    event_type: str
    attempt: int
    status_code: int | None
    success: bool
    latency_ms: int
    error: str | None
    created_at: str

    @classmethod
    def of(cls, attempt: WebhookAttempt) -> AttemptOut:
        return cls(
            event_id=attempt.event_id,
            event_type=attempt.event_type,
            attempt=attempt.attempt,
            status_code=attempt.status_code,
            success=AttemptResult(attempt.status_code, attempt.latency).is_success,
            latency_ms=round(attempt.latency * 1000),
            error=attempt.error,
            created_at=format_time(attempt.created_at),
        )


class ReplayRequest(BaseModel):
    """`POST /v1/webhooks/{id}/replay`: the events from one event id, or from a time, on."""

    model_config = ConfigDict(extra="forbid")

    event_id: str | None = None
    since: AwareDatetime | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ReplayRequest:
        if (self.event_id is None) == (self.since is None):
            raise ValueError("give either event_id or since")
        return self
