"""One-click unsubscribe headers (RFC 8058) for marketing mail, added as it goes out.

Owns the `List-Unsubscribe` (an https link to `api.public_url`/unsubscribe/<token>, and the
optional mailto) and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` headers. The token binds
the message and the one recipient the copy goes to (store/unsubscribe.py), so marketing mail is
sent one recipient per transaction, and the headers are added before DKIM signs them (RFC 8058
§4 requires both to be signed). A message that already carries List-Unsubscribe keeps its own.
"""

from __future__ import annotations

import re
from email.headerregistry import Address

_PRESENT = re.compile(rb"^List-Unsubscribe[ \t]*:", re.IGNORECASE | re.MULTILINE)


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{token}"


def add_headers(content: bytes, url: str, mailto: str | None = None) -> bytes:
    """`content` with the one-click headers prepended; unchanged if it has List-Unsubscribe."""
    head = content.split(b"\r\n\r\n", 1)[0]
    if _PRESENT.search(head):
        return content
    targets = [f"<{url}>"]
    if mailto:
        Address(addr_spec=mailto)  # raises ValueError for anything that is not an address
        targets.append(f"<mailto:{mailto}?subject=unsubscribe>")
    # Each URI on its own folded line keeps lines short; a URI itself is never folded.
    value = ",\r\n ".join(targets)
    lines = (
        f"List-Unsubscribe: {value}\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    return lines.encode("ascii") + content
