"""Typed records that cross the spool's boundary, and the status and event vocabularies.

Owns the shapes of everything the spool hands out or takes in: frozen, slotted dataclasses built
from rows with `from_row`, and `StrEnum`s whose values are the strings stored in the database and
sent on the wire. Nothing outside `store/` sees a row or a cursor; it sees these.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar


class RecipientStatus(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"  # internal: an attempt holds the unit's lease; no event
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {
        RecipientStatus.DELIVERED,
        RecipientStatus.BOUNCED,
        RecipientStatus.FAILED,
        RecipientStatus.SUPPRESSED,
        RecipientStatus.CANCELLED,
    }
)
# Least advanced first: a message with pending recipients shows the least advanced of them.
_PENDING_ORDER = (
    RecipientStatus.SCHEDULED,
    RecipientStatus.QUEUED,
    RecipientStatus.DEFERRED,
    RecipientStatus.SENDING,
)


class MessageStatus(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    DEFERRED = "deferred"
    SENDING = "sending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"
    PARTIALLY_DELIVERED = "partially_delivered"


def derive_message_status(statuses: list[RecipientStatus]) -> MessageStatus:
    """A message's status from its recipients' (DESIGN.md, message lifecycle)."""
    pending = [s for s in statuses if not s.is_final]
    if pending:
        least = min(pending, key=_PENDING_ORDER.index)
        return MessageStatus(least.value)
    distinct = set(statuses)
    if len(distinct) == 1:
        return MessageStatus(distinct.pop().value)
    if RecipientStatus.DELIVERED in distinct:
        return MessageStatus.PARTIALLY_DELIVERED
    return MessageStatus.FAILED


class EventType(StrEnum):
    EMAIL_QUEUED = "email.queued"
    EMAIL_SCHEDULED = "email.scheduled"
    EMAIL_DELIVERED = "email.delivered"
    EMAIL_DEFERRED = "email.deferred"
    EMAIL_BOUNCED = "email.bounced"
    EMAIL_FAILED = "email.failed"
    EMAIL_SUPPRESSED = "email.suppressed"
    EMAIL_CANCELLED = "email.cancelled"
    SUPPRESSION_CREATED = "suppression.created"
    SUPPRESSION_DELETED = "suppression.deleted"
    EMAIL_UNSUBSCRIBED = "email.unsubscribed"


class Scope(StrEnum):
    SEND = "send"
    FULL = "full"


class Source(StrEnum):
    SMTP = "smtp"
    API = "api"


class MessageType(StrEnum):
    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """The stored `recipients.priority`: delivery claims higher ranks first."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.HIGH: 10, Priority.NORMAL: 0, Priority.LOW: -10}


C = TypeVar("C", bound=type)


def pickled_by_fields(cls: C) -> C:
    """Pickle a frozen, slotted dataclass as its class and its field values, rebuilt through
    `__init__`: the records that cross between the service and its worker processes every
    message (relay/ipc.py). The dataclasses module's own `__getstate__`/`__setstate__` for
    slots walk `fields()` in Python on each object: twice as slow both ways."""
    values: Callable[[Any], Any] = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))
    single = len(dataclasses.fields(cls)) == 1

    def __reduce__(self: Any) -> tuple[Any, tuple[Any, ...]]:
        got = values(self)
        return (cls, (got,) if single else got)

    cls.__reduce__ = __reduce__  # type: ignore[assignment]
    return cls


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Tag:
    """A tag on a message: a bare name, or a name with a value."""

    name: str
    value: str | None = None

    def to_json(self) -> object:
        return self.name if self.value is None else {"name": self.name, "value": self.value}

    @classmethod
    def from_json(cls, data: object) -> Tag:
        if isinstance(data, dict):
            return cls(str(data["name"]), str(data["value"]))
        return cls(str(data))


def tags_from_json(text: str) -> tuple[Tag, ...]:
    return tuple(Tag.from_json(item) for item in json.loads(text))


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's idempotency key and the fingerprint of the request it came with."""

    key: str
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    hint: str
    scope: Scope
    created_at: float
    revoked_at: float | None
    sender_domains: tuple[str, ...] = ()
    is_test: bool = False
    #: Requests per minute; None: `api.rate_limit_per_minute`; 0: unlimited.
    rate_limit: int | None = None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ApiKey:
        return cls(
            id=row["id"],
            name=row["name"],
            hint=row["hint"],
            scope=Scope(row["scope"]),
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
            sender_domains=tuple(json.loads(row["sender_domains"])),
            is_test=bool(row["test"]),
            rate_limit=row["rate_limit"],
        )


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created: the only time its secret exists outside the client's hands."""

    key: ApiKey
    secret: str


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated key, as the front doors and intake see it."""

    key_id: str
    name: str
    scope: Scope
    #: ASCII (IDNA) lower-case domains this key may send from; empty: any domain.
    sender_domains: tuple[str, ...] = ()
    #: A test-mode key: its messages are stored and get events but are never sent.
    is_test: bool = False
    #: Requests per minute; None: `api.rate_limit_per_minute`; 0: unlimited.
    rate_limit: int | None = None

    def may_send_from(self, domain: str) -> bool:
        """Whether this key may use `domain` (ASCII, lower case) as a sender domain."""
        return not self.sender_domains or domain in self.sender_domains


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Submission:
    """One message as a front door hands it to intake: envelope, raw bytes, who sent it."""

    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    source: Source
    principal: Principal | None = None
    tags: tuple[Tag, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    message_type: MessageType = MessageType.TRANSACTIONAL
    priority: Priority = Priority.NORMAL
    #: UNIX time before which no delivery is attempted; None: deliver now.
    scheduled_at: float | None = None
    idempotency: IdempotencyKey | None = None
    #: Postroom's own mail (a bounce message, relay/bounce.py), never set by a front door: no
    #: principal, a null envelope sender, and the sending-domain policy does not apply (intake).
    is_system: bool = False


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Accepted:
    """What intake answers once the message is committed."""

    id: str
    created_at: float
    status: MessageStatus


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply as recorded for a recipient."""

    code: int
    enhanced: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Recipient:
    id: int
    message_seq: int
    email: str
    domain: str
    status: RecipientStatus
    priority: int
    attempts: int
    due_at: float | None
    last_reply: Reply | None
    delivered_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Recipient:
        code = row["last_code"]
        return cls(
            id=row["id"],
            message_seq=row["message_seq"],
            email=row["email"],
            domain=row["domain"],
            status=RecipientStatus(row["status"]),
            priority=row["priority"],
            attempts=row["attempts"],
            due_at=row["due_at"],
            last_reply=(
                None
                if code is None
                else Reply(code=code, enhanced=row["last_enhanced"], text=row["last_text"] or "")
            ),
            delivered_at=row["delivered_at"],
            updated_at=row["updated_at"],
        )

    @property
    def next_attempt_at(self) -> float | None:
        """When the next attempt is due; None while one runs or once final."""
        return None if self.status is RecipientStatus.SENDING else self.due_at


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: EventType
    created_at: float
    message_seq: int | None
    recipient: str | None
    data: Mapping[str, object]
    message_id: str | None = None  # the message's public id, where the query joined it

    @property
    def public_id(self) -> str:
        return format_event_id(self.id)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Event:
        return cls(
            id=row["id"],
            type=EventType(row["type"]),
            created_at=row["created_at"],
            message_seq=row["message_seq"],
            recipient=row["recipient"],
            data=json.loads(row["data"]),
            message_id=row["message_id"] if "message_id" in row.keys() else None,
        )


def format_time(ts: float) -> str:
    """A UNIX time as ISO 8601 UTC with milliseconds: `2026-11-23T18:05:00.123Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_event_id(seq: int) -> str:
    """`evt_` and the event's sequence number, fixed width so the ids sort like the events."""
    return f"evt_{seq:016x}"


# 16 hex digits, and no more than SQLite's largest INTEGER (2**63 - 1): a bigger number would
# overflow the query it is bound to. `int(x, 16)` alone also takes `+`, `-`, `_` and spaces.
_EVENT_ID = re.compile(r"evt_[0-7][0-9a-f]{15}")


def parse_event_id(public_id: str) -> int | None:
    """The sequence number behind an `evt_` id, or None when it is not one."""
    if not _EVENT_ID.fullmatch(public_id):
        return None
    return int(public_id.removeprefix("evt_"), 16)


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    id: str
    created_at: float
    source: Source
    api_key_id: str | None
    mail_from: str
    from_header: str
    subject: str
    size: int
    recipients: tuple[Recipient, ...] = ()
    events: tuple[Event, ...] = ()
    tags: tuple[Tag, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    message_type: MessageType = MessageType.TRANSACTIONAL
    scheduled_at: float | None = None
    is_test: bool = False

    @property
    def status(self) -> MessageStatus:
        return derive_message_status([r.status for r in self.recipients])

    @property
    def priority(self) -> Priority:
        """The priority it was sent with (stored per recipient as a rank)."""
        ranks = {p.rank: p for p in Priority}
        return ranks.get(self.recipients[0].priority, Priority.NORMAL) if self.recipients else (
            Priority.NORMAL
        )

    @classmethod
    def from_row(
        cls,
        row: sqlite3.Row,
        recipients: tuple[Recipient, ...] = (),
        events: tuple[Event, ...] = (),
    ) -> Message:
        return cls(
            seq=row["seq"],
            id=row["id"],
            created_at=row["created_at"],
            source=Source(row["source"]),
            api_key_id=row["api_key_id"],
            mail_from=row["mail_from"],
            from_header=row["from_header"],
            subject=row["subject"],
            size=row["size"],
            recipients=recipients,
            events=events,
            tags=tags_from_json(row["tags"]),
            metadata=json.loads(row["metadata"]),
            message_type=MessageType(row["message_type"]),
            scheduled_at=row["scheduled_at"],
            is_test=bool(row["test"]),
        )


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """Units of one message to one destination: they share one SMTP transaction."""

    destination: str
    message_seq: int
    message_id: str
    mail_from: str
    content: bytes
    recipients: tuple[Recipient, ...]
    tags: tuple[Tag, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0  # when the message was accepted: `delivery.max_age` counts from it
    source: Source = Source.API
    #: Sent with a test-mode key: the engine records it delivered without sending it.
    is_test: bool = False
    #: Marketing jobs hold one recipient each: their unsubscribe headers name that recipient.
    message_type: MessageType = MessageType.TRANSACTIONAL
    #: Why the stored body could not be opened (damaged, or sealed with a key that is not
    #: configured), `content` then empty: the engine fails these units without trying them.
    content_error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt for one recipient, as the engine records it."""

    recipient_id: int
    status: RecipientStatus
    reply: Reply | None
    due_at: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    #: The bounce was caused by the recipient itself: add the address to the suppression list.
    suppress: bool = False


# -- events and webhooks ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be written (through `store.events.append_events`, never by hand)."""

    type: EventType
    message_seq: int | None
    recipient: str | None
    data: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What `GET /v1/events` and the stream select: all given conditions hold."""

    type: EventType | None = None
    message_id: str | None = None
    recipient: str | None = None


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # an attempt holds the row's lease
    DELIVERED = "delivered"
    FAILED = "failed"  # retries exhausted


ALL_EVENTS = "*"


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """A webhook endpoint. `secrets` are the ones that sign now, newest first; never shown."""

    seq: int
    id: str
    url: str
    event_types: tuple[str, ...]  # event type values, or ("*",)
    description: str
    is_enabled: bool
    disabled_reason: str | None
    created_at: float
    updated_at: float
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def wants(self, event_type: str) -> bool:
        return ALL_EVENTS in self.event_types or event_type in self.event_types

    @classmethod
    def from_row(cls, row: sqlite3.Row, now: float) -> WebhookEndpoint:
        secrets = [row["secret"]]
        if row["previous_secret"] and (row["previous_until"] or 0) > now:
            secrets.append(row["previous_secret"])
        return cls(
            seq=row["seq"],
            id=row["id"],
            url=row["url"],
            event_types=tuple(json.loads(row["event_types"])),
            description=row["description"],
            is_enabled=bool(row["enabled"]),
            disabled_reason=row["disabled_reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            secrets=tuple(secrets),
        )


@dataclass(frozen=True, slots=True)
class NewWebhook:
    """An endpoint just created or rotated: the only time its new secret is shown."""

    endpoint: WebhookEndpoint
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class WebhookChange:
    """A PATCH of an endpoint: None leaves a field as it is."""

    url: str | None = None
    event_types: tuple[str, ...] | None = None
    description: str | None = None
    is_enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One claimed outbox row: an event to POST to an endpoint."""

    outbox_id: int
    attempts: int  # attempts made before this one
    endpoint: WebhookEndpoint
    event: Event


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one POST to an endpoint came to: a status code, or an error without a response."""

    status_code: int | None
    latency: float  # seconds
    error: str | None = None

    @property
    def is_success(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """How the outbox row goes on after an attempt, as the dispatcher decided it."""

    status: OutboxStatus
    due_at: float | None = None
    disable_reason: str | None = None  # set: disable the endpoint (410 Gone)


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One entry of an endpoint's attempt log."""

    id: int
    event_id: str | None
    event_type: str
    attempt: int
    status_code: int | None
    latency: float
    error: str | None
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> WebhookAttempt:
        event = row["event_id"]
        return cls(
            id=row["id"],
            event_id=None if event is None else format_event_id(event),
            event_type=row["event_type"],
            attempt=row["attempt"],
            status_code=row["status_code"],
            latency=row["latency"],
            error=row["error"],
            created_at=row["created_at"],
        )


# -- delivery: DKIM domains and suppressions ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainKeys:
    """A sending domain's DKIM keys. The private keys never appear in a repr (nor in logs)."""

    name: str
    selector: str
    rsa_key: bytes = field(repr=False)  # PKCS#8 PEM
    ed25519_key: bytes | None = field(repr=False)  # base64 of the 32-byte seed
    created_at: float
    #: The From: display name used when a message's `from` has none.
    default_sender_name: str | None = None

    @property
    def ed25519_selector(self) -> str:
        """A selector holds one key, so the ed25519 key is published under its own."""
        return f"{self.selector}-ed25519"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> DomainKeys:
        ed = row["ed25519_key"]
        return cls(
            name=row["name"],
            selector=row["selector"],
            rsa_key=bytes(row["rsa_key"]),
            ed25519_key=None if ed is None else bytes(ed),
            created_at=row["created_at"],
            default_sender_name=(
                row["default_sender_name"] if "default_sender_name" in row.keys() else None
            ),
        )


@dataclass(frozen=True, slots=True)
class UrlRefusal:
    """Why a webhook URL may not be used (scheme, private address, unresolvable name)."""

    slug: str
    message: str


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """Pending delivery units by status, and when the oldest pending unit's message was queued."""

    counts: Mapping[RecipientStatus, int]
    oldest_queued_at: float | None


class SuppressionReason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"

    def blocks(self, message_type: MessageType) -> bool:
        """An unsubscribe blocks marketing mail only; every other reason blocks all mail."""
        return self is not SuppressionReason.UNSUBSCRIBE or message_type is MessageType.MARKETING


@dataclass(frozen=True, slots=True)
class Suppression:
    """An address Postroom no longer sends to, why, and the reply or message that put it there."""

    email: str
    reason: str
    reply: Reply | None
    created_at: float
    message_id: str | None = None
    expires_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Suppression:
        code = row["code"]
        keys = row.keys()
        return cls(
            email=row["email"],
            reason=row["reason"],
            reply=(
                None
                if code is None
                else Reply(code=code, enhanced=row["enhanced"], text=row["text"] or "")
            ),
            created_at=row["created_at"],
            message_id=row["message_id"] if "message_id" in keys else None,
            expires_at=row["expires_at"] if "expires_at" in keys else None,
        )


# -- operations: queue tools and the data lifecycle ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ShapeRow:
    """Pending units of one destination, by age bucket (the buckets of `QueueShape.labels`)."""

    domain: str
    total: int
    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QueueShape:
    """Pending units by destination and age of their message, like Postfix's `qshape`.

    `labels` name the buckets by their upper bound in minutes ("5" holds ages below 5 minutes,
    "1280+" everything older); `rows` are ordered by total, largest first.
    """

    labels: tuple[str, ...]
    rows: tuple[ShapeRow, ...]

    @property
    def totals(self) -> tuple[int, ...]:
        return tuple(sum(r.counts[i] for r in self.rows) for i in range(len(self.labels)))


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did: units made `cancelled`, and units left alone because in flight."""

    cancelled: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """One batch of a purge: messages removed, and the cursor to go on from (None: done)."""

    removed: int
    next_after: int | None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What a retention sweep removes: bodies of finished messages created before
    `content_before`, finished messages and all rows (events, webhook attempts, idempotency keys)
    created before `metadata_before`; None: keep."""

    content_before: float | None
    metadata_before: float | None


@dataclass(frozen=True, slots=True)
class SweepCursor:
    """Where a retention sweep goes on: its phase and the last row it looked at."""

    phase: int = 0
    after_time: float = 0.0
    after_seq: int = 0


@dataclass(frozen=True, slots=True)
class SweepStep:
    """One batch of a retention sweep: rows removed, and where to go on (None: done)."""

    removed: int
    next: SweepCursor | None


@dataclass(frozen=True, slots=True)
class StoragePragmas:
    """The durability settings the spool's connections run with (store/diagnostics.py)."""

    journal_mode: str  # of the write connection: "wal"
    synchronous: str  # of the write connection: "full"
    readers_query_only: tuple[bool, ...]  # one per pooled read connection


# -- managing messages: listing, cancel, reschedule, stats -------------------------------------

#: Larger than any message seq: "from the newest".
NEWEST = 2**62


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """What `GET /v1/messages` selects (all given conditions hold), and where the page starts."""

    status: RecipientStatus | None = None  # a recipient in this status (this one, with recipient)
    recipient: str | None = None
    mail_from: str | None = None
    tag: str | None = None  # a tag name
    created_after: float | None = None  # inclusive
    created_before: float | None = None  # exclusive
    before_seq: int = NEWEST  # keyset: only messages with a smaller seq
    limit: int = 50


class UnitAction(StrEnum):
    """What a cancel or a reschedule did to one recipient."""

    CANCELLED = "cancelled"
    RESCHEDULED = "rescheduled"
    IN_FLIGHT = "in_flight"  # an attempt holds it: left alone, its outcome will be recorded
    FINAL = "final"  # already delivered, bounced, failed, suppressed or cancelled


@dataclass(frozen=True, slots=True)
class UnitChange:
    email: str
    status: RecipientStatus  # after the change
    action: UnitAction


@dataclass(frozen=True, slots=True)
class MessageChange:
    """The result of a cancel or a reschedule: the message after it, and what each unit got."""

    message: Message
    units: tuple[UnitChange, ...]

    @property
    def changed(self) -> int:
        return sum(
            u.action in (UnitAction.CANCELLED, UnitAction.RESCHEDULED) for u in self.units
        )


class StatsGrouping(StrEnum):
    DAY = "day"  # UTC calendar day of acceptance
    DOMAIN = "domain"  # recipient domain
    TAG = "tag"  # tag name (a message with two tags counts in both)


@dataclass(frozen=True, slots=True)
class StatsGroup:
    """Delivery figures of the recipients of messages accepted in a window, for one group."""

    group: str | None  # None when not grouped
    counts: Mapping[RecipientStatus, int]
    attempted: int  # recipients with at least one delivery attempt
    deferred: int  # recipients deferred at least once
    latency_p50: float | None  # seconds from queued (or scheduled time) to delivered
    latency_p95: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def bounce_rate(self) -> float | None:
        """Bounced over delivered + bounced; None before any of either."""
        done = self.counts[RecipientStatus.DELIVERED] + self.counts[RecipientStatus.BOUNCED]
        return self.counts[RecipientStatus.BOUNCED] / done if done else None

    @property
    def deferral_rate(self) -> float | None:
        """Recipients deferred at least once over recipients attempted at least once."""
        return self.deferred / self.attempted if self.attempted else None


@dataclass(frozen=True, slots=True)
class SpoolHealth:
    """What a read-only look at the spool found (`postroom doctor`)."""

    schema_version: int
    latest_version: int
    problems: tuple[str, ...]  # from PRAGMA integrity_check; empty: sound
    is_encrypted: bool  # a key check is stored: bodies and DKIM keys are sealed
    key_problem: str | None  # why the configured key cannot open the spool; None: it can
    domains: tuple[DomainKeys, ...]  # the sending domains, keys opened (empty on a key problem)
# -- sending: suppressions, templates -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewSuppression:
    """An address to suppress by hand (API, CLI, import) or through an unsubscribe."""

    email: str
    reason: SuppressionReason = SuppressionReason.MANUAL
    expires_at: float | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class SuppressionFilter:
    """What `GET /v1/suppressions` selects: all given conditions hold."""

    reason: SuppressionReason | None = None
    #: Addresses containing this text (case-insensitive).
    search: str | None = None


@dataclass(frozen=True, slots=True)
class Template:
    """A message template: Jinja2 source of the subject, html and text parts."""

    id: str
    name: str
    subject: str
    html: str | None
    text: str | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Template:
        return cls(
            id=row["id"],
            name=row["name"],
            subject=row["subject"],
            html=row["html"],
            text=row["text"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


class RecordStatus(StrEnum):
    UNVERIFIED = "unverified"  # not looked up (add, show)
    OK = "ok"
    MISSING = "missing"
    WRONG = "wrong"
    UNKNOWN = "unknown"  # the lookup failed (timeout, SERVFAIL): not known to be missing


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """A DNS record a sending domain should publish, and what a live lookup found for it."""

    type: str
    name: str
    value: str
    status: RecordStatus = RecordStatus.UNVERIFIED
    found: tuple[str, ...] = ()
    detail: str = ""
