"""SMTP session accounting: who is connected, one log line per session, and the drain.

Owns the set of live submission sessions (an aiosmtpd `SMTP` subclass reports each session's
start and end, and watches the replies it sends: `250 2.0.0` is an accepted message, `535` a
refused AUTH), the per-session log line and session metrics, and shutdown's part on the SMTP side:
once `drain()` is called, new connections get `421 4.3.2` and are closed (the listeners stay open
for that), idle sessions are told `421 4.3.2` and closed, and sessions inside a transaction finish
it first (RFC 5321 §3.8: a server that must shut down answers 421).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, AnyStr, Protocol, cast

from relay.submission import Admission, SubmissionHandler, SubmissionSMTP
from store import Principal

logger = logging.getLogger(__name__)

SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


class _Counter(Protocol):
    def inc(self) -> None: ...


class SessionMetrics(Protocol):
    """What sessions count: relay/metrics.py's `Metrics`, or a worker's forwarder to it."""

    @property
    def smtp_sessions(self) -> _Counter: ...

    @property
    def smtp_auth_failures(self) -> _Counter: ...

    def smtp_session_opened(self) -> None: ...

    def smtp_session_closed(self) -> None: ...


class Sessions:
    """The live SMTP sessions of every listener of one process."""

    def __init__(self, metrics: SessionMetrics) -> None:
        self._metrics = metrics
        self._live: set[TrackedSMTP] = set()
        self._none_live = asyncio.Event()
        self._none_live.set()
        self.is_draining = False

    def __len__(self) -> int:
        return len(self._live)

    def make_smtp(
        self, handler: SubmissionHandler, admission: Admission, **options: Any
    ) -> SubmissionSMTP:
        """What `protocol_factory` calls to build each admitted session's protocol."""
        return TrackedSMTP(self, handler, admission, **options)

    def guard(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A listener's factory that answers 421 instead once the drain has begun."""

        def guarded() -> asyncio.Protocol:
            if self.is_draining:
                self._metrics.smtp_sessions.inc()
                return _Refusal()
            return factory()

        return guarded

    def drain(self) -> None:
        """Stop taking new work: refuse new sessions, close idle ones, let transactions end."""
        self.is_draining = True
        for session in list(self._live):
            session.drain()

    async def wait_closed(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until no session is open, at most `timeout` seconds; whether that happened."""
        try:
            await asyncio.wait_for(self._none_live.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close_all(self) -> None:
        """Cut the sessions still open (the drain ran out of time): 421, then close."""
        for session in list(self._live):
            session.close_for_shutdown()

    # -- called by TrackedSMTP ----------------------------------------------------------------

    def _opened(self, session: TrackedSMTP) -> None:
        self._live.add(session)
        self._none_live.clear()
        self._metrics.smtp_session_opened()
        if self.is_draining:
            session.drain()

    def _closed(self, session: TrackedSMTP) -> None:
        if session not in self._live:
            return
        self._live.discard(session)
        self._metrics.smtp_session_closed()
        if not self._live:
            self._none_live.set()

    def _auth_failed(self) -> None:
        self._metrics.smtp_auth_failures.inc()


class TrackedSMTP(SubmissionSMTP):
    """The submission protocol, reporting to `Sessions`; the SMTP dialogue itself is unchanged."""

    def __init__(
        self, sessions: Sessions, handler: SubmissionHandler, admission: Admission, **options: Any
    ) -> None:
        super().__init__(handler, admission, **options)
        self._sessions = sessions
        self._started = time.monotonic()
        self._is_draining = False
        self._accepted = 0
        self._auth_failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again after STARTTLS with the TLS transport: the session began the first time.
        is_new = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if is_new:
            logger.debug("smtp connect from %s", _peer(transport.get_extra_info("peername")))
            self._sessions._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        assert session is not None  # made in connection_made
        super().connection_lost(error)
        self._sessions._closed(self)
        principal = session.auth_data if isinstance(session.auth_data, Principal) else None
        logger.info(
            "smtp session from %s: helo=%s tls=%s auth=%s accepted=%d auth_failures=%d "
            "duration=%.1fs%s",
            _peer(session.peer),
            _printable(session.host_name or "-"),
            "yes" if session.ssl is not None else "no",
            principal.key_id if principal else "-",
            self._accepted,
            self._auth_failures,
            time.monotonic() - self._started,
            " (shutdown)" if self._is_draining else "",
        )

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        if reply.startswith("250 2.0.0"):  # only the end of DATA answers 2.0.0 (submission.py)
            self._accepted += 1
        elif reply.startswith("535"):
            self._auth_failures += 1
            self._sessions._auth_failed()
        if self._is_draining and self.is_idle and not reply.startswith(("221", "421")):
            self.close_for_shutdown()

    @property
    def is_idle(self) -> bool:
        """No mail transaction is open (none begun, or the last one answered)."""
        return self.envelope is None or self.envelope.mail_from is None

    def drain(self) -> None:
        self._is_draining = True
        if self.is_idle:
            self.close_for_shutdown()

    def close_for_shutdown(self) -> None:
        self._is_draining = True
        # uvloop's transports are no subclasses of asyncio's classes: cast, never isinstance
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(SHUTTING_DOWN)
            transport.close()


class _Refusal(asyncio.Protocol):
    """What a new connection gets while the service drains: 421, then the end."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(SHUTTING_DOWN)
        writer.close()


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def _printable(text: str) -> str:
    """A client-chosen name made safe for a log line (no control characters), cut to 100."""
    return "".join(c if c.isprintable() and c != " " else "?" for c in text[:100])
