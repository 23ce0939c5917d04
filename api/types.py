"""Shared types of the API package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from api.recipient_domains import RecipientDomains
from config import Settings
from store import Spool


class ReadinessProbe(Protocol):
    """What `/readyz` asks; the service provides it."""

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_stopping(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class AppState:
    spool: Spool
    settings: Settings
    readiness: ReadinessProbe
    #: None when `api.check_recipient_domains` is off.
    domains: RecipientDomains | None = None
