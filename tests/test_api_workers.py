"""The API served in the worker processes (`api.in_workers`, on by default with `smtp.workers`).

The routes themselves run both ways in test_send.py, test_batch.py, the durability and drain
tests (`WITH_AND_WITHOUT_WORKERS`); these are what only serving the API in several processes
could break: that the requests really are answered there, and that what the server decides as
one — a key's rate limit, failed authentications, an idempotency key held — stays one decision.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Any

import httpx

from store import Scope
from tests.conftest import Running
from tests.support import MxSink, wait_until


async def start_with_workers(start: Callable[..., Any], **api: Any) -> Running:
    running: Running = await start(smtp={"workers": 2}, api=api)
    assert running.service.workers is not None and len(running.service.workers.pids) == 2
    return running


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            found.add(m.group(1))
    return found


def _server_inode(server_port: int, client_port: int) -> str:
    """The inode of the server's end of the loopback connection from `client_port`."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (int(local.split(":")[1], 16) == server_port
                    and int(remote.split(":")[1], 16) == client_port):
                return inode
    raise AssertionError("no such connection")


async def test_requests_are_answered_in_the_worker_processes(start: Callable[..., Any]):
    postroom = await start_with_workers(start)
    workers = postroom.service.workers
    assert workers is not None
    host, port = postroom.service.api_address or ("", 0)
    owners = set()
    for _ in range(8):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: postroom\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        # While the connection is open, the process holding its server end answered it.
        inode = _server_inode(port, writer.get_extra_info("sockname")[1])
        owners |= {pid for pid in [os.getpid(), *workers.pids] if inode in _socket_inodes(pid)}
        writer.close()
        await writer.wait_closed()
    assert owners and owners <= set(workers.pids), "the service's own loop answered"


async def test_a_key_rate_limit_is_one_limit_across_the_workers(start: Callable[..., Any]):
    postroom = await start_with_workers(start)
    limited = await postroom.spool.create_key("limited", Scope.FULL, rate_limit=4)
    statuses = []
    for _ in range(10):  # a new connection each: the kernel spreads them over both workers
        async with postroom.http(limited.secret) as http:
            statuses.append((await http.get("/v1/messages")).status_code)
    assert statuses == [200] * 4 + [429] * 6


async def test_failed_authentications_are_counted_across_the_workers(
    start: Callable[..., Any],
):
    postroom = await start_with_workers(start, auth_failures_per_minute=3)
    statuses = []
    for _ in range(8):
        async with postroom.http("pr_not-a-key") as http:
            response = await http.get("/v1/messages")
        statuses.append(response.status_code)
    assert statuses == [401] * 3 + [429] * 5
    assert int(response.headers["retry-after"]) >= 1


async def test_an_idempotency_key_held_in_one_worker_holds_in_the_other(
    start: Callable[..., Any], mx_sink: MxSink,
):
    postroom = await start_with_workers(start)
    key = await postroom.new_key()
    body = {"from": "app@acme.test", "to": "user@example.test", "subject": "once", "text": "hi"}

    async def send() -> httpx.Response:
        async with postroom.http(key) as http:  # each on a connection of its own
            return await http.post("/v1/messages", json=body,
                                   headers={"Idempotency-Key": "order-7"})

    answers = await asyncio.gather(*(send() for _ in range(12)))
    accepted = {r.json()["id"] for r in answers if r.status_code == 202}
    in_progress = [r for r in answers if r.status_code == 409]
    assert len(accepted) == 1 and len(in_progress) + sum(
        r.status_code == 202 for r in answers) == 12
    assert all(r.json()["error"] == "idempotency_key_in_progress" for r in in_progress)
    await mx_sink.wait_for_messages(1)
    assert len(await postroom.spool.list_messages(limit=10)) == 1


async def test_the_service_s_errors_and_answers_reach_the_client_whole(
    start: Callable[..., Any], mx_sink: MxSink,
):
    postroom = await start_with_workers(start)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        missing = await http.get("/v1/messages/msg_nope")  # NotFound, raised in the service
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        refused = await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        assert refused.status_code == 422, refused.text  # the service's gateway said no
        sent = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "user@example.test", "subject": "s", "text": "t",
        })
        assert sent.status_code == 202
        message_id = sent.json()["id"]
        await mx_sink.wait_for_messages(1)

        async def delivered() -> bool:
            got = await http.get(f"/v1/messages/{message_id}")
            return bool(got.json()["status"] == "delivered")

        await wait_until(delivered, message="the message never showed as delivered")
        events = (await http.get("/v1/events", params={"message_id": message_id})).json()
        assert [e["type"] for e in events["data"]] == ["email.queued", "email.delivered"]
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "postroom_smtp_workers 2.0" in metrics.text  # the service's own counters


async def test_the_event_stream_is_served_from_a_worker(
    start: Callable[..., Any], mx_sink: MxSink,
):
    postroom = await start_with_workers(start)
    key = await postroom.new_key()
    async with postroom.http(key) as http, http.stream("GET", "/v1/events/stream") as stream:
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith("retry:")
        sent = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "user@example.test", "subject": "s", "text": "t",
        })
        assert sent.status_code == 202
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(anext(lines), 15)
            if line.startswith("data:") and '"email.queued"' in line:
                assert sent.json()["id"] in line
                break
        else:
            raise AssertionError("no email.queued event on the stream")



async def test_a_single_send_answers_a_bad_key_before_a_bad_body_and_names_the_sender(
    start: Callable[..., Any], mx_sink: MxSink,
):
    """In a worker the key is checked by the service, the body read and composed here: a bad
    key is still answered before a bad body, and the domain's default sender name still comes
    from the service, for a sender without a name of its own only."""
    postroom = await start_with_workers(start)
    key = await postroom.new_key()
    broken = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    async with postroom.http() as anonymous:
        assert (await anonymous.post("/v1/messages", **broken)).status_code == 401
    async with postroom.http("pr_wrong") as wrong:
        refused = await wrong.post("/v1/messages", **broken)
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        for path in ("/v1/messages/batch", "/v1/send", "/v1/send/batch"):
            assert (await wrong.post(path, **broken)).status_code == 401, path
    async with postroom.http(key) as http:
        bad = await http.post("/v1/messages", **broken)
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        added = await http.post("/v1/domains", json={"name": "acme.test",
                                                     "default_sender_name": "Acme Inc"})
        assert added.status_code == 201, added.text
        for sender in ("app@acme.test", "Billing <app@acme.test>"):
            sent = await http.post("/v1/messages", json={
                "from": sender, "to": "user@example.test", "subject": "s", "text": "t",
            })
            assert sent.status_code == 202, sent.text
    received = await mx_sink.wait_for_messages(2)
    froms = sorted(m.data.split(b"\r\nFrom: ", 1)[1].split(b"\r\n", 1)[0] for m in received)
    assert froms == [b"Acme Inc <app@acme.test>", b"Billing <app@acme.test>"]


async def test_a_single_send_in_a_worker_gets_its_template_and_the_key_s_limits_first(
    start: Callable[..., Any], mx_sink: MxSink,
):
    """A single send's key check and its templates and sender names are one question to the
    service: the template a send names is rendered, a key over its limit is 429 before its bad
    body, and a body too large to read before the key check still gets the key's 401 first."""
    postroom = await start_with_workers(start)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        created = await http.post("/v1/templates", json={
            "name": "welcome", "subject": "Welcome, {{ name }}", "text": "Hello {{ name }}",
        })
        assert created.status_code == 201, created.text
        for path, body in (
            ("/v1/messages", {"from": "app@acme.test", "to": "user@example.test",
                              "template": "welcome", "template_data": {"name": "Ann"}}),
            ("/v1/send", {"channel": "email", "destination": {"email": "user@example.test"},
                          "metadata": {"from_email": "app@acme.test"},
                          "template_id": created.json()["id"], "template_vars": {"name": "Bo"}}),
        ):
            sent = await http.post(path, json=body)
            assert sent.status_code == 202, sent.text
        unknown = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "user@example.test", "template": "nope",
        })
        assert unknown.status_code == 422 and "no template nope" in unknown.text
    received = await mx_sink.wait_for_messages(2)
    assert sorted(m.data.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0]
                  for m in received) == [b"Welcome, Ann", b"Welcome, Bo"]

    limited = await postroom.spool.create_key("limited", Scope.SEND, rate_limit=1)
    broken = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    statuses = []
    for _ in range(2):
        async with postroom.http(limited.secret) as http:
            response = await http.post("/v1/messages", **broken)
            statuses.append((response.status_code, response.json()["error"]))
    assert statuses == [(400, "bad_request"), (429, "too_many_requests")]
    assert response.headers["x-ratelimit-limit"] == "1"

    large = b'{"text": "' + b"x" * 100_000 + b'"'  # not even JSON: read only after the key
    async with postroom.http("pr_wrong") as wrong:
        refused = await wrong.post("/v1/messages", content=large,
                                   headers={"content-type": "application/json"})
        assert refused.status_code == 401
