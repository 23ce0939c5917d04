"""The spool: Postroom's only shared state and the only place with SQL.

Everything outside `store/` uses this surface: `Spool` (opened with `Spool.open(settings)`),
the typed records it takes and returns, and its errors.
"""

from __future__ import annotations

from store.errors import (
    IdempotencyConflict,
    NotFound,
    PolicyRejected,
    SpoolClosed,
    StorageFull,
    StoreError,
)
from store.intake import domain_of, normalise_domain
from store.records import (
    Accepted,
    ApiKey,
    DeliveryJob,
    Event,
    EventType,
    IdempotencyKey,
    Message,
    MessageStatus,
    MessageType,
    NewKey,
    Outcome,
    Principal,
    Priority,
    Recipient,
    RecipientStatus,
    Reply,
    Scope,
    Source,
    Submission,
    Tag,
    derive_message_status,
    format_event_id,
    format_time,
)
from store.spool import Spool, migrate

__all__ = [
    "Accepted",
    "ApiKey",
    "DeliveryJob",
    "Event",
    "EventType",
    "IdempotencyConflict",
    "IdempotencyKey",
    "Message",
    "MessageStatus",
    "MessageType",
    "NewKey",
    "NotFound",
    "Outcome",
    "PolicyRejected",
    "Principal",
    "Priority",
    "Recipient",
    "RecipientStatus",
    "Reply",
    "Scope",
    "Source",
    "Spool",
    "SpoolClosed",
    "StorageFull",
    "StoreError",
    "Submission",
    "Tag",
    "derive_message_status",
    "domain_of",
    "format_event_id",
    "format_time",
    "migrate",
    "normalise_domain",
]
