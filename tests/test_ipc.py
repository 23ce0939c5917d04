"""The channel between the service and its SMTP workers (relay/ipc.py), over a real socketpair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.ipc import Channel, ChannelClosed, RemoteError


class Unrebuildable(Exception):
    """Pickles, but cannot be unpickled: its constructor wants an argument its args lack."""

    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


async def answer(op: str, args: tuple[Any, ...]) -> Any:
    if op == "double":
        return args[0] * 2
    if op == "fail":
        raise ValueError(f"no: {args[0]}")
    if op == "unrebuildable":
        raise Unrebuildable(code=7)
    if op == "unpicklable":
        return lambda: None
    if op == "slow":
        await asyncio.sleep(args[0])
        return "late"
    raise KeyError(op)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    ours, theirs = socket.socketpair()
    caller, answerer = await Channel.over(ours), await Channel.over(theirs)
    serving = [asyncio.create_task(answerer.serve(answer)), asyncio.create_task(
        caller.serve(lambda op, args: None)
    )]
    yield caller, answerer
    caller.close()
    answerer.close()
    await asyncio.gather(*serving, return_exceptions=True)


async def test_calls_are_answered_concurrently_and_in_kind(pair: tuple[Channel, Channel]):
    caller, _ = pair
    slow = asyncio.create_task(caller.call("slow", 0.2))
    assert await caller.call("double", b"ab") == b"abab"  # not held up behind the slow one
    assert not slow.done()
    with pytest.raises(ValueError, match="no: x"):  # raised here as itself
        await caller.call("fail", "x")
    assert await slow == "late"


async def test_a_failure_that_cannot_travel_fails_that_call_alone(pair: tuple[Channel, Channel]):
    caller, _ = pair
    with pytest.raises(RemoteError, match="cannot rebuild the exception"):
        await asyncio.wait_for(caller.call("unrebuildable"), 5)
    with pytest.raises(AttributeError, match="pickle"):  # an answer that does not pickle
        await asyncio.wait_for(caller.call("unpicklable"), 5)
    assert await caller.call("double", 21) == 42  # the channel is still good


async def test_calls_in_flight_end_when_the_other_side_goes(pair: tuple[Channel, Channel]):
    caller, answerer = pair
    pending = asyncio.create_task(caller.call("slow", 30))
    await asyncio.sleep(0.05)
    answerer.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(ChannelClosed):
        await caller.call("double", 1)
