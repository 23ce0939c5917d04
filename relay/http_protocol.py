"""uvicorn's HTTP protocol with each response's writes joined into one (`api.listen` and
`api.public_listen`).

uvicorn writes a response's status line and headers, then its body, each in a socket write of
its own: two system calls, and on loopback two wake-ups of the client, for every JSON answer the
API gives. Profiled under bench/accept_http.py they were 7% of the service's loop. Here the
protocol gets a transport that holds what is written during one turn of the event loop and
writes it at the end of that turn, in one call. A response written in one turn (every JSON
response) leaves whole; a streamed body (the event stream) leaves chunk by chunk as before, each
chunk at the end of the turn that wrote it. Closing or aborting writes what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _JoinedWrites:
    """A transport that joins the writes of one loop turn; everything else is the socket's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, set_protocol, …
        return getattr(self._transport, name)


class JoinedWritesProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=JoinedWritesProtocol)`: httptools, one write per loop turn."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        joined = _JoinedWrites(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(joined)  # type: ignore[arg-type]
