"""A minimal, fast SMTP sink for the benchmarks: accepts everything, keeps nothing, counts.

Not a test double with scripted replies (tests/support/mx_sink.py is that): it answers EHLO,
MAIL, RCPT, DATA, RSET, NOOP and QUIT as fast as a small asyncio protocol can, so that the
receiving side costs little CPU next to the Postroom being measured. `SinkGroup` runs several
sinks on 127.0.0.1 in a thread of their own and counts messages and sessions across them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

_EHLO = b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"


@dataclass
class Counts:
    messages: int = 0
    sessions: int = 0
    bytes: int = 0
    first_at: float | None = None  # time.perf_counter() of the first message
    last_at: float | None = None


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counts.sessions += 1
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        replies: list[bytes] = []
        while self.buffer:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    end, size = 0, 3
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    size = 5
                self.counts.bytes += end
                self.buffer = self.buffer[end + size :]
                self.in_data = False
                now = time.perf_counter()
                self.counts.messages += 1
                if self.counts.first_at is None:
                    self.counts.first_at = now
                self.counts.last_at = now
                replies.append(b"250 2.0.0 Ok: kept nowhere\r\n")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(_EHLO)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                replies.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            else:
                replies.append(b"502 5.5.2 Not implemented\r\n")
        if replies:
            self.transport.write(b"".join(replies))


@dataclass
class SinkGroup:
    """`count` sinks on 127.0.0.1 ephemeral ports, served by a thread's own event loop."""

    count: int
    counts: Counts = field(default_factory=Counts)
    ports: list[int] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _servers: list[asyncio.Server] = field(default_factory=list)

    def __enter__(self) -> SinkGroup:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="sinks", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(30)
        return self

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.count):
            server = await loop.create_server(
                lambda: _SinkProtocol(self.counts), "127.0.0.1", 0, backlog=1024
            )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return
        for server in self._servers:
            loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def wait_for(self, messages: int, timeout: float) -> bool:
        """Block until the sinks have `messages` in all; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.counts.messages < messages:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
