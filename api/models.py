"""Request and response bodies of the HTTP API (pydantic lives at the edges only)."""

from __future__ import annotations

import base64
import binascii
import functools
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from api.errors import Detail, ValidationFailed
from store import (
    ALL_EVENTS,
    AttemptResult,
    DnsRecord,
    DomainKeys,
    Event,
    EventType,
    Message,
    MessageChange,
    Recipient,
    RecipientStatus,
    RecordStatus,
    StatsGroup,
    StatsGrouping,
    Suppression,
    Tag,
    Template,
    WebhookAttempt,
    WebhookEndpoint,
    format_time,
    normalise_domain,
)

# RFC 5321 §4.1.2 local parts: a dot-atom, or a quoted string of printable ASCII.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NAME_ADDR = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^<>"]*?))\s*<([^<>]*)>\s*$')
# CR, LF and NUL, and every other character Python's `str.splitlines` breaks a line at: the
# email package folds headers with it, so EmailMessage refuses a header value holding one.
_CONTROLS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_HAS_CONTROL = re.compile(f"[{re.escape(_CONTROLS)}]")


def _no_controls(value: str) -> str:
    if _HAS_CONTROL.search(value):
        raise ValueError("must not contain CR, LF, NUL or another line break")
    return value


def _is_utf8(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(key: str) -> str:
    """A dict key as a path segment that can itself be rendered: `\\ud800` for a surrogate."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def unencodable_paths(body: object) -> list[str]:
    """The paths (`tags[0].name`, `metadata.k`) of strings in a parsed JSON body that UTF-8
    cannot encode.

    `json.loads` turns `"\\ud800"` into a lone surrogate; pydantic's `str` accepts it, and the
    first response that renders it fails. One walk over the raw body refuses it in every field,
    dict keys included, before any model sees it. Iterative: bodies may nest deeply.
    """
    found: list[str] = []
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                found.append(path or "body")
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                name = f"{path}.{_escaped(key)}" if path else _escaped(key)
                stack.append((name, item))
                if not _is_utf8(key):
                    stack.append((name, key))
    return list(dict.fromkeys(found))


UNENCODABLE = "must be valid Unicode text (a lone surrogate such as \\ud800 is not)"


def refuse_unencodable(body: object) -> None:
    """422 naming every field that holds a string UTF-8 cannot encode (a lone surrogate).

    Every route that reads a JSON body calls this before its model sees the body: pydantic
    refuses a surrogate in some `str` fields with a message that names no cause, accepts it in
    others (`str | None`, dict keys), and what it accepts fails at the first render.
    """
    if paths := unencodable_paths(body):
        raise ValidationFailed(details=[Detail(path, UNENCODABLE) for path in paths])


def normalise_address(value: str) -> str:
    """A checked addr-spec with its domain in ASCII (IDNA), as the envelope needs it.

    Syntax per RFC 5321 §4.1.2 (no address literals), lengths per §4.5.3.1: 64 octets of local
    part, 255 of domain, 254 for the whole path between the angle brackets.
    """
    _no_controls(value)
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError("not a valid email address")
    if not local.isascii():
        raise ValueError("non-ASCII local parts are not supported")
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise ValueError("not a valid email address")
    if len(local) > 64:
        raise ValueError("the local part is longer than 64 characters (RFC 5321)")
    try:
        ascii_domain = normalise_domain(domain)
    except ValueError:
        raise ValueError("not a valid email address domain") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("not a valid email address domain")
    address = f"{local}@{ascii_domain}"
    if len(address) > 254:
        raise ValueError("the address is longer than 254 characters (RFC 5321)")
    return address


def parse_mailbox(value: str) -> tuple[str, str]:
    """(display name, ASCII address) of a bare address or a name-addr (`"Acme" <a@acme.test>`).

    A request's addresses are parsed by validation, by composition and for the envelope (six
    times for a one-recipient message), and a batch repeats its sender on every item: the last
    few thousand of usual length are remembered.
    """
    if len(value) <= _REMEMBERED_MAILBOX:
        return _remembered_mailbox(value)
    return _parse_mailbox(value)


_REMEMBERED_MAILBOX = 512


@functools.lru_cache(maxsize=4096)
def _remembered_mailbox(value: str) -> tuple[str, str]:
    return _parse_mailbox(value)


def _parse_mailbox(value: str) -> tuple[str, str]:
    _no_controls(value)
    m = _NAME_ADDR.match(value)
    if m is None:
        return "", normalise_address(value)
    quoted, bare, address = m.groups()
    name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else (bare or "").strip()
    if len(name) > 256:
        raise ValueError("the display name is longer than 256 characters")
    return name, normalise_address(address)


def mailbox_address(value: str) -> str:
    """The ASCII address of a bare address or a name-addr."""
    return parse_mailbox(value)[1]


def check_mailbox(value: str) -> str:
    parse_mailbox(value)
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# Headers Postroom writes itself (or that only MTAs may add): a custom header may not set them.
OWNED_HEADERS = frozenset(
    {
        "from", "to", "cc", "bcc", "subject", "date", "message-id", "sender", "reply-to",
        "dkim-signature", "received", "return-path", "mime-version",
    }
)
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 §3.6.8 ftext


def check_header_name(value: str) -> str:
    if not _FIELD_NAME.match(value):
        raise ValueError("not a valid header name")
    lower = value.lower()
    if lower in OWNED_HEADERS or lower.startswith("content-"):
        hint = "; use the reply_to field" if lower == "reply-to" else ""
        raise ValueError(f"{value} is set by Postroom and may not be given{hint}")
    return value


_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")


def check_content_type(value: str) -> str:
    if not _CONTENT_TYPE.match(value):
        raise ValueError("not a MIME type such as application/pdf")
    return value.lower()


def decode_base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


def _iso_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string such as 2030-01-31T09:00:00Z")
    return value


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must include a time zone, e.g. 2030-01-31T09:00:00Z")
    return value


_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


def check_idempotency_key(value: str) -> str:
    if not _IDEMPOTENCY_KEY.match(value):
        raise ValueError("must be 1 to 255 printable ASCII characters")
    return value


Address = Annotated[str, AfterValidator(normalise_address)]
Mailbox = Annotated[str, AfterValidator(check_mailbox)]
Mailboxes = Annotated[list[Mailbox], BeforeValidator(_as_list)]
HeaderText = Annotated[str, AfterValidator(_no_controls)]
BodyText = Annotated[str, AfterValidator(_no_nul)]
ShortText = Annotated[str, AfterValidator(_no_controls), Field(min_length=1, max_length=256)]
HeaderName = Annotated[str, AfterValidator(check_header_name)]
HeaderValue = Annotated[str, AfterValidator(_no_controls), Field(max_length=998)]
IdempotencyKeyText = Annotated[str, AfterValidator(check_idempotency_key)]


class TagIn(BaseModel):
    """A tag: a bare string, or `{"name", "value"}`."""

    model_config = ConfigDict(extra="forbid")

    name: ShortText
    value: ShortText | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: Annotated[str, AfterValidator(_no_controls), Field(min_length=1, max_length=255)]
    content: Annotated[bytes, BeforeValidator(decode_base64)]
    content_type: Annotated[str, AfterValidator(check_content_type)] | None = None
    #: Set for an inline image that the HTML refers to as `cid:<content_id>`.
    content_id: Annotated[
        str, AfterValidator(_no_controls), Field(min_length=1, max_length=200)
    ] | None = None


class SendRequest(BaseModel):
    """`POST /v1/messages`, and each item of `POST /v1/messages/batch`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False)

    from_: Mailbox = Field(alias="from")
    to: Mailboxes = Field(default_factory=list)
    cc: Mailboxes = Field(default_factory=list)
    bcc: Mailboxes = Field(default_factory=list)
    reply_to: Mailboxes = Field(default_factory=list)
    subject: HeaderText = Field(max_length=998)
    text: BodyText | None = None
    html: BodyText | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    attachments: list[AttachmentIn] = Field(default_factory=list)
    tags: list[TagIn] = Field(default_factory=list, max_length=50)
    metadata: dict[ShortText, Annotated[str, AfterValidator(_no_controls)]] = Field(
        default_factory=dict, max_length=50
    )
    message_type: Literal["transactional", "marketing"] = "transactional"
    priority: Literal["high", "normal", "low"] = "normal"
    scheduled_at: Annotated[
        datetime, BeforeValidator(_iso_string), AfterValidator(_aware)
    ] | None = None
    idempotency_key: IdempotencyKeyText | None = None

    @model_validator(mode="after")
    def _complete(self) -> SendRequest:
        if self.text is None and self.html is None:
            raise ValueError("text or html is required")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient (to, cc or bcc) is required")
        return self


class CompatDestination(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str


class CompatPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str | None = None  # from the template when one is named
    body_html: str | None = None
    body_text: str | None = None


class CompatSendRequest(BaseModel):
    """`POST /v1/send`: the channel-tagged shape, translated to a `SendRequest`."""

    model_config = ConfigDict(extra="forbid")

    channel: str
    idempotency_key: IdempotencyKeyText | None = None
    destination: CompatDestination
    payload: CompatPayload = CompatPayload()
    message_type: Literal["transactional", "marketing"] = "transactional"
    metadata: dict[str, str] = {}
    template_id: str | None = None
    template_vars: dict[str, Any] | None = None
    template: str | None = None  # alias of template_id
    template_data: dict[str, Any] | None = None  # alias of template_vars


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


class TagPair(BaseModel):
    name: str
    value: str


def _tag_out(tag: Tag) -> str | TagPair:
    return tag.name if tag.value is None else TagPair(name=tag.name, value=tag.value)


class MessageSummaryOut(BaseModel):
    """One message in `GET /v1/messages`: everything but its events."""

    id: str
    status: str
    created_at: str
    from_: str = Field(serialization_alias="from")
    subject: str
    recipients: list[RecipientOut]
    tags: list[str | TagPair]
    metadata: dict[str, str]
    message_type: str
    priority: str
    scheduled_at: str | None
    #: Sent with a test-mode key: stored and evented, never sent.
    test: bool

    @classmethod
    def fields_of(cls, message: Message) -> dict[str, Any]:
        return {
            "id": message.id,
            "status": message.status.value,
            "created_at": format_time(message.created_at),
            "from_": message.from_header or message.mail_from,
            "subject": message.subject,
            "recipients": [RecipientOut.of(r) for r in message.recipients],
            "tags": [_tag_out(t) for t in message.tags],
            "metadata": dict(message.metadata),
            "message_type": message.message_type.value,
            "priority": message.priority.value,
            "scheduled_at": _time(message.scheduled_at),
            "test": message.is_test,
        }

    @classmethod
    def of(cls, message: Message) -> MessageSummaryOut:
        return cls(**cls.fields_of(message))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class MessageOut(MessageSummaryOut):
    """The shape of `GET /v1/messages/{id}` and `postroom queue show ID --json`."""

    events: list[EventOut]

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls(
            **cls.fields_of(message), events=[EventOut.of(e) for e in message.events]
        )


class MessagePageOut(BaseModel):
    """`GET /v1/messages`: newest first; pass `next_cursor` as `cursor` for the next page."""

    data: list[MessageSummaryOut]
    next_cursor: str | None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class UnitChangeOut(BaseModel):
    email: str
    status: str
    #: cancelled / rescheduled; in_flight: an attempt holds it; final: nothing left to do.
    result: Literal["cancelled", "rescheduled", "in_flight", "final"]


class MessageChangeOut(BaseModel):
    """`DELETE` and `PATCH /v1/messages/{id}`: the message's status after, and each recipient."""

    id: str
    status: str
    scheduled_at: str | None
    recipients: list[UnitChangeOut]

    @classmethod
    def of(cls, change: MessageChange) -> MessageChangeOut:
        return cls(
            id=change.message.id,
            status=change.message.status.value,
            scheduled_at=_time(change.message.scheduled_at),
            recipients=[
                UnitChangeOut(email=u.email, status=u.status.value, result=u.action.value)
                for u in change.units
            ],
        )


class MessagePatch(BaseModel):
    """`PATCH /v1/messages/{id}`: deliver what has not been sent yet at another time."""

    model_config = ConfigDict(extra="forbid")

    scheduled_at: Annotated[datetime, BeforeValidator(_iso_string), AfterValidator(_aware)]


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
    #: False: caught up; poll again with `next_cursor` as `after`.
    has_more: bool = False


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


# -- stats ----------------------------------------------------------------------------------------


class LatencyOut(BaseModel):
    """Seconds from queued (or the scheduled time) to delivered, nearest-rank percentiles."""

    median: float | None
    p95: float | None


class StatsGroupOut(BaseModel):
    group: str | None
    recipients: int
    #: Recipients by current status (every status, zero included).
    counts: dict[str, int]
    #: bounced / (delivered + bounced); null before any of either.
    bounce_rate: float | None
    #: Recipients deferred at least once / recipients attempted at least once.
    deferral_rate: float | None
    latency_seconds: LatencyOut

    @classmethod
    def of(cls, group: StatsGroup) -> StatsGroupOut:
        return cls(
            group=group.group,
            recipients=group.total,
            counts={s.value: group.counts.get(s, 0) for s in RecipientStatus},
            bounce_rate=_rate(group.bounce_rate),
            deferral_rate=_rate(group.deferral_rate),
            latency_seconds=LatencyOut(
                median=_seconds(group.latency_p50), p95=_seconds(group.latency_p95)
            ),
        )


class StatsOut(BaseModel):
    """`GET /v1/stats` and `postroom stats --json`: recipients of the messages in the window."""

    since: str
    until: str
    group_by: Literal["day", "domain", "tag"] | None
    data: list[StatsGroupOut]

    @classmethod
    def of(
        cls, since: float, until: float, group_by: StatsGrouping | None, groups: list[StatsGroup]
    ) -> StatsOut:
        return cls(
            since=format_time(since),
            until=format_time(until),
            group_by=group_by.value if group_by else None,
            data=[StatsGroupOut.of(g) for g in groups],
        )


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- the rest of the published contract (api/openapi.py) ----------------------------------------


class ErrorDetailOut(BaseModel):
    field: str
    message: str


class ErrorOut(BaseModel):
    """Every error: a stable slug, a sentence for humans, and the fields at fault."""

    error: str
    message: str
    details: list[ErrorDetailOut]


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    ready: bool


class CompatAcceptedOut(AcceptedOut):
    """`POST /v1/send`: the accepted message and the idempotency key it was stored under."""

    idempotency_key: str


class BatchAcceptedOut(AcceptedOut):
    replayed: bool = False  # present and true when an idempotency key replayed it
    idempotency_key: str = ""  # present on the channel-tagged routes


class BatchErrorOut(ErrorOut):
    idempotency_key: str = ""  # present on the channel-tagged routes


class BatchOut(BaseModel):
    """A batch's answer, in the request's order: `200` when all were accepted, else `207`."""

    data: list[BatchAcceptedOut | BatchErrorOut]


class WebhookListOut(BaseModel):
    data: list[WebhookOut]


class WebhookTestOut(BaseModel):
    status_code: int | None
    success: bool
    latency_ms: int
    error: str | None


class DeliveriesOut(BaseModel):
    data: list[AttemptOut]
    next_before: int | None


class ReplayOut(BaseModel):
    queued: int
# -- sending: domains, suppressions, templates ------------------------------------------------

_DOMAIN_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_domain_name(value: str) -> str:
    """A sending domain as stored: ASCII (IDNA), lower case, no trailing dot."""
    try:
        name = normalise_domain(value)
    except ValueError:
        raise ValueError("not a domain name") from None
    if not _DOMAIN_NAME.match(name):
        raise ValueError("not a domain name")
    return name


def check_selector(value: str) -> str:
    selector = value.lower()
    if not _SELECTOR.match(selector):
        raise ValueError("not a DKIM selector (letters, digits and '-')")
    return selector


DomainName = Annotated[str, AfterValidator(check_domain_name)]
Selector = Annotated[str, AfterValidator(check_selector)]
SenderName = Annotated[str, AfterValidator(_no_controls), Field(min_length=1, max_length=256)]


class DomainCreate(BaseModel):
    """`POST /v1/domains`."""

    model_config = ConfigDict(extra="forbid")

    name: DomainName
    selector: Selector = "postroom"
    algorithm: Literal["rsa", "both"] = "rsa"
    default_sender_name: SenderName | None = None


class DomainPatch(BaseModel):
    """`PATCH /v1/domains/{name}`: null removes the default sender name."""

    model_config = ConfigDict(extra="forbid")

    default_sender_name: SenderName | None


class DnsRecordOut(BaseModel):
    type: str
    name: str
    value: str
    status: str
    found: list[str] | None = None
    detail: str | None = None

    @classmethod
    def of(cls, record: DnsRecord) -> DnsRecordOut:
        checked = record.status is not RecordStatus.UNVERIFIED
        return cls(
            type=record.type,
            name=record.name,
            value=record.value,
            status=record.status.value,
            found=list(record.found) if checked else None,
            detail=(record.detail or None) if checked else None,
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DomainOut(BaseModel):
    """A sending domain in the API and `postroom domains show --json` (never its keys)."""

    name: str
    selector: str
    algorithm: str
    default_sender_name: str | None
    created_at: str
    records: list[DnsRecordOut]
    #: `ok`, or `key_damaged` when the stored DKIM key does not decrypt: then no records
    #: (they are derived from the key) and `problem` says how to replace it.
    status: Literal["ok", "key_damaged"] = "ok"
    problem: str | None = None

    @classmethod
    def of(
        cls, keys: DomainKeys, records: list[DnsRecord], problem: str | None = None
    ) -> DomainOut:
        return cls(
            name=keys.name,
            selector=keys.selector,
            algorithm="both" if keys.ed25519_key is not None else "rsa",
            default_sender_name=keys.default_sender_name,
            created_at=format_time(keys.created_at),
            records=[DnsRecordOut.of(r) for r in records],
            status="ok" if problem is None else "key_damaged",
            problem=problem,
        )

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(exclude={"records"})
        data["records"] = [r.to_json() for r in self.records]
        return data


class DomainListOut(BaseModel):
    data: list[DomainOut]


class DomainVerifyOut(DomainOut):
    """`POST /v1/domains/{name}/verify`: the records as found in DNS now."""

    verified: bool


def _lower_address(value: str) -> str:
    return normalise_address(value).lower()


SuppressedAddress = Annotated[str, AfterValidator(_lower_address)]


class SuppressionCreate(BaseModel):
    """`POST /v1/suppressions`: one address, or `{"emails": [...]}` for several."""

    model_config = ConfigDict(extra="forbid")

    email: SuppressedAddress | None = None
    emails: list[SuppressedAddress] = Field(default=[], max_length=10_000)
    reason: Literal["hard_bounce", "complaint", "unsubscribe", "manual"] = "manual"
    expires_at: AwareDatetime | None = None
    message_id: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _some(self) -> SuppressionCreate:
        if self.email is None and not self.emails:
            raise ValueError("give email or emails")
        return self

    @property
    def addresses(self) -> list[str]:
        found = ([self.email] if self.email else []) + self.emails
        return list(dict.fromkeys(found))


class SuppressionOut(BaseModel):
    email: str
    reason: str
    message_id: str | None
    reply: LastReply | None
    created_at: str
    expires_at: str | None

    @classmethod
    def of(cls, entry: Suppression) -> SuppressionOut:
        reply = entry.reply
        return cls(
            email=entry.email,
            reason=entry.reason,
            message_id=entry.message_id,
            reply=(
                LastReply(code=reply.code, enhanced=reply.enhanced, text=reply.text)
                if reply else None
            ),
            created_at=format_time(entry.created_at),
            expires_at=_time(entry.expires_at),
        )


class SuppressionPageOut(BaseModel):
    data: list[SuppressionOut]
    next_cursor: str | None
    has_more: bool


class SuppressionAddOut(BaseModel):
    added: list[str]
    already_suppressed: list[str]


TemplateName = Annotated[
    str, AfterValidator(_no_controls), Field(min_length=1, max_length=200, pattern=r"^\S.*$")
]


class TemplateIn(BaseModel):
    """`POST /v1/templates` and `PUT /v1/templates/{id}`: Jinja2 source of each part."""

    model_config = ConfigDict(extra="forbid")

    name: TemplateName
    subject: Annotated[str, Field(min_length=1, max_length=2000)]
    html: BodyText | None = None
    text: BodyText | None = None

    @model_validator(mode="after")
    def _a_body(self) -> TemplateIn:
        if self.html is None and self.text is None:
            raise ValueError("html or text is required")
        return self


class TemplateOut(BaseModel):
    id: str
    name: str
    subject: str
    html: str | None
    text: str | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, template: Template) -> TemplateOut:
        return cls(
            id=template.id,
            name=template.name,
            subject=template.subject,
            html=template.html,
            text=template.text,
            created_at=format_time(template.created_at),
            updated_at=format_time(template.updated_at),
        )


class TemplateListOut(BaseModel):
    data: list[TemplateOut]
