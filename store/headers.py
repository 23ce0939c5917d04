"""Email policies for parsing and composing headers, with header classes and values remembered.

`HeaderRegistry.__getitem__` creates a new class with `type()` for every header it builds
(CPython 3.11 `email/headerregistry.py`): a third of the time of composing a small message went
there, and a fifth of intake's header parse. The class depends on the header's name alone, so
these policies remember one per name. Parsing the value is most of what remains, and short
values repeat (a batch's sender and subject, the MIME headers): the last few thousand are
remembered too. What the policies parse and render is unchanged.
"""

from __future__ import annotations

import functools
from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import SMTP, default
from typing import Any

#: Header values up to this many characters are remembered (4,096 of them at most).
_CACHED_LENGTH = 200


class CachedHeaderRegistry(HeaderRegistry):
    """The standard header registry, remembering the class it makes for each header name, and
    the header it made for each recent (name, text) pair.

    Parsing a header value is most of the cost of composing a message, and the same values come
    again and again: one sender, one subject for a whole batch, the same MIME headers on every
    message. A header object is immutable once made (folding reads it, nothing changes it), so
    the one made for a (name, text) pair can serve every message that has it.
    """

    def __init__(self, size: int = 4096) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}
        # lru_cache is bounded and safe across threads (a batch composes on a worker thread).
        self._made = functools.lru_cache(maxsize=size)(super().__call__)

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if isinstance(value, str) and len(value) <= _CACHED_LENGTH:
            return self._made(name, value)
        # Address objects and the like, and long values (a client's own headers may be long:
        # the cache holds only short ones, so it stays small): made each time.
        return super().__call__(name, value)

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
