"""A real SMTP server (aiosmtpd) in the running event loop, standing in for a remote MX.

Owns `MxSink` (records accepted messages, serves scripted replies, counts sessions) and the
`Received` record it stores.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    """One message the sink accepted. A null sender (MAIL FROM:<>) is recorded as "<>"."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received after dot-unstuffing: CRLF line endings, no decoding
    peer: str  # "host:port" of the client
    tls: bool  # True if the session had completed STARTTLS


class _Handler:
    """aiosmtpd hooks; kept apart from MxSink so its public API has no handle_* names."""

    def __init__(self, sink: MxSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order; it just never says so.
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = _pop(self.sink._mail_script)
        if reply and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = _pop(self.sink._rcpt_scripts.get(address.lower()))
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)  # any domain is accepted
        envelope.rcpt_options.extend(options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_delay:
            sink = self.sink
            sink._in_data += 1
            sink.max_concurrent_data = max(sink.max_concurrent_data, sink._in_data)
            try:
                await asyncio.sleep(sink.data_delay)  # a slow MX: sessions overlap
            finally:
                sink._in_data -= 1
        reply = _pop(self.sink._data_script)
        if reply and not reply.startswith("2"):
            return reply
        host, port = session.peer[:2]
        await self.sink._record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                peer=f"{host}:{port}",
                tls=session.ssl is not None,
            )
        )
        return reply or "250 2.0.0 OK queued"


def _pop(queue: deque[str] | None) -> str | None:
    return queue.popleft() if queue else None


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol, reporting connection open and close to the sink."""

    def __init__(self, sink: MxSink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self.sink = sink
        self._is_greeted = False

    async def push(self, status: Any) -> None:
        if not self._is_greeted:  # the first line of a session is aiosmtpd's 220 greeting
            self._is_greeted = True
            status = _pop(self.sink._greeting_script) or status
        await super().push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the second call that follows STARTTLS
            self.sink._opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._closed(self)
        super().connection_lost(error)


class MxSink:
    """SMTP server on 127.0.0.1:<ephemeral> (or `address`:`port`), run in the current loop.

    Accepts any recipient; `messages` holds a `Received` per accepted message. Scripted replies
    are consumed one per matching command, then normal acceptance resumes; a 2xx scripted reply
    still accepts (with that text).
    """

    def __init__(
        self,
        hostname: str = "mx.test",
        tls_context: ssl.SSLContext | None = None,
        *,
        data_size_limit: int | None = 64 * 1024 * 1024,
        smtputf8: bool = True,
        authenticator: Any = None,
        address: str = "127.0.0.1",
        port: int = 0,
        pipelining: bool = True,
    ) -> None:
        self.hostname = hostname
        #: Offer PIPELINING in the EHLO reply, as real MTAs do (RFC 2920).
        self.pipelining = pipelining
        #: Where to listen: another 127.0.0.x with an existing sink's port is a second MX host.
        self.address = address
        #: aiosmtpd authenticator; when set, AUTH (after STARTTLS) is required to send.
        self.authenticator = authenticator
        self.tls_context = tls_context
        self.data_size_limit = data_size_limit
        self.smtputf8 = smtputf8
        self.port = port
        #: Seconds each DATA waits before its reply (a slow MX whose sessions overlap).
        self.data_delay = 0.0
        self.messages: list[Received] = []
        self.sessions_total = 0
        self.max_concurrent_sessions = 0
        #: With `data_delay`: the most messages in DATA at once (idle sessions not counted).
        self.max_concurrent_data = 0
        self._in_data = 0
        self._live: set[_SinkSMTP] = set()
        self._greeting_script: deque[str] = deque()
        self._mail_script: deque[str] = deque()
        self._rcpt_scripts: dict[str, deque[str]] = {}
        self._data_script: deque[str] = deque()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    # -- scripting ---------------------------------------------------------------------------

    def script_greeting(self, *replies: str) -> None:
        """Greetings for the next sessions instead of 220, e.g. "554 5.7.1 go away"."""
        self._greeting_script.extend(replies)

    def script_mail(self, *replies: str) -> None:
        """Replies for the next MAIL FROM commands, in order, e.g. "421 4.7.0 go away"."""
        self._mail_script.extend(replies)

    def script_rcpt(self, address: str, *replies: str) -> None:
        """Replies for the next RCPT TO of `address` (case-insensitive), in order."""
        self._rcpt_scripts.setdefault(address.lower(), deque()).extend(replies)

    def script_data(self, *replies: str) -> None:
        """Replies after the end of DATA for the next transactions, in order."""
        self._data_script.extend(replies)

    @property
    def active_sessions(self) -> int:
        return len(self._live)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> MxSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _protocol(self) -> _SinkSMTP:
        # Every argument is explicit so aiosmtpd neither guesses the loop nor warns.
        return _SinkSMTP(
            self,
            hostname=self.hostname,
            ident="Postroom test MX",
            tls_context=self.tls_context,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
            data_size_limit=self.data_size_limit,
            authenticator=self.authenticator,
            auth_required=self.authenticator is not None,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for proto in list(self._live):
            # Close the raw socket transport, skipping a TLS close_notify exchange.
            transport = proto._original_transport or proto.transport
            if transport is not None:
                transport.close()
        for _ in range(250):
            if not self._live:
                break
            await asyncio.sleep(0.02)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> MxSink:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- waiting -----------------------------------------------------------------------------

    async def wait_for_messages(self, n: int, timeout: float = 10) -> list[Received]:
        """Wait until at least `n` messages are recorded; return them all."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.messages) >= n)
        except TimeoutError:
            pending = len(self._mail_script) + len(self._data_script)
            pending += len(self._greeting_script)
            pending += sum(len(q) for q in self._rcpt_scripts.values())
            raise TimeoutError(
                f"MxSink {self.hostname} (port {self.port}) has {len(self.messages)} of {n} "
                f"messages after {timeout}s; sessions so far: {self.sessions_total}, "
                f"open: {len(self._live)}, scripted replies unused: {pending}"
            ) from None
        return list(self.messages)

    # -- called by the protocol and handler --------------------------------------------------

    def _opened(self, proto: _SinkSMTP) -> None:
        self._live.add(proto)
        self.sessions_total += 1
        self.max_concurrent_sessions = max(self.max_concurrent_sessions, len(self._live))

    def _closed(self, proto: _SinkSMTP) -> None:
        self._live.discard(proto)

    async def _record(self, message: Received) -> None:
        async with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    # -- server-side closes --------------------------------------------------------------------

    def drop_sessions(self) -> None:
        """Close every open session from the server side, as an MX that times clients out."""
        for proto in list(self._live):
            transport = proto._original_transport or proto.transport
            if transport is not None:
                transport.close()
