"""Email policies for parsing and composing headers, with the header classes made once per name.

`HeaderRegistry.__getitem__` creates a new class with `type()` for every header it builds
(CPython 3.11 `email/headerregistry.py`): a third of the time of composing a small message went
there, and a fifth of intake's header parse. The class depends on the header's name alone, so
these policies remember one per name; what they parse and render is unchanged.
"""

from __future__ import annotations

from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import SMTP, default


class CachedHeaderRegistry(HeaderRegistry):
    """The standard header registry, remembering the class it makes for each header name."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:  # a race between threads makes the same class twice: harmless
            cls = self._classes.setdefault(key, super().__getitem__(name))
        return cls


#: `email.policy.default` (what intake parses headers with), header classes cached.
DEFAULT_POLICY = default.clone(header_factory=CachedHeaderRegistry())
#: `email.policy.SMTP` (CRLF line endings; what the API composes with), header classes cached.
SMTP_POLICY = SMTP.clone(header_factory=CachedHeaderRegistry())
