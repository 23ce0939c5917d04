"""Reloading the configuration without a restart (SIGHUP): all of it applies, or none of it.

Owns the reload hooks and their two steps. Each part of the service that can change live
registers a hook naming the settings it covers (`"server.log_level"`) and a `prepare(new)` that
checks the new settings and builds whatever they need (a certificate loaded, routes parsed)
without touching what runs, then returns the `apply()` that switches over. Every `prepare` runs
before any `apply`; one raising `ReloadRefused` refuses the whole reload and the running config
stays. `changes` (pure) says which settings differ, for the log line; settings no hook covers
take effect at the next restart, and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import SecretStr

from config import Settings

Apply = Callable[[], None]
Prepare = Callable[[Settings], Apply]


class ReloadRefused(Exception):
    """The new configuration cannot be applied; the message says why."""


@dataclass(frozen=True, slots=True)
class Change:
    key: str  # "section.field"
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.key} ({self.old} → {self.new})"


@dataclass(frozen=True, slots=True)
class Hook:
    name: str
    fields: frozenset[str]
    prepare: Prepare


@dataclass(frozen=True, slots=True)
class Plan:
    """A reload checked by every hook: what changed, and how to switch over."""

    changes: list[Change]
    live: list[Change]
    needs_restart: list[Change]
    applies: list[Apply]

    def apply(self) -> None:
        for step in self.applies:
            step()


class Reloader:
    """The hooks of one service, in registration order."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []

    def register(self, name: str, fields: Iterable[str], prepare: Prepare) -> None:
        self._hooks.append(Hook(name, frozenset(fields), prepare))

    @property
    def live_fields(self) -> frozenset[str]:
        return frozenset().union(*(hook.fields for hook in self._hooks))

    def plan(self, old: Settings, new: Settings) -> Plan:
        """Run every hook's `prepare`; raises ReloadRefused (naming the hook) if one refuses."""
        applies = []
        for hook in self._hooks:
            try:
                applies.append(hook.prepare(new))
            except ReloadRefused as exc:
                raise ReloadRefused(f"{hook.name}: {exc}") from None
        found = changes(old, new)
        live = self.live_fields
        return Plan(
            changes=found,
            live=[c for c in found if c.key in live],
            needs_restart=[c for c in found if c.key not in live],
            applies=applies,
        )


def changes(old: Settings, new: Settings) -> list[Change]:
    """The settings that differ, as `section.field` with printable old and new values."""
    found = []
    for section in Settings.sections:
        before, after = getattr(old, section), getattr(new, section)
        for name in type(before).model_fields:
            a, b = getattr(before, name), getattr(after, name)
            if _comparable(a) != _comparable(b):
                found.append(Change(f"{section}.{name}", _show(a), _show(b)))
    return found


def _comparable(value: object) -> object:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _show(value: object) -> str:
    """A setting for a log line; a secret shows only whether it is set."""
    if isinstance(value, SecretStr):
        return "(secret)"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)
