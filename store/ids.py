"""Public identifiers: a prefix and a ULID-like body that sorts by creation time."""

from __future__ import annotations

import base64
import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
#: RFC 4648 base32's alphabet to ours: `base64.b32encode` does the arithmetic in C.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


#: Bytes of randomness read from the system at a time: one read serves 409 ids.
_POOL_SIZE = 4096
_pool = b""
_at = 0
_lock = threading.Lock()


def _random(n: int) -> bytes:
    """`n` bytes of `os.urandom`, read a pool at a time.

    Each `os.urandom` call lets go of the interpreter lock for its system call, and on a busy
    service taking it back waited for the spool writer's thread: one call per accepted message
    was a twentieth of the service loop's time under HTTP load (py-spy). The pool is the
    system's randomness all the same, never handed out twice, and forgotten in a forked child.
    """
    global _pool, _at
    with _lock:
        if _at + n > len(_pool):
            _pool, _at = os.urandom(max(_POOL_SIZE, n)), 0
        chunk = _pool[_at : _at + n]
        _at += n
    return chunk


def _forget_pool() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def new_id(prefix: str) -> str:
    """`prefix_` + 48 bits of milliseconds + 80 random bits, as 26 base32 characters."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(_random(10), "big")
    # 26 characters are 130 bits: shifted into the top of 160 bits, they are the first 26 of
    # the 32 characters base32 makes of 20 bytes.
    encoded = base64.b32encode((value << 30).to_bytes(20, "big"))[:26]
    return f"{prefix}_{encoded.translate(_FROM_RFC4648).decode('ascii')}"
