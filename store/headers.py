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
from email.policy import EmailPolicy
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


class FoldOncePolicy(EmailPolicy):
    """An email policy that folds each header object once and keeps the text on the object.

    Folding a header walks and re-renders its parse tree: 15% of composing a batch (profiled
    under bench/accept_http.py), and the remembered headers above come back on message after
    message. A header object never changes once made, and its folded text depends on nothing
    else but the policy's line length, line ending and `utf8`, which are part of the key.
    """

    def _fold(self, name: str, value: Any, refold_binary: bool = False) -> str:
        memo = getattr(value, "__dict__", None) if hasattr(value, "name") else None
        if memo is None:  # a plain string value (intake's own parse): folded as EmailPolicy does
            return str(super()._fold(name, value, refold_binary))  # type: ignore[misc]
        key = (name, self.max_line_length, self.linesep, self.utf8, refold_binary)
        folded: dict[tuple[Any, ...], str] = memo.setdefault("_postroom_folded", {})
        text = folded.get(key)
        if text is None:
            text = folded[key] = str(super()._fold(name, value, refold_binary))  # type: ignore[misc]
        return text


#: `email.policy.default` (what intake parses headers with), header classes cached.
DEFAULT_POLICY = FoldOncePolicy(header_factory=CachedHeaderRegistry())
#: `email.policy.SMTP` (CRLF line endings; what the API composes with), header classes cached.
SMTP_POLICY = FoldOncePolicy(linesep="\r\n", header_factory=CachedHeaderRegistry())
