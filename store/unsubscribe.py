"""One-click unsubscribe tokens (RFC 8058): pure functions, keyed with the spool's own secret.

A token binds one message id and one recipient address: `<payload>.<mac>`, both base64url
without padding, where the payload is `message_id NUL address` and the MAC is HMAC-SHA256 of the
payload under the `unsubscribe` secret the spool generated when it was created. Changing one byte
of either part, or moving the MAC onto another address's payload, makes `read_token` answer None.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

_MAX_TOKEN = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, b"postroom-unsubscribe\x00" + payload, hashlib.sha256).digest()


def make_token(secret: bytes, message_id: str, address: str) -> str:
    """The token for `address` (lower-cased) as a recipient of `message_id`."""
    payload = f"{message_id}\x00{address.lower()}".encode()
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def read_token(secret: bytes, token: str) -> tuple[str, str] | None:
    """(message id, address) of a genuine token; None for anything forged, altered or malformed."""
    if len(token) > _MAX_TOKEN or token.count(".") != 1:
        return None
    body, _, mac = token.partition(".")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(given, _mac(secret, payload)):
        return None
    message_id, sep, address = payload.decode("utf-8", "replace").partition("\x00")
    if not sep or not message_id or "@" not in address:
        return None
    return message_id, address
