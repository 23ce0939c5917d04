"""Events: the outbox written with each event, paging and filters on indexes, the SSE stream."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from store import EventFilter, EventType, Scope, Source, Spool, Submission, migrate
from store.sql import Q
from tests.conftest import Running

ROOT = Path(__file__).resolve().parent.parent
CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


def submission(*recipients: str) -> Submission:
    return Submission("app@acme.test", recipients, CONTENT, Source.API)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(
        Settings(server={"data_dir": str(tmp_path)}, policy={"allow_unconfigured_domains": True})
    )
    yield opened
    await opened.close()


def count(tmp_path: Path, sql: str) -> int:
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        return int(conn.execute(sql).fetchone()[0])


async def test_outbox_rows_are_written_with_the_event(tmp_path: Path, spool: Spool):
    await spool.create_webhook("http://a.test/", ("*",))
    await spool.create_webhook("http://b.test/", (EventType.EMAIL_DELIVERED.value,))
    await spool.create_webhook("http://c.test/", ("*",), enabled=False)
    await spool.accept(submission("u@example.test", "v@example.test"))
    # Two email.queued events, each owed to the one enabled endpoint that takes every type.
    assert count(tmp_path, "SELECT count(*) FROM events") == 2
    assert count(tmp_path, "SELECT count(*) FROM webhook_outbox") == 2
    assert count(tmp_path, "SELECT count(DISTINCT endpoint_seq) FROM webhook_outbox") == 1


def test_only_the_event_helper_inserts_events():
    """Every event writer goes through store.events.append_events (which writes the outbox)."""
    for path in (ROOT / "store").glob("*.py"):
        if path.name != "events.py":
            assert '"insert_event"' not in path.read_text(), path


@pytest.mark.parametrize(
    "query", ["events_after", "events_by_type", "events_by_recipient", "events_by_message",
              "due_webhook_endpoints", "claim_webhook_endpoint", "has_due_webhooks"]
)
def test_event_and_outbox_reads_use_indexes(tmp_path: Path, query: str):
    migrate(tmp_path / "spool.sqlite3")
    params = {"after": 0, "limit": 10, "type": "email.queued", "recipient": "a@b",
              "message_seq": 1, "now": 0.0, "endpoint_seq": 1, "lease_until": 1.0}
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        plan = " | ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + Q[query], params)
        )
    assert "TEMP B-TREE" not in plan, plan
    for line in plan.split(" | "):
        # Endpoints are few; everything that grows is reached through an index.
        if line.startswith("SCAN") and "json_each" not in line and not line.startswith("SCAN e "):
            raise AssertionError(f"{query} scans a table: {plan}")


async def test_list_filters_and_pages(tmp_path: Path, spool: Spool):
    first = await spool.accept(submission("a@example.test", "b@example.test"))
    await spool.accept(submission("A@example.test"))
    everything = await spool.list_events(EventFilter())
    assert [e.message_id for e in everything] == [first.id, first.id, everything[2].message_id]
    by_recipient = await spool.list_events(EventFilter(recipient="a@example.test"))
    assert len(by_recipient) == 2  # addresses compare case-insensitively
    by_message = await spool.list_events(EventFilter(message_id=first.id))
    assert [e.recipient for e in by_message] == ["a@example.test", "b@example.test"]
    assert await spool.list_events(EventFilter(message_id="msg_nope")) == []
    assert await spool.list_events(EventFilter(type=EventType.EMAIL_DELIVERED)) == []
    page = await spool.list_events(EventFilter(), after=everything[0].id, limit=1)
    assert [e.id for e in page] == [everything[1].id]


async def test_events_api(postroom: Running):
    key = await postroom.new_key()
    for i in range(3):
        await postroom.spool.accept(submission(f"u{i}@example.test"))
    async with postroom.http(key) as http:
        page = (await http.get("/v1/events", params={"type": "email.queued", "limit": 2})).json()
        assert [e["recipient"] for e in page["data"]] == ["u0@example.test", "u1@example.test"]
        assert set(page["data"][0]) == {"id", "type", "created_at", "message_id", "recipient",
                                        "data"}
        assert page["has_more"] is True
        rest = (await http.get("/v1/events", params={"type": "email.queued",
                                                     "after": page["next_cursor"]})).json()
        assert [e["recipient"] for e in rest["data"]] == ["u2@example.test"]
        assert rest["has_more"] is False
        one = (await http.get("/v1/events", params={"recipient": "u1@example.test"})).json()
        assert {e["message_id"] for e in one["data"]} == {page["data"][1]["message_id"]}
        for params, field in [({"after": "evt_zz"}, "after"), ({"limit": "101"}, "limit"),
                              ({"type": "email.nope"}, "type")]:
            response = await http.get("/v1/events", params=params)
            assert response.status_code == 422
            assert response.json()["details"][0]["field"] == field
    async with postroom.http(await postroom.new_key(Scope.SEND)) as http:
        assert (await http.get("/v1/events")).status_code == 403


async def read_events(lines: AsyncIterator[str], n: int) -> list[tuple[str, dict[str, Any]]]:
    """The next `n` SSE events from a stream's lines, as (id, data)."""
    found: list[tuple[str, dict[str, Any]]] = []
    event_id = ""
    async with asyncio.timeout(10):
        async for line in lines:
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                found.append((event_id, json.loads(line[6:])))
                if len(found) == n:
                    return found
    raise AssertionError(f"the stream ended after {len(found)} events")


async def test_stream_delivers_live_events_and_resumes(start: Callable[..., Any]):
    postroom: Running = await start(events={"stream_poll_interval": "100ms"})
    key = await postroom.new_key()
    await postroom.spool.accept(submission("before@example.test"))  # not replayed: live only
    async with postroom.http(key) as http:
        # Only email.queued: the delivery events that follow each message come at their own pace.
        stream = "/v1/events/stream?type=email.queued"
        async with http.stream("GET", stream) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            await postroom.spool.accept(submission("live@example.test"))
            [(first_id, first)] = await read_events(response.aiter_lines(), 1)
        assert first["recipient"] == "live@example.test" and first["id"] == first_id

        # Events that happen while no one listens come after a resume with Last-Event-ID.
        await postroom.spool.accept(submission("missed@example.test"))
        headers = {"Last-Event-ID": first_id}
        async with http.stream("GET", stream, headers=headers) as response:
            lines = response.aiter_lines()
            resumed: list[tuple[str, dict[str, Any]]] = []
            while not any(d["recipient"] == "missed@example.test" for _, d in resumed):
                resumed += await read_events(lines, 1)
    assert [d["recipient"] for _, d in resumed] == ["missed@example.test"]
    assert resumed[0][0] > first_id


async def test_an_open_stream_does_not_hold_up_shutdown(start: Callable[..., Any]):
    postroom: Running = await start(events={"stream_poll_interval": "100ms"})
    key = await postroom.new_key()
    async with postroom.http(key) as http, http.stream("GET", "/v1/events/stream") as response:
        lines = response.aiter_lines()
        assert await anext(lines) == "retry: 2000"
        await postroom.stop()  # returns only once every connection has closed
        async with asyncio.timeout(5):
            rest = [line async for line in lines]
    assert all(not line.startswith("data:") for line in rest)


async def test_a_revoked_key_ends_its_open_stream(start: Callable[..., Any]):
    postroom: Running = await start(events={"stream_poll_interval": "100ms"})
    new = await postroom.spool.create_key("streamer", Scope.FULL)
    async with postroom.http(new.secret) as http:
        async with http.stream("GET", "/v1/events/stream?type=email.queued") as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            await postroom.spool.accept(submission("before@example.test"))
            [(_, seen)] = await read_events(lines, 1)
            assert seen["recipient"] == "before@example.test"
            await postroom.spool.revoke_key(new.key.id)
            async with asyncio.timeout(5):  # the stream ends by itself, within a few polls
                rest = [line async for line in lines]
        assert all(not line.startswith("data:") for line in rest)
        # A reconnecting client is refused.
        assert (await http.get("/v1/events/stream")).status_code == 401
