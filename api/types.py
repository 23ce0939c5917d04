"""Shared types of the API package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config import Settings
from store import Spool


class ReadinessProbe(Protocol):
    """What `/readyz` asks; the service provides it."""

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_stopping(self) -> bool: ...


class MetricsExporter(Protocol):
    """What `GET /metrics` serves; the service provides it (Prometheus text format)."""

    @property
    def content_type(self) -> str: ...

    async def render(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AppState:
    spool: Spool
    settings: Settings
    readiness: ReadinessProbe
    metrics: MetricsExporter | None = None
