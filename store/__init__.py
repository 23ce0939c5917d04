"""The spool: Postroom's only shared state and the only place with SQL.

Everything outside `store/` uses this surface: `Spool` (opened with `Spool.open(settings)`),
the typed records it takes and returns, and its errors.
"""

from __future__ import annotations

from store.errors import NotFound, PolicyRejected, SpoolClosed, StorageFull, StoreError
from store.intake import domain_of
from store.observer import NullObserver, SpoolObserver
from store.records import (
    Accepted,
    ApiKey,
    DeliveryJob,
    Event,
    EventType,
    Message,
    MessageStatus,
    NewKey,
    Outcome,
    Principal,
    QueueSummary,
    Recipient,
    RecipientStatus,
    Reply,
    Scope,
    Source,
    Submission,
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
    "Message",
    "MessageStatus",
    "NewKey",
    "NotFound",
    "NullObserver",
    "Outcome",
    "PolicyRejected",
    "Principal",
    "QueueSummary",
    "Recipient",
    "RecipientStatus",
    "Reply",
    "Scope",
    "Source",
    "Spool",
    "SpoolClosed",
    "SpoolObserver",
    "StorageFull",
    "StoreError",
    "Submission",
    "derive_message_status",
    "domain_of",
    "format_event_id",
    "format_time",
    "migrate",
]
