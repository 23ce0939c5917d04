"""The HTTP front door: send over the API, through the spool, out to the MX sink."""

from __future__ import annotations

import asyncio
import email
import json
from email.policy import default as default_policy

from store import Scope
from tests.conftest import Running
from tests.support import MxSink, wait_until

SEND = {
    "from": '"Acme" <no-reply@acme.test>',
    "to": "user@example.test",
    "subject": "Your code",
    "text": "Your code is 1234.\n",
}


async def message_status(postroom: Running, key: str, message_id: str) -> str:
    async with postroom.http(key) as http:
        response = await http.get(f"/v1/messages/{message_id}")
    return str(response.json()["status"])


async def test_send_is_delivered_with_envelope_and_body(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json=SEND)
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["id"].startswith("msg_")
    assert accepted["status"] == "queued"
    assert accepted["created_at"].endswith("Z")

    [received] = await mx_sink.wait_for_messages(1)
    assert received.mail_from == "no-reply@acme.test"
    assert received.rcpt_tos == ["user@example.test"]
    parsed = email.message_from_bytes(received.data, policy=default_policy)
    assert parsed["Subject"] == "Your code"
    [sender] = parsed["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Acme", "no-reply@acme.test")
    assert parsed["Message-ID"].endswith("@postroom.test>")
    assert parsed.get_content().replace("\r\n", "\n") == "Your code is 1234.\n"

    async def delivered() -> bool:
        return await message_status(postroom, key, accepted["id"]) == "delivered"

    await wait_until(delivered, message="message never showed as delivered")
    async with postroom.http(key) as http:
        shown = (await http.get(f"/v1/messages/{accepted['id']}")).json()
    assert shown["from"] == "Acme <no-reply@acme.test>"
    assert shown["subject"] == "Your code"
    [rcpt] = shown["recipients"]
    assert rcpt["email"] == "user@example.test"
    assert rcpt["status"] == "delivered"
    assert rcpt["attempts"] == 1
    assert rcpt["last_reply"]["code"] == 250
    assert rcpt["delivered_at"] is not None
    assert rcpt["next_attempt_at"] is None
    assert [e["type"] for e in shown["events"]] == ["email.queued", "email.delivered"]
    assert all(e["id"].startswith("evt_") for e in shown["events"])
    assert shown["events"][1]["data"]["mx"] == "mx.example.test"


async def test_text_and_html_make_multipart_alternative(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    body = {**SEND, "to": ["a@example.test", "b@example.test"], "html": "<p>Hi ü</p>"}
    async with postroom.http(key) as http:
        assert (await http.post("/v1/messages", json=body)).status_code == 202
    [received] = await mx_sink.wait_for_messages(1)
    assert sorted(received.rcpt_tos) == ["a@example.test", "b@example.test"]
    parsed = email.message_from_bytes(received.data, policy=default_policy)
    assert parsed.get_content_type() == "multipart/alternative"
    html = parsed.get_body(("html",))
    assert html is not None and "<p>Hi ü</p>" in html.get_content()


async def test_missing_or_bad_key_is_401_and_nothing_is_queued(postroom: Running):
    async with postroom.http() as http:
        response = await http.post("/v1/messages", json=SEND)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    async with postroom.http("pr_not-a-real-key") as http:
        response = await http.post("/v1/messages", json=SEND)
    assert response.status_code == 401
    assert await postroom.spool.list_messages() == []


async def test_revoked_key_stops_working(postroom: Running):
    new = await postroom.spool.create_key("soon revoked", Scope.FULL)
    await postroom.spool.revoke_key(new.key.id)
    async with postroom.http(new.secret) as http:
        assert (await http.post("/v1/messages", json=SEND)).status_code == 401


async def test_send_scope_cannot_read_messages(postroom: Running):
    key = await postroom.new_key(Scope.SEND)
    async with postroom.http(key) as http:
        sent = await http.post("/v1/messages", json=SEND)
        assert sent.status_code == 202
        response = await http.get(f"/v1/messages/{sent.json()['id']}")
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


async def test_bad_requests_get_clear_errors_and_change_nothing(postroom: Running):
    key = await postroom.new_key()
    cases = [
        (b"{not json", 400, "bad_request", None),
        (b"[1, 2]", 422, "validation_error", None),
        ({**SEND, "to": ["ok@example.test", "not-an-address"]}, 422, "validation_error", "to[1]"),
        ({k: v for k, v in SEND.items() if k != "text"}, 422, "validation_error", "body"),
        ({**SEND, "subject": "a\r\nBcc: victim@example.test"}, 422, "validation_error",
         "subject"),
        ({**SEND, "from": "x@acme.test\nBcc: y@z.test"}, 422, "validation_error", "from"),
        ({**SEND, "surprise": 1}, 422, "validation_error", "surprise"),
    ]
    async with postroom.http(key) as http:
        for body, status, slug, field in cases:
            if isinstance(body, bytes):
                response = await http.post(
                    "/v1/messages", content=body, headers={"content-type": "application/json"}
                )
            else:
                response = await http.post("/v1/messages", json=body)
            assert response.status_code == status, (body, response.text)
            payload = response.json()
            assert payload["error"] == slug
            assert payload["message"]
            if field is not None:
                assert field in [d["field"] for d in payload["details"]], payload
    assert await postroom.spool.list_messages() == []


async def test_oversized_body_is_413_before_it_is_read(start):
    postroom = await start(api={"max_request_size": 1000})
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={**SEND, "text": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert await postroom.spool.list_messages() == []


async def test_unknown_message_and_route_are_404(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.get("/v1/messages/msg_nope")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        response = await http.get("/v1/nothing-here")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        response = await http.delete("/healthz")
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"


async def test_health_and_readiness(postroom: Running):
    async with postroom.http() as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        postroom.service.readiness.is_stopping = True
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503
        refused = await http.post("/v1/messages", json=SEND)
        assert refused.status_code == 503
        assert refused.json()["error"] == "service_unavailable"
        postroom.service.readiness.is_stopping = False


async def test_event_ids_beyond_sqlite_integers_are_malformed_not_500(start):
    postroom = await start(webhooks={"allow_private_networks": True})
    too_big = ["evt_8000000000000000", "evt_ffffffffffffffff"]
    # int(x, 16) alone would take these too: signs, underscores, spaces.
    odd = ["evt_+000000000000001", "evt_-000000000000001", "evt_0_00000000000001",
           "evt_ 000000000000001"]
    async with postroom.http(await postroom.new_key()) as http:
        hook = await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        assert hook.status_code == 201, hook.text
        replay = f"/v1/webhooks/{hook.json()['id']}/replay"
        for event_id in too_big + odd:
            listed = await http.get("/v1/events", params={"after": event_id})
            replayed = await http.post(replay, json={"event_id": event_id})
            streamed = await http.get("/v1/events/stream", headers={"Last-Event-ID": event_id})
            for response, field in ((listed, "after"), (replayed, "event_id"),
                                    (streamed, "Last-Event-ID")):
                assert response.status_code == 422, (event_id, field, response.text)
                assert response.json()["error"] == "invalid_cursor"
                assert [d["field"] for d in response.json()["details"]] == [field]
        # The largest id SQLite can hold is still an id.
        listed = await http.get("/v1/events", params={"after": "evt_7fffffffffffffff"})
        assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
        replayed = await http.post(replay, json={"event_id": "evt_7fffffffffffffff"})
        assert replayed.status_code == 202 and replayed.json() == {"queued": 0}, replayed.text


async def test_answers_arrive_whole_on_a_closing_and_on_a_kept_connection(postroom: Running):
    """Each response is written at the end of the loop turn that wrote it: a connection the
    client asks to close still gets its whole answer first, and one kept open gets each answer
    of a pipelined pair in order."""
    host, port = postroom.service.api_address or ("", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                 b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 10)  # until the server closes
    writer.close()
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"200 ")
        length = int(next(
            line.split(b":")[1] for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ))
        assert len(body) == length and json.loads(body)
    assert b"connection: close" in answers[1].lower()
