"""Idempotency keys over real HTTP: replay, mismatch, the concurrent pair, expiry, key scope."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Running
from tests.support import wait_until

SEND = {
    "from": "no-reply@acme.test",
    "to": "user@example.test",
    "subject": "Reset your password",
    "text": "Follow the link.\n",
}


async def message_count(postroom: Running) -> int:
    return len(await postroom.spool.list_messages(limit=1000))


async def test_same_key_and_body_replays_the_first_answer(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        first = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-1"})
        again = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-1"})
        in_body = await http.post("/v1/messages", json={**SEND, "idempotency_key": "k-1"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # The body field is the same key as the header.
    assert in_body.status_code == 202 and in_body.json() == first.json()
    assert await message_count(postroom) == 1


async def test_same_key_with_another_body_is_409_reused(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        first = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-2"})
        other = await http.post(
            "/v1/messages", json={**SEND, "subject": "Other"}, headers={"Idempotency-Key": "k-2"}
        )
        both = await http.post(
            "/v1/messages", json={**SEND, "idempotency_key": "k-3"},
            headers={"Idempotency-Key": "k-4"},
        )
    assert first.status_code == 202
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    assert both.status_code == 422 and both.json()["details"][0]["field"] == "idempotency_key"
    assert await message_count(postroom) == 1


async def test_a_refused_request_does_not_use_up_its_key(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        bad = await http.post(
            "/v1/messages", json={**SEND, "to": "nope"}, headers={"Idempotency-Key": "k-5"}
        )
        good = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-5"})
    assert bad.status_code == 422
    assert good.status_code == 202 and "idempotent-replayed" not in good.headers


async def test_two_api_keys_with_one_key_string_are_independent(postroom: Running):
    key_a, key_b = await postroom.new_key(), await postroom.new_key()
    headers = {"Idempotency-Key": "shared"}
    async with postroom.http(key_a) as a, postroom.http(key_b) as b:
        first = await a.post("/v1/messages", json=SEND, headers=headers)
        second = await b.post("/v1/messages", json={**SEND, "subject": "B"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert await message_count(postroom) == 2


async def test_a_key_expires_after_the_ttl(start):
    postroom = await start(api={"idempotency_ttl": "1s"})
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        first = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-6"})
        assert first.status_code == 202
        for _ in range(200):  # replays until the key expires; each replay stores nothing
            later = await http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-6"})
            assert later.status_code == 202
            if "idempotent-replayed" not in later.headers:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the idempotency key never expired")
    assert later.json()["id"] != first.json()["id"]
    assert await message_count(postroom) == 2


@pytest.fixture
def silent_dns() -> Iterator[socket.socket]:
    """A UDP "DNS server" that never answers: lookups wait for their timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def has_query(sock: socket.socket) -> bool:
    try:
        sock.recv(4096, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


async def test_concurrent_pair_is_409_in_progress_and_one_message(
    start, silent_dns: socket.socket
):
    port = silent_dns.getsockname()[1]
    # The first request holds its key while its recipient-domain lookup waits for DNS.
    postroom = await start(
        delivery={"dns_nameservers": [f"127.0.0.1:{port}"], "dns_timeout": "1s"}
    )
    key = await postroom.new_key()
    headers = {"Idempotency-Key": "k-7"}
    async with postroom.http(key) as http:
        first = asyncio.create_task(http.post("/v1/messages", json=SEND, headers=headers))
        await wait_until(lambda: has_query(silent_dns), message="no DNS query was made")
        second = await http.post("/v1/messages", json=SEND, headers=headers)
        assert second.status_code == 409
        assert second.json()["error"] == "idempotency_key_in_progress"
        done = await first
        assert done.status_code == 202  # a DNS timeout lets the message in
        third = await http.post("/v1/messages", json=SEND, headers=headers)
    assert third.status_code == 202 and third.headers["idempotent-replayed"] == "true"
    assert third.json() == done.json()
    assert await message_count(postroom) == 1


async def test_many_concurrent_duplicates_make_exactly_one_message(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        responses = await asyncio.gather(
            *[http.post("/v1/messages", json=SEND, headers={"Idempotency-Key": "k-8"})
              for _ in range(20)]
        )
    ids = set()
    for response in responses:
        if response.status_code == 409:
            assert response.json()["error"] == "idempotency_key_in_progress"
        else:
            assert response.status_code == 202
            ids.add(response.json()["id"])
    assert len(ids) == 1
    assert await message_count(postroom) == 1
