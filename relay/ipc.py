"""One channel between the service process and an SMTP worker process (relay/workers.py).

Owns the wire: length-prefixed frames of pickled tuples over a socketpair the service made, and
the multiplexing of calls on it. Either side may `call(op, *args)` and await the answer, or
`notify(op, *args)` without one; `serve(handle)` answers the other side's calls and notes until
the channel closes. Pickle is safe here because both ends are Postroom itself: the socketpair is
created by the service and inherited by the worker it spawns, and no other process can reach it.

A call whose channel closes before the answer raises `ChannelClosed`; a call the other side
failed raises the same exception here (it is pickled too), or `RemoteError` with its class name
and text when it cannot be.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: Largest frame accepted: a message of `smtp.max_message_size` plus its envelope fits easily
#: below this; anything bigger is a broken peer.
MAX_FRAME = 1 << 31

_CALL, _ANSWER, _FAILURE, _NOTE = range(4)

Handler = Callable[[str, tuple[Any, ...]], Any]


class StartSettings(NamedTuple):
    """Stands in a frame for the settings the service started with, which each worker was sent
    once, at its start: a call that passes them (every API send does) sends this instead, since
    pickling them was ~85% of the cost of an API send's frame."""


class ChannelClosed(ConnectionError):
    """The other process is gone (or the channel was closed) before the answer came."""


class RemoteError(RuntimeError):
    """The other side raised while answering: `kind` is the exception's class name."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind = kind


def _failure(inner: tuple[str, Any]) -> BaseException:
    """The exception a failure frame carries: itself if it unpickles, else a RemoteError."""
    form, data = inner
    if form == "pickled":
        try:
            exc = pickle.loads(data)  # noqa: S301 (our own peer)
        except Exception as broken:  # noqa: BLE001
            return RemoteError(type(broken).__name__, f"cannot rebuild the exception: {broken}")
        if isinstance(exc, BaseException):
            return exc
    kind, text = data if form == "named" else ("RemoteError", repr(data))
    return RemoteError(str(kind), str(text))


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.is_closed = False

    @classmethod
    async def over(cls, sock: Any) -> Channel:
        """A channel over a connected stream socket (one end of a socketpair)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    # -- sending -------------------------------------------------------------------------------

    def _send(self, frame: tuple[Any, ...]) -> None:
        if self.is_closed:
            raise ChannelClosed("the channel is closed")
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def call(self, op: str, *args: Any) -> Any:
        """Ask the other side to run `op(*args)` and return its answer."""
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self._send((_CALL, ident, op, args))
            return await future
        finally:
            self._waiting.pop(ident, None)

    def notify(self, op: str, *args: Any) -> None:
        """Tell the other side `op(*args)`, with no answer; nothing happens once closed."""
        if not self.is_closed:
            self._send((_NOTE, 0, op, args))

    # -- receiving -----------------------------------------------------------------------------

    async def receive(self) -> tuple[Any, ...]:
        """The next frame, for a side that reads one before serving (the worker's start-up)."""
        header = await self._reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ChannelClosed(f"a frame of {size} bytes: the peer is broken")
        frame = pickle.loads(await self._reader.readexactly(size))  # noqa: S301 (our own peer)
        assert isinstance(frame, tuple)
        return frame

    async def serve(self, handle: Handler) -> None:
        """Answer calls and notes with `handle(op, args)` until the other side closes.

        `handle` may return a value or an awaitable; an awaitable is run in its own task, so a
        slow call (a commit) does not hold up the ones behind it.
        """
        try:
            while True:
                try:
                    kind, ident, op, payload = await self.receive()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if kind == _ANSWER or kind == _FAILURE:
                    future = self._waiting.get(ident)
                    if future is not None and not future.done():
                        if kind == _ANSWER:
                            future.set_result(payload)
                        else:
                            future.set_exception(_failure(payload))
                    continue
                self._dispatch(handle, kind, ident, op, payload)
        finally:
            self.close()

    def _dispatch(
        self, handle: Handler, kind: int, ident: int, op: str, args: tuple[Any, ...]
    ) -> None:
        try:
            result = handle(op, args)
        except Exception as exc:  # noqa: BLE001 (answered to the caller, which raises it)
            self._answer(kind, ident, exc=exc)
            return
        if isinstance(result, Awaitable):
            task = asyncio.get_running_loop().create_task(self._finish(kind, ident, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._answer(kind, ident, result)

    async def _finish(self, kind: int, ident: int, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception as exc:  # noqa: BLE001 (answered to the caller, which raises it)
            self._answer(kind, ident, exc=exc)
        else:
            self._answer(kind, ident, result)

    def _answer(
        self, kind: int, ident: int, result: Any = None, exc: Exception | None = None
    ) -> None:
        if exc is not None and not isinstance(exc, ChannelClosed):
            logger.debug("answering a call failed", exc_info=exc)
        if kind != _CALL or self.is_closed:
            if exc is not None and kind == _NOTE:
                logger.error("handling a note from the other process failed", exc_info=exc)
            return
        if exc is None:
            try:
                self._send((_ANSWER, ident, "", result))
                return
            except Exception as unsendable:  # an answer that does not pickle: the call fails
                logger.error("an answer cannot be sent back", exc_info=unsendable)
                exc = unsendable
        # The exception travels pickled inside the frame, so that one the caller cannot
        # rebuild fails that call alone (as RemoteError), not the whole channel.
        try:
            inner: tuple[str, Any] = ("pickled", pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))
        except Exception:  # noqa: BLE001 (its class name and text will do)
            inner = ("named", (type(exc).__name__, str(exc)))
        self._send((_FAILURE, ident, "", inner))

    def close(self) -> None:
        """Close the channel: calls still waiting raise `ChannelClosed`."""
        if self.is_closed:
            return
        self.is_closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other process is gone"))
        self._waiting.clear()
        with contextlib.suppress(Exception):
            self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
