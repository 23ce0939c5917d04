"""Email policies for parsing and composing headers, with header classes and values remembered.

`HeaderRegistry.__getitem__` creates a new class with `type()` for every header it builds
(CPython 3.11 `email/headerregistry.py`): a third of the time of composing a small message went
there, and a fifth of intake's header parse. The class depends on the header's name alone, so
these policies remember one per name. Parsing the value is most of what remains, and short
values repeat (a batch's sender and subject, the MIME headers): the last few thousand are
remembered too. What the policies parse and render is unchanged.

`read_fields` finds a few named fields in a message's header block by the feed parser's own rules,
without running the feed parser: what intake reads of every message (From, Sender, Subject).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
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


# -- reading a few header fields without the feed parser ---------------------------------------

#: The feed parser's test for a header line (CPython `email/feedparser.py` headerRE).
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
#: An unstructured value whose decoded text is the value itself: printable ASCII and blanks,
#: and no encoded-word (`=?`) to decode.
_PLAIN_TEXT = re.compile(r"[\x20-\x7e\t]*")
#: Fields whose text the header registry rewrites (addresses are rendered anew, dates
#: reformatted): `HeaderFields.text` always parses these.
_STRUCTURED = frozenset(
    name for name, cls in HeaderRegistry().registry.items()
    if not issubclass(cls, UnstructuredHeader)
)


class HeaderFields:
    """Some header fields of a message, as `BytesHeaderParser(policy=DEFAULT_POLICY)` reads
    them: `get_all` and `[name]` give the same header objects `email.message.Message` would.

    Intake reads From:, Sender: and Subject: of every message, and the feed parser's line
    splitting and header bookkeeping were three quarters of that (46 µs of a 3 KB message's
    intake). `read_fields` scans the header block with the feed parser's own rules
    (tests/test_headers.py holds the two to the same fields) and keeps only the fields asked
    for, as (name, unfolded value) pairs; values are parsed only when read.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def get_all(self, name: str) -> list[Any] | None:
        lower = name.lower()
        found = [DEFAULT_POLICY.header_fetch_parse(k, v) for k, v in self._fields
                 if k.lower() == lower]
        return found or None

    def __getitem__(self, name: str) -> Any:
        lower = name.lower()
        for k, v in self._fields:
            if k.lower() == lower:
                return DEFAULT_POLICY.header_fetch_parse(k, v)
        return None

    def text(self, name: str) -> str:
        """The first `name:` field's decoded text ("" without one), as `str(self[name])`; an
        unstructured field of plain ASCII is its own text, without parsing it."""
        lower = name.lower()
        for k, v in self._fields:
            if k.lower() == lower:
                if lower not in _STRUCTURED and "=?" not in v and _PLAIN_TEXT.fullmatch(v):
                    return v
                return str(DEFAULT_POLICY.header_fetch_parse(k, v))
        return ""



def read_fields(block: bytes, names: Iterable[str]) -> HeaderFields:
    """The `names` fields (any case) of a CRLF header block, as the feed parser finds them."""
    wanted = {n.lower() for n in names}
    lines: list[str] = []
    # The feed parser reads headers until a line that is not one (a blank line, or the body).
    for line in block.decode("ascii", "surrogateescape").split("\r\n"):
        if not _HEADER_LINE.match(line):
            break
        lines.append(line)
    fields: list[tuple[str, str]] = []
    name = ""
    value: list[str] = []

    def flush() -> None:
        if name.lower() in wanted:
            first, *rest = value
            fields.append((name, first.split(":", 1)[1].lstrip(" \t") + "".join(rest)))

    # FeedParser._parse_headers, keeping only what a field's value is made of. A line that
    # starts "From " is an envelope line, not a field; one that starts with ":" names no field
    # (its name is empty, so it is never asked for); a continuation with no field before it
    # is dropped.
    for line in lines:
        if line[0] in " \t":
            if name:
                value.append(line)
            continue
        if name:
            flush()
            name, value = "", []
        if not line.startswith("From "):
            name, value = line[: line.index(":")], [line]
    if name:
        flush()
    return HeaderFields(fields)
