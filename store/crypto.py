"""Encryption at rest: AES-256-GCM for message bodies and DKIM private keys.

Owns the sealed format and the key check. A sealed value is `MAGIC`, the 4-byte id of the key
(the start of its SHA-256), a 12-byte random nonce and the ciphertext with its tag; what it is
(b"body", b"dkim") is bound in as associated data, so a value cannot be passed off as another
kind. A value without `MAGIC` was stored before encryption was turned on and is returned as it is;
`postroom db rotate-key` seals it. The key check value — a known text sealed with the current key
in `spool_meta` — makes a wrong or missing key a start-up error instead of unreadable mail.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass

from config import Settings, decode_key
from store.errors import KeyMismatch as KeyMismatch  # defined with the tree; raised here
from store.sql import Q

MAGIC = b"\x00PRE1"
BODY = b"body"
DKIM = b"dkim"
_CHECK = b"postroom key check"
_CHECK_PURPOSE = b"check"


# `cryptography` is imported where a key is used, not here: every process imports this module
# (the SMTP/API workers through the store package), and its compiled library adds ~9 MiB to
# each process's RSS, where only a spool with `storage.encryption_key` set ever needs it.


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


@dataclass(frozen=True)
class Sealer:
    """Seals with the current key (None: stores as given); opens with it or the previous one."""

    current: bytes | None = None
    previous: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        storage = settings.storage
        key, old = storage.encryption_key, storage.previous_encryption_key
        return cls(
            current=decode_key(key.get_secret_value()) if key else None,
            previous=decode_key(old.get_secret_value()) if old else None,
        )

    def seal(self, data: bytes, purpose: bytes) -> bytes:
        if self.current is None:
            return data
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        return MAGIC + key_id(self.current) + nonce + AESGCM(self.current).encrypt(
            nonce, data, purpose
        )

    def open(self, data: bytes, purpose: bytes) -> bytes:
        if not data.startswith(MAGIC):
            return data
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        wanted = data[len(MAGIC) : len(MAGIC) + 4]
        for key in (self.current, self.previous):
            if key is not None and key_id(key) == wanted:
                nonce = data[len(MAGIC) + 4 : len(MAGIC) + 16]
                try:
                    return AESGCM(key).decrypt(nonce, data[len(MAGIC) + 16 :], purpose)
                except (InvalidTag, ValueError):  # ValueError: cut short inside the nonce
                    raise KeyMismatch("a sealed value does not open: damaged data") from None
        raise KeyMismatch(
            f"a value is sealed with key {wanted.hex()}, which is not configured "
            "(storage.encryption_key / previous_encryption_key)"
        )

    def is_current(self, data: bytes) -> bool:
        """Whether `data` is stored the way the current key would store it."""
        if self.current is None:
            return not data.startswith(MAGIC)
        return data.startswith(MAGIC + key_id(self.current))


def verify_key(conn: sqlite3.Connection, sealer: Sealer) -> None:
    """At open: the configured keys must open the key check (written with the first key)."""
    row = conn.execute(Q["meta_get"], {"name": "key_check"}).fetchone()
    if row is None:
        if sealer.current is not None:
            conn.execute(
                Q["meta_set"],
                {"name": "key_check", "value": sealer.seal(_CHECK, _CHECK_PURPOSE)},
            )
        return
    problem = key_problem(bytes(row[0]), sealer)
    if problem is not None:
        raise KeyMismatch(problem)


def key_problem(stored: bytes, sealer: Sealer) -> str | None:
    """Why the configured keys cannot open the stored key check, or None when they can."""
    if sealer.current is None:
        return "the spool is encrypted at rest: set storage.encryption_key (or _file) to its key"
    try:
        ok = sealer.open(stored, _CHECK_PURPOSE) == _CHECK
    except KeyMismatch:
        ok = False
    if ok:
        return None
    return (
        "storage.encryption_key is not the key this spool was encrypted with "
        f"(key id {stored[len(MAGIC) : len(MAGIC) + 4].hex()}, configured "
        f"{key_id(sealer.current).hex()}); during a rotation set previous_encryption_key"
    )


def reseal_check(conn: sqlite3.Connection, sealer: Sealer) -> None:
    """After a rotation: the key check under the current key (or none without encryption)."""
    if sealer.current is None:
        conn.execute(Q["meta_delete"], {"name": "key_check"})
    else:
        conn.execute(
            Q["meta_set"], {"name": "key_check", "value": sealer.seal(_CHECK, _CHECK_PURPOSE)}
        )


@dataclass(frozen=True, slots=True)
class Resealed:
    """One batch of a rotation: bodies re-sealed, the ids of messages whose body does not open
    (skipped, left as they are), and where to go on (None: done)."""

    changed: int
    skipped: tuple[str, ...]
    next_after: int | None


@dataclass(frozen=True, slots=True)
class KeysResealed:
    """The end of a rotation: domains whose keys were re-sealed, and those whose keys do not
    open (skipped, left as they are)."""

    changed: int
    damaged: tuple[str, ...]


def reseal_bodies(conn: sqlite3.Connection, sealer: Sealer, after: int, limit: int) -> Resealed:
    """One batch of a rotation: bodies past `after` not under the current key are re-sealed.

    A body that opens with neither configured key is damaged (the key check proved the keys
    right): it is skipped and named, so one damaged row never stops the rotation of the rest.
    """
    rows = conn.execute(Q["bodies_after"], {"after": after, "limit": limit}).fetchall()
    changed = 0
    skipped = []
    for row in rows:
        body = bytes(row["body"])
        if body and not sealer.is_current(body):
            try:
                plain = sealer.open(body, BODY)
            except KeyMismatch:
                skipped.append(str(row["id"]))
                continue
            conn.execute(Q["set_body"], {"seq": row["seq"], "body": sealer.seal(plain, BODY)})
            changed += 1
    next_after = rows[-1]["seq"] if len(rows) == limit else None
    return Resealed(changed, tuple(skipped), next_after)


def reseal_keys(conn: sqlite3.Connection, sealer: Sealer) -> KeysResealed:
    """The end of a rotation: DKIM keys under the current key (a row that does not open is
    skipped and named), then the key check."""
    count = 0
    damaged = []
    for row in conn.execute(Q["all_domain_keys"]).fetchall():
        ed = row["ed25519_key"]
        try:
            rsa = sealer.seal(sealer.open(bytes(row["rsa_key"]), DKIM), DKIM)
            ed_sealed = None if ed is None else sealer.seal(sealer.open(bytes(ed), DKIM), DKIM)
        except KeyMismatch:
            damaged.append(str(row["name"]))
            continue
        conn.execute(
            Q["set_domain_keys"], {"name": row["name"], "rsa_key": rsa, "ed25519_key": ed_sealed}
        )
        count += 1
    # The skipped rows open with neither key, so keeping the old key check would not help them.
    reseal_check(conn, sealer)
    return KeysResealed(count, tuple(damaged))
