"""uvicorn as Postroom runs it: its server without signal handling, and its HTTP protocol with
each response's writes joined into one (`api.listen` and `api.public_listen`, in the service or
in the worker processes).

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
import contextlib
import os
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class StartupError(RuntimeError):
    """Postroom cannot start with this configuration."""


def os_reason(exc: OSError) -> str:
    """The errno's own words (`address already in use`), not asyncio's longer sentence."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


class ApiServer(uvicorn.Server):
    """uvicorn without its signal handlers: the service owns signals (STYLE.md gotcha 4)."""

    def __init__(self, config: uvicorn.Config, setting: str) -> None:
        super().__init__(config)
        self.setting = setting  # where the address came from, for the start-up error

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn logs a bind error and calls sys.exit(3) from inside its task; SystemExit
        # escapes the event loop at once, so it is turned into a StartupError here.
        try:
            await super().startup(sockets)
        except SystemExit as exc:
            address = f"{self.config.host}:{self.config.port}"
            cause = exc.__context__
            reason = os_reason(cause) if isinstance(cause, OSError) else "cannot listen"
            raise StartupError(f"{self.setting} {address}: {reason}") from None

    async def begin(
        self, name: str, sockets: list[socket.socket] | None = None
    ) -> asyncio.Task[None]:
        """Serve in a task of its own, returned once listening; what stopped it, if it could
        not start (a taken port: `StartupError`)."""
        task = asyncio.create_task(self.serve(sockets), name=name)
        while not self.started:
            if task.done():
                await task
                raise RuntimeError(f"the server of {self.setting} stopped during start-up")
            await asyncio.sleep(0.01)
        return task

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return len(self.server_state.tasks)


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
