"""Durability is real: the pragmas, no acknowledgement before the commit, and a full disk.

Both front doors are driven for real (SMTP from a trusted loopback client, HTTP with a key); the
spool's commit is slowed or made to fail from outside — a second connection holding the write lock,
or `Spool.limit_pages` capping the file as a full disk would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from api.messages import SEND_CHUNK
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import MxSink, RawSmtp

TRUSTED = {"trusted_networks": ["127.0.0.0/8"]}
BIG = "x" * 400_000
BIG_LINES = ("x" * 78 + "\r\n") * 5_000  # SMTP lines stay under 1,000 octets


def payload(tag: str, text: str = "hello") -> dict[str, Any]:
    return {"from": "app@acme.test", "to": "user@example.test", "subject": tag, "text": text}


async def smtp_until_dot(port: int, tag: str, body: str = "hello") -> RawSmtp:
    """A session that has sent a whole message; the reply to the final dot is still unread."""
    client = await RawSmtp.open(port)
    assert (await client.command("EHLO client.test")).startswith("250")
    assert (await client.command("MAIL FROM:<app@acme.test>")).startswith("250")
    assert (await client.command("RCPT TO:<user@example.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(f"Subject: {tag}\r\n\r\n{body}\r\n.\r\n".encode())
    return client


@contextmanager
def write_lock(spool_file: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock from a second connection, as a slow CLI command would."""
    conn = sqlite3.connect(spool_file, isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def subjects(spool_file: Path) -> list[str]:
    with sqlite3.connect(spool_file) as conn:
        return [r[0] for r in conn.execute("SELECT subject FROM messages ORDER BY seq")]


async def test_writer_is_wal_with_full_sync_and_readers_are_query_only(postroom: Running):
    pragmas = await postroom.spool.storage_pragmas()
    assert pragmas.journal_mode == "wal"
    assert pragmas.synchronous == "full"
    assert pragmas.readers_query_only and all(pragmas.readers_query_only)
    assert await postroom.spool.integrity_check() == ["ok"]


@WITH_AND_WITHOUT_WORKERS
async def test_no_acknowledgement_before_the_commit_returns(start: Callable[..., Any]):
    postroom: Running = await start(smtp=TRUSTED, storage={"busy_timeout": "30s"})
    spool_file = postroom.service.settings.spool_path
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        with write_lock(spool_file):
            client = await smtp_until_dot(postroom.smtp_port, "slow smtp")
            smtp_reply = asyncio.create_task(client.reply(timeout=30))
            http_reply = asyncio.create_task(http.post("/v1/messages", json=payload("slow http")))
            # The writer cannot commit while the lock is held, so neither door may answer.
            done, _ = await asyncio.wait({smtp_reply, http_reply}, timeout=1.0)
            assert not done, "acknowledged while the commit could not have happened"
            assert subjects(spool_file) == []
        # The lock is gone: the commit goes through, and only then come the answers.
        assert (await smtp_reply).startswith("250 2.0.0 Ok: queued as msg_")
        response = await http_reply
        assert response.status_code == 202
        assert sorted(subjects(spool_file)) == ["slow http", "slow smtp"]
    await client.close()


@WITH_AND_WITHOUT_WORKERS
async def test_a_failed_commit_is_never_a_success(start: Callable[..., Any]):
    postroom: Running = await start(smtp=TRUSTED, storage={"busy_timeout": "0.3s"})
    spool_file = postroom.service.settings.spool_path
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        with write_lock(spool_file):
            client = await smtp_until_dot(postroom.smtp_port, "locked smtp")
            assert (await client.reply()).startswith("451 4.3.0")
            response = await http.post("/v1/messages", json=payload("locked http"))
            assert response.status_code == 503
            assert response.json()["error"] == "service_unavailable"
            # The session is still usable for the retry the 451 asks for.
            assert (await client.command("RSET")).startswith("250")
        assert subjects(spool_file) == []
        # The writer survived: once the lock is gone, both doors accept again.
        assert (await http.post("/v1/messages", json=payload("after"))).status_code == 202
        assert (await client.command("MAIL FROM:<app@acme.test>")).startswith("250")
        assert (await client.command("RCPT TO:<user@example.test>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(b"Subject: after smtp\r\n\r\nhi\r\n.")).startswith("250")
        await client.close()
    assert subjects(spool_file) == ["after", "after smtp"]
    assert postroom.service.readiness.is_ready


@WITH_AND_WITHOUT_WORKERS
async def test_a_batch_on_a_full_disk_answers_each_item_truly(start: Callable[..., Any]):
    # Longer than a chunk (a worker sends it to the service in two parts; the writer stores it
    # in two jobs): the chunk that does not fit is refused item by item with 507's slug, what
    # did fit is accepted and stored, and nothing else is.
    postroom: Running = await start()
    key = await postroom.new_key()
    spool_file = postroom.service.settings.spool_path
    items = [payload(f"#{i}") for i in range(SEND_CHUNK + 5)]
    async with postroom.http(key) as http:
        await postroom.spool.limit_pages(2)
        first = await http.post("/v1/messages/batch", json=items)
        assert first.status_code == 207
        answers = first.json()["data"]
        refused = [i for i, e in enumerate(answers) if "error" in e]
        assert refused and {answers[i]["error"] for i in refused} == {"insufficient_storage"}
        kept = sorted(f"#{i}" for i, e in enumerate(answers) if "id" in e)
        assert sorted(subjects(spool_file)) == kept
        await postroom.spool.limit_pages(None)
        again = await http.post("/v1/messages/batch", json=[items[i] for i in refused])
        assert again.status_code == 200
    assert sorted(subjects(spool_file)) == sorted(f"#{i}" for i in range(len(items)))


@WITH_AND_WITHOUT_WORKERS
@pytest.mark.parametrize("door", ["smtp", "http"])
async def test_full_disk_is_452_and_507_and_not_ready_until_room_returns(
    start: Callable[..., Any], mx_sink: MxSink, door: str
):
    postroom: Running = await start(smtp=TRUSTED)
    spool = postroom.spool
    spool_file = postroom.service.settings.spool_path
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        assert (await http.post("/v1/messages", json=payload("before"))).status_code == 202
        await mx_sink.wait_for_messages(1)
        await spool.limit_pages(2)
        if door == "smtp":
            client = await smtp_until_dot(postroom.smtp_port, "big smtp", BIG_LINES)
            assert (await client.reply()).startswith("452 4.3.1")
            assert (await client.command("RSET")).startswith("250")
        else:
            response = await http.post("/v1/messages", json=payload("big http", BIG))
            assert response.status_code == 507
            assert response.json()["error"] == "insufficient_storage"
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        # Nothing of the refused message was kept: no message, no recipient, no event.
        assert subjects(spool_file) == ["before"]
        with sqlite3.connect(spool_file) as conn:
            assert conn.execute("SELECT count(*) FROM recipients").fetchone()[0] == 1
            assert conn.execute(
                "SELECT count(*) FROM events WHERE type = 'email.queued'"
            ).fetchone()[0] == 1

        await spool.limit_pages(None)
        if door == "smtp":
            assert (await client.command("MAIL FROM:<app@acme.test>")).startswith("250")
            assert (await client.command("RCPT TO:<user@example.test>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            body = f"Subject: big smtp\r\n\r\n{BIG_LINES}.".encode()
            assert (await client.command(body)).startswith("250 2.0.0")
            await client.close()
        else:
            response = await http.post("/v1/messages", json=payload("big http", BIG))
            assert response.status_code == 202
        assert (await http.get("/readyz")).status_code == 200
        await mx_sink.wait_for_messages(2)
    assert await spool.integrity_check() == ["ok"]
