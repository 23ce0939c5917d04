"""MX hosts that misbehave on purpose, on raw asyncio streams in the running loop.

Owns `HostileMx`, one server per `Behaviour`: SILENT accepts the TCP connection and never speaks;
STALL speaks SMTP up to the final dot of DATA and then never replies; DROP closes the connection
right after the final dot (the message may count as delivered there: at-least-once); GARBAGE
answers with lines that are not SMTP. `hanging` counts connections held open without an answer
due, so a test can watch the attempts hang; every connection is closed on `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from types import TracebackType


class Behaviour(enum.Enum):
    SILENT = "silent"
    STALL = "stall"
    DROP = "drop"
    GARBAGE = "garbage"


_GARBAGE = b"\x16\x03\x01\x02\x00 not smtp \xff\xfe\r\nHELLO?? 99x\r\n\r\n"


class HostileMx:
    """A misbehaving server on `host` (e.g. 127.0.0.2) and `port` (0: ephemeral)."""

    def __init__(self, behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour
        self.host = host
        self.port = port
        self.connections = 0  # accepted so far
        self.hanging = 0  # open now, owing an answer they will never give
        self.dots = 0  # final dots received (STALL, DROP)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> HostileMx:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> HostileMx:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.behaviour is Behaviour.SILENT:
                await self._hang(reader)
            elif self.behaviour is Behaviour.GARBAGE:
                writer.write(_GARBAGE)
                while await reader.readline():
                    writer.write(_GARBAGE)
                    await writer.drain()
            else:
                if not await self._until_dot(reader, writer):
                    return
                self.dots += 1
                if self.behaviour is Behaviour.STALL:
                    await self._hang(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up: what these servers are for
        except asyncio.CancelledError:
            pass  # stop(); ending normally, since 3.11's start_server logs cancelled handlers
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client hangs up (whatever it sends is ignored)."""
        self.hanging += 1
        try:
            while await reader.read(4096):
                pass
        finally:
            self.hanging -= 1

    @staticmethod
    async def _until_dot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """A plain SMTP conversation up to the final dot of DATA; False if the client quit."""
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-hostile.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                return True
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return False
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        return False
