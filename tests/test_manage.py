"""Managing messages: the filtered list and its cursor, the detail shape, cancel, reschedule."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from store import (
    MessageQuery,
    Outcome,
    RecipientStatus,
    Reply,
    Source,
    Spool,
    Submission,
    UnitAction,
    migrate,
)
from store.sql import Q
from tests.conftest import Running
from tests.support import wait_until

FUTURE = "2030-01-31T09:00:00Z"
CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


def body(**extra: Any) -> dict[str, Any]:
    return {"from": "app@acme.test", "to": "a@example.test", "subject": "hi", "text": "x",
            "scheduled_at": FUTURE, **extra}


async def send(client: Any, **extra: Any) -> str:
    r = await client.post("/v1/messages", json=body(**extra))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def ids(client: Any, **params: Any) -> list[str]:
    r = await client.get("/v1/messages", params=params)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


@pytest.mark.parametrize(
    "query", ["messages_page", "messages_page_by_recipient", "messages_page_by_tag",
              "messages_page_by_from", "messages_page_by_status"]
)
def test_every_list_query_is_served_by_an_index(tmp_path: Path, query: str):
    migrate(tmp_path / "spool.sqlite3")
    params = {"before": 2**62, "created_after": 0.0, "created_before": 1e18, "mail_from": "a@b",
              "tag": "t", "recipient": "r@b", "status": "queued", "limit": 10}
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + Q[query], params)]
    assert not any("TEMP B-TREE" in line for line in plan), plan
    assert not any(line.startswith("SCAN") for line in plan), plan


async def test_filters_select_what_they_name(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        plain = await send(client)
        tagged = await send(client, tags=["welcome", {"name": "tier", "value": "gold"}])
        other_from = await send(client, **{"from": "Billing <Bill@Acme.test>"})
        to_b = await send(client, to=["b@example.test", "c@example.test"])
        cancelled = await send(client, to="d@example.test")
        assert (await client.delete(f"/v1/messages/{cancelled}")).status_code == 200
        everything = [cancelled, to_b, other_from, tagged, plain]

        assert await ids(client) == everything
        assert await ids(client, tag="tier") == [tagged]
        assert await ids(client, tag="welcome") == [tagged]
        assert await ids(client, tag="nope") == []
        assert await ids(client, **{"from": "bill@acme.test"}) == [other_from]
        assert await ids(client, recipient="C@example.test") == [to_b]
        assert await ids(client, status="cancelled") == [cancelled]
        assert await ids(client, status="scheduled") == everything[1:]
        assert await ids(client, status="cancelled", recipient="a@example.test") == []
        assert await ids(client, status="scheduled", tag="tier") == [tagged]

        detail = (await client.get(f"/v1/messages/{other_from}")).json()
        created = detail["created_at"]
        after = await ids(client, created_after=created)
        before = await ids(client, created_before=created)
        assert other_from in after and other_from not in before
        assert sorted(after + before) == sorted(everything)

        r = await client.get("/v1/messages", params={"cursor": "bm90IGEgY3Vyc29y"})
        assert r.status_code == 422 and r.json()["error"] == "invalid_cursor"
        for bad in ({"limit": "101"}, {"status": "lost"}, {"created_after": "2030-01-01"}):
            r = await client.get("/v1/messages", params=bad)
            assert r.status_code == 422 and r.json()["error"] == "validation_error", bad


async def test_the_detail_shape_has_the_send_attributes(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        message_id = await send(client, tags=["t", {"name": "k", "value": "v"}],
                                metadata={"user": "42"}, message_type="marketing",
                                priority="high")
        r = await client.get(f"/v1/messages/{message_id}")
    got = r.json()
    assert got["tags"] == ["t", {"name": "k", "value": "v"}]
    assert got["metadata"] == {"user": "42"}
    assert (got["message_type"], got["priority"], got["test"]) == ("marketing", "high", False)
    assert got["scheduled_at"] == "2030-01-31T09:00:00.000Z"
    assert got["status"] == "scheduled" and got["events"][0]["type"] == "email.scheduled"


async def test_pages_neither_repeat_nor_skip_under_concurrent_sends(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        first = await client.post("/v1/messages/batch", json=[body() for _ in range(23)])
        original = [m["id"] for m in first.json()["data"]]
        seen: list[str] = []
        cursor = None
        while True:
            # Every page races a send: new messages land above the cursor, never inside.
            params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
            page, _ = await asyncio.gather(
                client.get("/v1/messages", params=params), send(client)
            )
            assert page.status_code == 200
            seen += [m["id"] for m in page.json()["data"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
    assert len(seen) == len(set(seen))  # no message twice
    listed = [i for i in seen if i in original]
    assert set(listed) == set(original)  # none skipped
    assert listed == sorted(listed, key=original.index, reverse=True)


async def test_cancel_and_its_answers(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        message_id = await send(client, to=["a@example.test", "b@example.test"], tags=["t"])
        r = await client.delete(f"/v1/messages/{message_id}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        assert {u["result"] for u in r.json()["recipients"]} == {"cancelled"}
        again = await client.delete(f"/v1/messages/{message_id}")
        assert again.status_code == 409 and again.json()["error"] == "not_cancellable"
        assert "already cancelled" in again.json()["details"][0]["message"]
        missing = await client.delete("/v1/messages/msg_nope")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        events = (await client.get("/v1/events", params={"message_id": message_id})).json()
    cancelled = [e for e in events["data"] if e["type"] == "email.cancelled"]
    assert {e["recipient"] for e in cancelled} == {"a@example.test", "b@example.test"}
    assert cancelled[0]["data"]["tags"] == ["t"]


async def test_reschedule_moves_what_is_not_sent(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        message_id = await send(client)
        r = await client.patch(f"/v1/messages/{message_id}",
                               json={"scheduled_at": "2031-05-01T00:00:00+02:00"})
        assert r.status_code == 200, r.text
        assert r.json()["scheduled_at"] == "2031-04-30T22:00:00.000Z"
        assert r.json()["recipients"][0]["result"] == "rescheduled"
        past = await client.patch(f"/v1/messages/{message_id}",
                                  json={"scheduled_at": "2001-01-01T00:00:00Z"})
        assert past.status_code == 422
        unknown = await client.patch(f"/v1/messages/{message_id}", json={"when": FUTURE})
        assert unknown.status_code == 422
        soon = await send(client)
        await client.patch(f"/v1/messages/{soon}", json={"scheduled_at": FUTURE})
        assert (await client.delete(f"/v1/messages/{soon}")).status_code == 200
        gone = await client.patch(f"/v1/messages/{soon}", json={"scheduled_at": FUTURE})
        assert gone.status_code == 409 and gone.json()["error"] == "not_reschedulable"
        detail = (await client.get(f"/v1/messages/{message_id}")).json()
    assert detail["scheduled_at"] == "2031-04-30T22:00:00.000Z"
    assert [e["type"] for e in detail["events"]] == ["email.scheduled", "email.scheduled"]
    assert detail["events"][1]["data"]["rescheduled"] is True


async def test_a_rescheduled_message_is_delivered_at_its_new_time(postroom: Running, mx_sink):
    async with postroom.http(await postroom.new_key()) as client:
        message_id = await send(client)
        soon = (await asyncio.to_thread(_in_seconds, 1)).isoformat()
        r = await client.patch(f"/v1/messages/{message_id}", json={"scheduled_at": soon})
        assert r.status_code == 200, r.text
        await mx_sink.wait_for_messages(1)
        await wait_until(lambda: _status(client, message_id, "delivered"))


def _in_seconds(seconds: float) -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


async def _status(client: Any, message_id: str, wanted: str) -> bool:
    return bool((await client.get(f"/v1/messages/{message_id}")).json()["status"] == wanted)


# -- a unit in flight is never cancelled ---------------------------------------------------------


class StallingMx:
    """An MX that accepts connections and never greets: an attempt stays in flight."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> StallingMx:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:  # the attempt ends at once: deferred, not timed out
            writer.close()
        assert self.server is not None
        self.server.close()


async def test_delete_says_when_the_only_unit_is_in_flight(start):
    async with StallingMx() as stall:
        postroom = await start(delivery={"mx_port": stall.port})
        async with postroom.http(await postroom.new_key()) as client:
            message_id = await send(client, scheduled_at=None)
            await wait_until(lambda: stall.writers, message="no attempt started")
            await wait_until(lambda: _status(client, message_id, "sending"))
            r = await client.delete(f"/v1/messages/{message_id}")
            assert r.status_code == 409 and r.json()["error"] == "not_cancellable"
            assert "in flight" in r.json()["details"][0]["message"]


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(
        Settings(server={"data_dir": str(tmp_path)}, policy={"allow_unconfigured_domains": True})
    )
    yield opened
    await opened.close()


async def test_cancel_leaves_a_unit_in_flight_alone(spool: Spool):
    accepted = await spool.accept(
        Submission("app@acme.test", ("a@one.test", "b@two.test"), CONTENT, Source.API)
    )
    [job] = await spool.claim_due(max_units=1, per_destination=1, lease=60,
                                  rooms={"one.test": 1, "two.test": 0})
    change = await spool.cancel_message(accepted.id)
    actions = {u.email: u.action for u in change.units}
    assert actions == {"a@one.test": UnitAction.IN_FLIGHT, "b@two.test": UnitAction.CANCELLED}
    again = await spool.cancel_message(accepted.id)
    assert again.changed == 0  # only the unit in flight is left
    # The attempt ends and its outcome is recorded as usual.
    [rcpt] = job.recipients
    await spool.record_outcomes(
        job, [Outcome(rcpt.id, RecipientStatus.DELIVERED, Reply(250, "2.0.0", "ok"))]
    )
    message = await spool.get_message(accepted.id)
    assert message.status.value == "partially_delivered"


async def test_the_listing_of_the_spool_pages_by_seq(spool: Spool):
    for _ in range(5):
        await spool.accept(Submission("app@acme.test", ("a@one.test",), CONTENT, Source.API))
    page = await spool.find_messages(MessageQuery(limit=2))
    rest = await spool.find_messages(MessageQuery(limit=10, before_seq=page[-1].seq))
    assert [m.seq for m in page + rest] == [5, 4, 3, 2, 1]
