"""Public identifiers: a prefix and a ULID-like body that sorts by creation time."""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
#: RFC 4648 base32's alphabet to ours: `base64.b32encode` does the arithmetic in C.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_id(prefix: str) -> str:
    """`prefix_` + 48 bits of milliseconds + 80 random bits, as 26 base32 characters."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    # 26 characters are 130 bits: shifted into the top of 160 bits, they are the first 26 of
    # the 32 characters base32 makes of 20 bytes.
    encoded = base64.b32encode((value << 30).to_bytes(20, "big"))[:26]
    return f"{prefix}_{encoded.translate(_FROM_RFC4648).decode('ascii')}"
