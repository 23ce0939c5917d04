"""The spool: Postroom's only shared state and the only place with SQL.

Everything outside `store/` uses this surface: `Spool` (opened with `Spool.open(settings)`),
the typed records it takes and returns, and its errors.
"""

from __future__ import annotations

from store.errors import Conflict, NotFound, PolicyRejected, SpoolClosed, StorageFull, StoreError
from store.intake import domain_of
from store.records import (
    Accepted,
    ApiKey,
    DeliveryJob,
    DomainKeys,
    Event,
    EventType,
    Message,
    MessageStatus,
    NewKey,
    Outcome,
    Principal,
    Recipient,
    RecipientStatus,
    Reply,
    Scope,
    Source,
    Submission,
    Suppression,
    derive_message_status,
    format_event_id,
    format_time,
)
from store.spool import Spool, migrate

__all__ = [
    "Accepted",
    "ApiKey",
    "Conflict",
    "DeliveryJob",
    "DomainKeys",
    "Event",
    "EventType",
    "Message",
    "MessageStatus",
    "NewKey",
    "NotFound",
    "Outcome",
    "PolicyRejected",
    "Principal",
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
    "Suppression",
    "derive_message_status",
    "domain_of",
    "format_event_id",
    "format_time",
    "migrate",
]
