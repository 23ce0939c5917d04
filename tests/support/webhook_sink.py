"""A minimal real HTTP/1.1 receiver in the running event loop, standing in for webhook targets.

Owns `WebhookSink`, the `WebhookRequest` record it stores and the `Reply` scripts that make it
misbehave (hang, trickle its answer a byte at a time, send a huge body). Handles keep-alive and
both Content-Length and chunked request bodies; nothing fancier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class WebhookRequest:
    method: str
    path: str  # the request target as sent, query string included
    headers: dict[str, str]  # names lowercased; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """How to answer one request: after `delay` seconds, `status` with a body of `body_size`
    bytes (the status phrase when 0), the whole answer one byte every `trickle` seconds."""

    status: int = 200
    delay: float = 0.0
    trickle: float | None = None
    body_size: int = 0


_CHUNK = 64 * 1024


class WebhookSink:
    """HTTP server on 127.0.0.1:<ephemeral>; answers scripted statuses, then `default_status`."""

    def __init__(self, default_status: int = 200, port: int = 0) -> None:
        self.default_status = default_status
        self.port = port  # 0: ephemeral; a restarted sink binds the port it had again
        self.location: str | None = None  # sent as Location with 3xx answers
        self.requests: list[WebhookRequest] = []
        self.body_bytes_sent: list[int] = []  # per Reply with a body_size: bytes written
        self._statuses: deque[int | Reply] = deque()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def script_status(self, *statuses: int) -> None:
        """Statuses for the next requests, in order, e.g. script_status(500, 500)."""
        self._statuses.extend(statuses)

    def script(self, *replies: Reply) -> None:
        """Replies for the next requests, in order, before the scripted or default statuses."""
        self._statuses.extend(replies)

    async def start(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> WebhookSink:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for_requests(self, n: int, timeout: float = 10) -> list[WebhookRequest]:
        """Wait until at least `n` requests are recorded; return them all."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= n)
        except TimeoutError:
            raise TimeoutError(
                f"WebhookSink at {self.url} has {len(self.requests)} of {n} requests "
                f"after {timeout}s"
            ) from None
        return list(self.requests)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while request := await _read_request(reader):
                scripted = self._statuses.popleft() if self._statuses else self.default_status
                reply = scripted if isinstance(scripted, Reply) else Reply(scripted)
                async with self._changed:
                    self.requests.append(request)
                    self._changed.notify_all()
                close = request.headers.get("connection", "").lower() == "close"
                await asyncio.sleep(reply.delay)
                await self._answer(writer, reply, close)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stop(); ending normally, since 3.11's start_server logs cancelled handlers
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply, close: bool) -> None:
        phrase = HTTPStatus(reply.status).phrase
        location = (
            f"Location: {self.location}\r\n"
            if self.location and 300 <= reply.status < 400
            else ""
        )
        head = (
            f"HTTP/1.1 {reply.status} {phrase}\r\n{location}"
            f"Content-Type: text/plain\r\nContent-Length: {reply.body_size or len(phrase)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
        )
        if reply.trickle is None:
            writer.write(head)
        else:
            for i in range(len(head)):
                writer.write(head[i : i + 1])
                await writer.drain()  # raises once the client hangs up
                await asyncio.sleep(reply.trickle)
        if not reply.body_size:
            writer.write(phrase.encode())
            await writer.drain()
            return
        index = len(self.body_bytes_sent)
        self.body_bytes_sent.append(0)
        while self.body_bytes_sent[index] < reply.body_size:
            # In chunks, paced by the client's reading: only what it reads is ever made.
            chunk = b"x" * min(_CHUNK, reply.body_size - self.body_bytes_sent[index])
            writer.write(chunk)
            await writer.drain()  # raises once the client hangs up
            self.body_bytes_sent[index] += len(chunk)


async def _read_request(reader: asyncio.StreamReader) -> WebhookRequest | None:
    """Parse one request; None on a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    method, path, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
            pass
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return WebhookRequest(method, path, headers, body)
