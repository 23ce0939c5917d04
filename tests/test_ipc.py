"""The channel between the service and its SMTP workers (relay/ipc.py), over a real socketpair."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

import api.errors
import store.errors
from api.auth import KeyCheck
from api.messages import Item, SendContext, Sent
from api.ratelimit import Decision
from relay.ipc import Channel, ChannelClosed, RemoteError
from store import (
    Accepted,
    IdempotencyKey,
    MessageStatus,
    MessageType,
    Principal,
    Priority,
    Scope,
    Source,
    Submission,
    Tag,
)


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
    if op == "raise":
        raise args[0]
    if op == "echo":
        return args
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


async def test_frames_larger_than_a_read_and_many_frames_in_one_read_arrive_whole(
    pair: tuple[Channel, Channel],
):
    caller, _ = pair
    big = bytes(range(256)) * 40_000  # 10 MB: many reads on the way there and back
    assert await caller.call("double", big) == big * 2
    # Many calls sent in one turn of the loop travel in one write and are cut apart again.
    answers = await asyncio.gather(*(caller.call("double", n) for n in range(500)))
    assert answers == [n * 2 for n in range(500)]


async def test_a_frame_that_does_not_unpickle_closes_the_channel_and_fails_its_calls():
    ours, theirs = socket.socketpair()
    caller = await Channel.over(ours)
    serving = asyncio.create_task(caller.serve(lambda op, args: None))
    pending = asyncio.create_task(caller.call("double", 1))
    await asyncio.sleep(0.05)
    theirs.sendall(b"\x00\x00\x00\x05junk!")  # a whole frame, but not a pickle
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pending, 5)
    await asyncio.wait_for(serving, 5)  # serving ends, without raising
    assert caller.is_closed
    theirs.close()


async def test_a_read_that_ends_inside_a_frame_keeps_the_rest_for_the_next():
    ours, theirs = socket.socketpair()
    notes: list[Any] = []
    channel = await Channel.over(ours)
    serving = asyncio.create_task(channel.serve(lambda op, args: notes.append((op, *args))))

    def note(n: int) -> bytes:  # a note frame as the other process writes it
        data = pickle.dumps((3, 0, "note", (n, b"x" * 1000)), pickle.HIGHEST_PROTOCOL)
        return struct.pack(">I", len(data)) + data

    wire = note(1) + note(2) + note(3)
    cut = len(note(1)) + 500  # the first read: one whole frame and half the next
    theirs.sendall(wire[:cut])
    await asyncio.sleep(0.1)
    assert [n[1] for n in notes] == [1]
    theirs.sendall(wire[cut:cut + 2])  # then a sliver
    await asyncio.sleep(0.1)
    theirs.sendall(wire[cut + 2:])
    await asyncio.sleep(0.1)
    assert [(op, n, len(x)) for op, n, x in notes] == [("note", n, 1000) for n in (1, 2, 3)]
    theirs.close()
    await asyncio.wait_for(serving, 5)
    assert channel.is_closed


def _every_subclass(base: type[Exception]) -> list[type[Exception]]:
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _example(cls: type[Exception]) -> Exception:
    if cls is store.errors.SpoolUnavailable:
        return cls("/var/lib/postroom/spool.db", "permission denied")  # type: ignore[call-arg]
    if cls is store.errors.PolicyRejected:
        return cls("sender_not_allowed", "not for this key", "from")  # type: ignore[call-arg]
    if cls is store.errors.IdempotencyConflict:
        return cls(store.errors.IdempotencyConflict.REUSED)  # type: ignore[call-arg]
    if cls is store.errors.UnreadableKeys:
        return cls("acme.test", "s1", "wrong key")  # type: ignore[call-arg]
    if issubclass(cls, api.errors.ApiError):
        return cls("what went wrong", [api.errors.Detail("to", "bad")], slug="a_slug",
                   headers={"Retry-After": "3"})
    return cls("what went wrong")


async def test_the_spool_s_and_the_api_s_errors_arrive_as_themselves(
    pair: tuple[Channel, Channel],
):
    """What the service raises answering a worker's SMTP commit or API call is raised in the
    worker as the same error, its fields intact: the worker turns it into the right reply."""
    caller, _ = pair
    classes = _every_subclass(store.errors.StoreError) + _every_subclass(api.errors.ApiError)
    assert len(classes) > 20
    for cls in classes:
        sent = _example(cls)
        with pytest.raises(cls) as raised:
            await caller.call("raise", sent)
        got = raised.value
        assert type(got) is cls and got.args == sent.args and vars(got) == vars(sent), cls


async def test_the_records_of_every_send_cross_whole(pair: tuple[Channel, Channel]):
    """What a worker sends the service for each message, and what comes back, is rebuilt
    field by field (`store.pickled_by_fields`): every field must arrive, defaults included."""
    caller, _ = pair
    principal = Principal("key_1", "ci", Scope.FULL, ("acme.test",), is_test=True, rate_limit=9)
    key = IdempotencyKey("order-1", b"\x01" * 32)
    submission = Submission(
        "app@acme.test", ("a@example.test", "b@example.test"), b"Subject: hi\r\n\r\nx\r\n",
        Source.API, principal, (Tag("team", "ops"),), {"order": "1"},
        MessageType.MARKETING, Priority.HIGH, 1.5e9, key, is_system=False,
    )
    records = [
        principal, key, submission, Tag("team", "ops"),
        Accepted("msg_1", 1.5e9, MessageStatus.QUEUED),
        Item(key, submission, (("to", "a@example.test"),), None, "gen_1"),
        Sent(Accepted("msg_2", 2.0, MessageStatus.SCHEDULED), replayed=True),
        KeyCheck(principal, None, Decision(False, 9, 0, 7, 7), 9), KeyCheck(locked_for=3),
        SendContext({}, {"acme.test": "Acme"}),
    ]
    back = await caller.call("echo", *records)
    assert list(back) == records
    assert [type(r) for r in back] == [type(r) for r in records]
