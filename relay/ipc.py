"""One channel between the service process and an SMTP worker process (relay/workers.py).

Owns the wire: length-prefixed frames of pickled tuples over a socketpair the service made, and
the multiplexing of calls on it. Either side may `call(op, *args)` and await the answer, or
`notify(op, *args)` without one; `serve(handle)` answers the other side's calls and notes until
the channel closes. Pickle is safe here because both ends are Postroom itself: the socketpair is
created by the service and inherited by the worker it spawns, and no other process can reach it.

A call whose channel closes before the answer raises `ChannelClosed`; a call the other side
failed raises the same exception here (it is pickled too), or `RemoteError` with its class name
and text when it cannot be. A frame that does not unpickle, or one larger than `MAX_FRAME`, is a
broken peer: the channel closes, and so do the calls waiting on it.
"""

from __future__ import annotations

import asyncio
import collections
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


class _Wire(asyncio.Protocol):
    """The socket's protocol: hands what arrives to its channel, which cuts it into frames."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def data_received(self, data: bytes) -> None:
        self._channel._received(data)

    def eof_received(self) -> bool:
        return False  # the other side is done: close, which ends the channel

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._lost()


class Channel:
    """Frames are read by a protocol, not a stream reader: every frame a read brings is cut out
    and handled within that read's callback, with no coroutine woken per frame. Frames sent
    within one turn of the loop leave in one write, at the end of that turn (profiled under
    bench/vs_postfix.sh: the stream reader's two awaits per frame and a write per frame were
    most of the channel's cost on both sides)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        #: Frames that came before `serve` was called, for `receive`.
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._arrived: asyncio.Future[None] | None = None
        self._handle: Handler | None = None
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_closed = False

    @classmethod
    async def over(cls, sock: Any) -> Channel:
        """A channel over a connected stream socket (one end of a socketpair)."""
        channel = cls()
        transport, _ = await asyncio.get_running_loop().create_unix_connection(
            lambda: _Wire(channel), sock=sock
        )
        channel._transport = transport
        return channel

    # -- sending -------------------------------------------------------------------------------

    def _send(self, frame: tuple[Any, ...]) -> None:
        if self.is_closed:
            raise ChannelClosed("the channel is closed")
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(_HEADER.pack(len(data)))
        self._outgoing.append(data)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        transport = self._transport
        if outgoing and transport is not None and not transport.is_closing():
            transport.write(b"".join(outgoing))

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

    def _received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data  # the usual case: the read holds whole frames, nothing is copied
        offset, size_of = 0, len(view)
        while size_of - offset >= _HEADER.size and not self.is_closed:
            (size,) = _HEADER.unpack_from(view, offset)
            if size > MAX_FRAME:
                logger.error("a frame of %d bytes from the other process: closing", size)
                self.close()
                return
            end = offset + _HEADER.size + size
            if end > size_of:
                break
            try:
                frame = pickle.loads(view[offset + _HEADER.size:end])  # noqa: S301 (our own peer)
            except Exception:
                logger.exception("a frame from the other process does not unpickle: closing")
                self.close()
                return
            offset = end
            self._arrive(frame)
        if view is buffer:
            del buffer[:offset]
        elif offset < size_of:
            buffer += data[offset:]

    def _arrive(self, frame: tuple[Any, ...]) -> None:
        if self._handle is None:
            self._inbox.append(frame)
            if self._arrived is not None and not self._arrived.done():
                self._arrived.set_result(None)
            return
        kind, ident, op, payload = frame
        if kind == _ANSWER or kind == _FAILURE:
            future = self._waiting.get(ident)
            if future is not None and not future.done():
                if kind == _ANSWER:
                    future.set_result(payload)
                else:
                    future.set_exception(_failure(payload))
            return
        self._dispatch(self._handle, kind, ident, op, payload)

    def _lost(self) -> None:
        self.close()
        self._transport = None

    async def receive(self) -> tuple[Any, ...]:
        """The next frame, for a side that reads one before serving (the worker's start-up)."""
        while not self._inbox:
            if self.is_closed:
                raise ChannelClosed("the other process is gone")
            self._arrived = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._arrived, self._ended], return_when=asyncio.FIRST_COMPLETED)
        return self._inbox.popleft()

    async def serve(self, handle: Handler) -> None:
        """Answer calls and notes with `handle(op, args)` until the other side closes.

        `handle` may return a value or an awaitable; an awaitable is run in its own task, so a
        slow call (a commit) does not hold up the ones behind it.
        """
        self._handle = handle
        try:
            while self._inbox and not self.is_closed:
                self._arrive(self._inbox.popleft())
            await asyncio.shield(self._ended)
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
        """Close the channel: calls still waiting raise `ChannelClosed`; frames already sent
        still go out."""
        if self.is_closed:
            return
        self.is_closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other process is gone"))
        self._waiting.clear()
        if not self._ended.done():
            self._ended.set_result(None)
        with contextlib.suppress(Exception):
            self._flush()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
