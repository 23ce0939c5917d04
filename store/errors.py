"""The spool's errors: what a caller of `Spool` may have to handle.

    StoreError
    ├── SpoolUnavailable   the spool file cannot be opened or created (carries the path)
    ├── SpoolClosed        the spool is shutting down or closed; nothing was written
    ├── StorageFull        the disk or database is full; nothing was written
    ├── NotFound           no such message, key, …
    ├── Conflict           the record already exists
    ├── PolicyRejected     intake refused the message (carries a slug and a field)
    ├── IdempotencyConflict  the idempotency key is in use (carries a slug)
    ├── KeyMismatch        a sealed value does not open with the configured encryption keys
    └── UnreadableKeys     one sending domain's DKIM keys do not decrypt (carries the domain,
                           the selector and the reason, never the key)

Each subclass's docstring is its default message. Expected outcomes of delivery are values
(`records.Outcome`), not errors.

`KeyMismatch` is what `store/crypto.py` raises for any value; at start-up (the key check) it
means the wrong key is configured and the spool does not open. Past start-up the key is right,
so a value that does not open is one damaged row, and the spool says which: a message body
becomes `DeliveryJob.content_error` (its units fail, the claim goes on for everyone else), a DKIM
key row becomes `UnreadableKeys` (that domain's mail fails, other domains' mail is signed).
"""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """The spool could not complete the operation."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt without calling `__init__`, whose arguments differ per subclass: the SMTP and
        # API worker processes get these from the service pickled (relay/ipc.py).
        return (_rebuild, (type(self), self.args, self.__dict__))


class SpoolUnavailable(StoreError):
    """The spool cannot be opened."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot open the spool {path}: {reason}")
        self.path = path
        self.reason = reason


class SpoolClosed(StoreError):
    """The spool is closed."""


class StorageFull(StoreError):
    """The spool's storage is full."""


class NotFound(StoreError):
    """No such record."""


class PolicyRejected(StoreError):
    """The message was refused by policy."""

    def __init__(self, slug: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.slug = slug
        self.field = field


class IdempotencyConflict(StoreError):
    """The idempotency key is already in use."""

    REUSED = "idempotency_key_reused"
    IN_PROGRESS = "idempotency_key_in_progress"

    def __init__(self, slug: str, message: str | None = None) -> None:
        super().__init__(message or _CONFLICT_MESSAGES[slug])
        self.slug = slug


_CONFLICT_MESSAGES = {
    IdempotencyConflict.REUSED: "this idempotency key was already used with a different request",
    IdempotencyConflict.IN_PROGRESS: "a request with this idempotency key is still in progress",
}


class Conflict(StoreError):
    """The record already exists."""


class KeyMismatch(StoreError):
    """The spool cannot be read with the configured encryption key."""


class UnreadableKeys(StoreError):
    """A sending domain's DKIM keys cannot be decrypted."""

    def __init__(self, domain: str, selector: str, reason: str) -> None:
        super().__init__(
            f"the DKIM key of {domain} (selector {selector}) cannot be decrypted: {reason}"
        )
        self.domain = domain
        self.selector = selector
        self.reason = reason


def _rebuild(
    cls: type[StoreError], args: tuple[object, ...], state: dict[str, object]
) -> StoreError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
