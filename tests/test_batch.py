"""Batch and channel-tagged sends over real HTTP: order, 200/207, per-item keys, compat shape."""

from __future__ import annotations

from api.messages import SEND_CHUNK
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import MxSink

SEND = {
    "from": "no-reply@acme.test",
    "to": "user@example.test",
    "subject": "Reminder",
    "text": "Reset your password.\n",
}

# With workers, the messages are validated and composed in them (api/messages.py `prepare_one`).
pytestmark = WITH_AND_WITHOUT_WORKERS


async def test_batch_all_accepted_is_200_in_order(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    items = [{**SEND, "to": f"u{i}@example.test", "subject": f"#{i}"} for i in range(300)]
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages/batch", json=items)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 300
    assert all(entry["id"].startswith("msg_") for entry in data)
    messages = {m.id: m for m in await postroom.spool.list_messages(limit=1000)}
    assert [messages[e["id"]].subject for e in data] == [f"#{i}" for i in range(300)]
    received = await mx_sink.wait_for_messages(300, timeout=30)
    assert len({r.rcpt_tos[0] for r in received}) == 300


async def test_batch_with_refusals_is_207_and_keeps_order(postroom: Running):
    key = await postroom.new_key()
    items = [
        SEND,
        {**SEND, "to": ["a@example.test", "broken"]},
        "not an object",
        {**SEND, "to": "x@no-such-domain.test"},
        {**SEND, "subject": "last"},
    ]
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages/batch", json=items)
    assert response.status_code == 207
    data = response.json()["data"]
    assert [("id" in e, e.get("error")) for e in data] == [
        (True, None),
        (False, "validation_error"),
        (False, "validation_error"),
        (False, "invalid_recipient"),
        (True, None),
    ]
    assert data[1]["details"][0]["field"] == "to[1]"
    assert data[3]["details"][0]["field"] == "to[0]"
    assert len(await postroom.spool.list_messages()) == 2


async def test_a_long_batch_keeps_each_refusal_in_its_place(postroom: Running):
    # Long enough to be split into shares (with workers, composed in them): each refusal,
    # with its details, comes back at its own index.
    key = await postroom.new_key()
    items: list[object] = [{**SEND, "subject": f"#{i}"} for i in range(260)]
    items[10] = {**SEND, "to": ["a@example.test", "broken"]}
    items[250] = {**SEND, "to": ["b@example.test", "c@example.test", "also broken"]}
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages/batch", json=items)
    assert response.status_code == 207
    data = response.json()["data"]
    refused = {i: e for i, e in enumerate(data) if "error" in e}
    assert sorted(refused) == [10, 250]
    assert refused[10]["details"][0]["field"] == "to[1]"
    assert refused[250]["details"][0]["field"] == "to[2]"
    messages = {m.id: m.subject for m in await postroom.spool.list_messages(limit=1000)}
    assert [messages[e["id"]] for e in data if "id" in e] == [
        f"#{i}" for i in range(260) if i not in (10, 250)
    ]


async def test_batch_per_item_idempotency_keys(postroom: Running):
    key = await postroom.new_key()
    items = [{**SEND, "idempotency_key": "a"}, {**SEND, "subject": "b", "idempotency_key": "b"}]
    async with postroom.http(key) as http:
        first = await http.post("/v1/messages/batch", json=items)
        again = await http.post(
            "/v1/messages/batch",
            json=[items[0], {**items[1], "subject": "changed"}, {**SEND, "idempotency_key": "c"},
                  {**SEND, "idempotency_key": "c"}],
        )
        header = await http.post("/v1/messages/batch", json=items, headers={"Idempotency-Key": "x"})
    assert first.status_code == 200
    assert again.status_code == 207
    data = again.json()["data"]
    assert data[0]["id"] == first.json()["data"][0]["id"] and data[0]["replayed"] is True
    assert data[1]["error"] == "idempotency_key_reused"
    assert "id" in data[2]
    assert data[3]["error"] == "idempotency_key_in_progress"  # the same key twice in one batch
    assert header.status_code == 422
    assert len(await postroom.spool.list_messages()) == 3


async def test_a_batch_longer_than_a_chunk_answers_as_one_batch(postroom: Running):
    # With workers, a batch past SEND_CHUNK items reaches the service chunk by chunk; the
    # answers must be those of one batch: a key used again in a later chunk is still held,
    # a replay, a refusal and every acceptance come back at their own index, in order.
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        before = await http.post("/v1/messages", json={**SEND, "subject": "before"},
                                 headers={"Idempotency-Key": "earlier"})
        assert before.status_code == 202
        size = SEND_CHUNK + 12
        items: list[dict[str, object]] = [{**SEND, "subject": f"#{i}"} for i in range(size)]
        items[1]["idempotency_key"] = "twice"
        # The last chunk is slow to compose (2 MB texts): the service has committed the first
        # chunk before this key reaches it, and the batch must still hold it.
        for i in range(SEND_CHUNK + 2, size):
            items[i]["text"] = f"{i} " + "long line of text\n" * 110_000
        items[SEND_CHUNK + 1]["idempotency_key"] = "twice"
        items[SEND_CHUNK] = {**SEND, "subject": "before", "idempotency_key": "earlier"}
        items[SEND_CHUNK - 1] = {**SEND, "to": ["broken"]}
        response = await http.post("/v1/messages/batch", json=items)
    assert response.status_code == 207
    data = response.json()["data"]
    assert len(data) == size
    assert data[SEND_CHUNK + 1]["error"] == "idempotency_key_in_progress"
    assert data[SEND_CHUNK]["id"] == before.json()["id"] and data[SEND_CHUNK]["replayed"]
    assert data[SEND_CHUNK - 1]["error"] == "validation_error"
    answered = (SEND_CHUNK - 1, SEND_CHUNK, SEND_CHUNK + 1)
    fresh = [i for i in range(size) if i not in answered]
    messages = {m.id: m.subject for m in await postroom.spool.list_messages(limit=size + 10)}
    assert len(messages) == len(fresh) + 1  # each stored once, and the one sent before
    assert [messages[data[i]["id"]] for i in fresh] == [f"#{i}" for i in fresh]


async def test_batch_limits(start):
    postroom = await start(api={"max_batch": 3})
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        too_many = await http.post("/v1/messages/batch", json=[SEND] * 4)
        not_a_list = await http.post("/v1/messages/batch", json=SEND)
        empty = await http.post("/v1/messages/batch", json=[])
        bad_json = await http.post(
            "/v1/messages/batch", content=b"[{", headers={"content-type": "application/json"}
        )
    assert too_many.status_code == 422 and too_many.json()["details"][0]["field"] == "body"
    assert not_a_list.status_code == 422
    assert empty.status_code == 422
    assert bad_json.status_code == 400 and bad_json.json()["error"] == "bad_request"
    assert await postroom.spool.list_messages() == []


COMPAT = {
    "channel": "email",
    "idempotency_key": "order-42",
    "destination": {"email": "user@example.test"},
    "payload": {"subject": "Order shipped", "body_html": "<p>Shipped</p>", "body_text": "Shipped"},
    "message_type": "transactional",
    "metadata": {"from_email": "shop@acme.test", "order": "42"},
}


async def test_compat_send_is_translated_to_the_same_send(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/send", json=COMPAT)
        again = await http.post("/v1/send", json=COMPAT)
        generated = await http.post("/v1/send", json={**COMPAT, "idempotency_key": None})
    assert response.status_code == 202, response.text
    assert response.json()["idempotency_key"] == "order-42"
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == response.json()["id"]
    assert generated.status_code == 202 and generated.json()["idempotency_key"]
    received = await mx_sink.wait_for_messages(2)
    assert {r.mail_from for r in received} == {"shop@acme.test"}
    message = await postroom.spool.get_message(response.json()["id"])
    assert message.subject == "Order shipped"
    assert message.events[0].data["metadata"] == {"order": "42"}


async def test_compat_refusals_name_the_compat_fields(postroom: Running):
    key = await postroom.new_key()
    cases = [
        ({**COMPAT, "channel": "sms"}, "channel_not_enabled", "channel"),
        ({**COMPAT, "destination": {"email": "nope"}}, "validation_error", "destination.email"),
        ({**COMPAT, "metadata": {}}, "validation_error", "metadata.from_email"),
        ({**COMPAT, "template_id": "t"}, "validation_error", "template_id"),
        ({**COMPAT, "payload": {"subject": "s\nBcc: x@y.test", "body_text": "x"}},
         "validation_error", "payload.subject"),
    ]
    async with postroom.http(key) as http:
        for body, slug, field in cases:
            response = await http.post("/v1/send", json=body)
            assert response.status_code == 422, response.text
            assert response.json()["error"] == slug
            assert field in [d["field"] for d in response.json()["details"]], response.json()
        batch = await http.post("/v1/send/batch", json=[COMPAT, cases[0][0]])
    assert batch.status_code == 207
    assert [("id" in e, e.get("error")) for e in batch.json()["data"]] == [
        (True, None), (False, "channel_not_enabled")
    ]
    assert len(await postroom.spool.list_messages()) == 1


async def test_compat_channel_is_checked_before_the_email_shape(postroom: Running):
    sms = {"channel": "sms", "destination": {"phone": "+15555550100"},
           "payload": {"body_text": "hi"}}
    async with postroom.http(await postroom.new_key()) as http:
        response = await http.post("/v1/send", json=sms)
        batch = await http.post("/v1/send/batch", json=[sms])
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "channel_not_enabled"
    assert [d["field"] for d in response.json()["details"]] == ["channel"]
    assert batch.json()["data"][0]["error"] == "channel_not_enabled"
    assert await postroom.spool.list_messages() == []


async def test_compat_idempotency_key_header_is_checked_like_the_native_one(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        too_long = await http.post("/v1/send", json=COMPAT, headers={"Idempotency-Key": "k" * 300})
        disagrees = await http.post("/v1/send", json={**COMPAT, "idempotency_key": "k1"},
                                    headers={"Idempotency-Key": "k2"})
        assert await postroom.spool.list_messages() == []
        agrees = await http.post("/v1/send", json={**COMPAT, "idempotency_key": "k1"},
                                 headers={"Idempotency-Key": "k1"})
        header_only = await http.post("/v1/send", json={**COMPAT, "idempotency_key": None},
                                      headers={"Idempotency-Key": "k3"})
    assert too_long.status_code == 422, too_long.text
    assert [d["field"] for d in too_long.json()["details"]] == ["Idempotency-Key"]
    assert disagrees.status_code == 422, disagrees.text
    assert [d["field"] for d in disagrees.json()["details"]] == ["idempotency_key"]
    assert agrees.status_code == 202 and agrees.json()["idempotency_key"] == "k1"
    assert header_only.status_code == 202 and header_only.json()["idempotency_key"] == "k3"
    assert len(await postroom.spool.list_messages()) == 2
