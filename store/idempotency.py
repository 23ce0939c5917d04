"""Idempotency keys: a request sent again with the same key is answered again, not repeated.

Owns the rules both front doors share. A key is scoped to the API key that used it and kept for
`api.idempotency_ttl`. While a request holds a key, another request with it is refused as in
progress (one process owns the spool, so the in-flight set lives here, in memory). A finished key
replays its first answer for the same request and refuses a different one. Intake writes the row
in the same transaction as the message, so each key names exactly one stored message.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from store.errors import IdempotencyConflict
from store.records import Accepted, IdempotencyKey, MessageStatus, Principal
from store.sql import Q

#: What a held key allows: go ahead (None), replay an earlier answer, or a refusal.
Verdict = Accepted | IdempotencyConflict | None


def scope_of(principal: Principal | None) -> str:
    """The namespace of a client's keys: its API key (unauthenticated clients share one)."""
    return principal.key_id if principal else ""


class InFlight:
    """The keys requests hold right now, by (scope, key)."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()

    def hold(self, scope: str, keys: Sequence[IdempotencyKey | None]) -> list[bool]:
        """Hold each free key; False where a key is held already (also twice in `keys`)."""
        taken = []
        for key in keys:
            if key is None:
                taken.append(True)
                continue
            entry = (scope, key.key)
            if entry in self._held:
                taken.append(False)
                continue
            self._held.add(entry)
            taken.append(True)
        return taken

    def release(self, scope: str, keys: Sequence[IdempotencyKey | None]) -> None:
        for key in keys:
            if key is not None:
                self._held.discard((scope, key.key))


def judge(key: IdempotencyKey, row: sqlite3.Row | None) -> Verdict:
    """The verdict for a held key, given its live row (if any)."""
    if row is None:
        return None
    if bytes(row["fingerprint"]) != key.fingerprint:
        return IdempotencyConflict(IdempotencyConflict.REUSED)
    return Accepted(
        id=row["message_id"], created_at=row["created_at"], status=MessageStatus(row["status"])
    )


def record(
    conn: sqlite3.Connection,
    scope: str,
    key: IdempotencyKey,
    accepted: Accepted,
    ttl: float,
) -> None:
    """Store a key with its message, inside the message's own writer job."""
    cutoff = accepted.created_at - ttl
    cur = conn.execute(
        Q["idempotency_insert"],
        {
            "api_key_id": scope,
            "key": key.key,
            "fingerprint": key.fingerprint,
            "message_id": accepted.id,
            "status": accepted.status.value,
            "now": accepted.created_at,
            "cutoff": cutoff,
        },
    )
    if cur.rowcount == 0:
        # A live row appeared after the lookup (another process): this message must not exist.
        raise IdempotencyConflict(IdempotencyConflict.IN_PROGRESS)
    conn.execute(Q["idempotency_purge"], {"cutoff": cutoff})
