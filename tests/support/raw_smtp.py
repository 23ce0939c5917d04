"""A raw SMTP client over asyncio streams, for protocol abuse smtplib will not commit.

Owns `RawSmtp`: send exact bytes (pipelined commands, bare CR/LF, smuggling sequences), read
whole replies (multi-line included), upgrade to TLS mid-stream, and see when the server hangs up.
"""

from __future__ import annotations

import asyncio
import ssl
from types import TracebackType


class RawSmtp:
    """One connection; `await RawSmtp.open(port)` reads the greeting into `greeting`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def open(
        cls, port: int, *, tls: ssl.SSLContext | None = None, source: str | None = None
    ) -> RawSmtp:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None,
                local_addr=(source, 0) if source else None,
            ),
            10,
        )
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10) -> str:
        """One whole reply, its lines joined by "\\n"; "" if the server closed the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def command(self, line: str | bytes) -> str:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def is_closed_by_server(self, timeout: float = 10) -> bool:
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    async def __aenter__(self) -> RawSmtp:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
