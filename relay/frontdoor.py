"""The SMTP front door's shared state and its commit, in the process that owns the spool.

Owns what every SMTP session of the server must share, whichever process runs the session:
the session counts (`SessionLimits`), the AUTH lock-outs (`AuthThrottle`), the key lookups, and
the commit of a finished message — the idempotency hold, `Spool.accept`, and the SMTP reply that
says what happened (`250` only after the commit returned). relay/submission.py's handler calls
it directly in one process; with `smtp.workers`, relay/workers.py serves the same calls to the
worker processes, so that limits and lock-outs are the server's, not one process's.
"""

from __future__ import annotations

import logging
import time

from config import Settings
from relay.submission import LOCKED_OUT, Admission, is_trusted, parse_networks
from relay.throttle import AuthThrottle, AuthVerdict, Clock, SessionLimits, client_key
from store import (
    Accepted,
    IdempotencyConflict,
    PolicyRejected,
    Principal,
    Spool,
    SpoolClosed,
    StorageFull,
    Submission,
)

logger = logging.getLogger(__name__)

#: Hosts `LocalDoor.admit` remembers what it made of, at most (about 200 bytes each).
_KNOWN_HOSTS = 4096


class LocalDoor:
    """The door over the spool itself: one per service."""

    def __init__(self, spool: Spool, settings: Settings, clock: Clock = time.monotonic) -> None:
        self._spool = spool
        smtp = settings.smtp
        self._trusted = parse_networks(smtp.trusted_networks)
        #: Each recent host's (trusted?, `client_key`).
        self._clients: dict[str, tuple[bool, str]] = {}
        self.sessions = SessionLimits(smtp.max_sessions, smtp.max_sessions_per_ip)
        self.auth_throttle = AuthThrottle(
            max_failures=smtp.auth_max_failures,
            window=smtp.auth_failure_window,
            delay=smtp.auth_failure_delay,
            lockout=smtp.auth_lockout,
            clock=clock,
        )

    def admit(self, host: str) -> Admission:
        """Count a new connection from `host`, or say why it is refused (nothing counted then)."""
        known = self._clients.get(host)
        if known is None:
            # Parsing the address twice was about 4% of the service's loop per connection
            # (profiled under bench/vs_postfix.sh): it is done once per host, for a bounded
            # table of recent hosts.
            if len(self._clients) >= _KNOWN_HOSTS:
                self._clients.clear()
            known = self._clients[host] = (is_trusted((host,), self._trusted), client_key(host))
        trusted, client = known
        if not trusted and self.auth_throttle.is_locked(client):
            return Admission(client, trusted, LOCKED_OUT)
        if not self.sessions.admit(client, is_exempt_per_client=trusted):
            logger.warning("refused connection from %s: too many sessions (%d open in all)",
                           host, self.sessions.total)
            return Admission(client, trusted, "421 4.7.0 Too many connections, try again later")
        return Admission(client, trusted)

    def release(self, client: str) -> None:
        self.sessions.release(client)

    async def is_locked(self, client: str) -> bool:
        return self.auth_throttle.is_locked(client)

    async def authenticate(self, secret: str) -> Principal | None:
        return await self._spool.authenticate(secret)

    async def auth_succeeded(self, client: str) -> None:
        self.auth_throttle.record_success(client)

    async def auth_failed(self, client: str) -> AuthVerdict:
        return self.auth_throttle.record_failure(client)

    async def commit(self, submission: Submission, host: str) -> str:
        """Hold the idempotency key, store the message, and answer DATA with what happened."""
        principal = submission.principal
        key = submission.idempotency
        try:
            async with self._spool.hold_idempotency_keys(principal, [key]) as [verdict]:
                if isinstance(verdict, Accepted):
                    logger.info("%s: replayed for idempotency key from client=%s", verdict.id, host)
                    return f"250 2.0.0 Ok: queued as {verdict.id}"
                if isinstance(verdict, IdempotencyConflict):
                    return _idempotency_reply(verdict)
                accepted = await self._spool.accept(submission)
        except PolicyRejected as exc:
            return _policy_reply(exc)
        except IdempotencyConflict as exc:
            return _idempotency_reply(exc)
        except StorageFull:
            return "452 4.3.1 Insufficient system storage"
        except SpoolClosed:
            return "451 4.3.2 Service shutting down, try again later"
        except Exception:  # answered here, so that aiosmtpd resets the transaction
            logger.exception("accepting a message from %s failed", host)
            return "451 4.3.0 Internal error, try again later"
        # What only the session knows (Postfix smtpd's `client=` line); intake logs the
        # `from=<…> to=<…> status=…` line of each recipient for both doors.
        logger.info(
            "%s: client=%s auth=%s size=%d nrcpt=%d",
            accepted.id,
            host,
            principal.key_id if principal else "-",
            len(submission.content),
            len(submission.recipients),
        )
        return f"250 2.0.0 Ok: queued as {accepted.id}"


def _idempotency_reply(exc: IdempotencyConflict) -> str:
    if exc.slug == IdempotencyConflict.IN_PROGRESS:
        return "451 4.5.0 A message with this idempotency key is still being accepted"
    return "550 5.7.0 This idempotency key was already used for a different message"


def _policy_reply(exc: PolicyRejected) -> str:
    if exc.slug == "message_too_large":
        return f"552 5.3.4 {exc}"
    if exc.slug == "too_many_recipients":
        return f"452 4.5.3 {exc}"
    if exc.slug == "invalid_recipient":
        return f"550 5.1.3 {exc}"
    return f"550 5.7.1 {exc}"
