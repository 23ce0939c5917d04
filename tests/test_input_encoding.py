"""Strings UTF-8 cannot encode: a lone surrogate (JSON `"\\ud800"`) in any send field is a 422
naming its path, and nothing is stored (stored, it would make every later read of it a 500)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import Running

S = "\ud800"  # what json.loads makes of "\ud800"
SEND = {
    "from": '"Acme" <no-reply@acme.test>',
    "to": "user@example.test",
    "subject": "Your code",
    "text": "Your code is 1234.\n",
}
COMPAT = {
    "channel": "email",
    "destination": {"email": "user@example.test"},
    "payload": {"subject": "Order shipped", "body_text": "Shipped"},
    "metadata": {"from_email": "shop@acme.test"},
}
PDF = "JVBERg=="

NATIVE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"tags": [{"name": S}]}, "tags[0].name"),
    ({"tags": ["ok", {"name": "t", "value": f"v{S}"}]}, "tags[1].value"),
    ({"tags": [S]}, "tags[0]"),
    ({"metadata": {"k": S}}, "metadata.k"),
    ({"metadata": {S: "v"}}, "metadata.\\ud800"),
    ({"subject": f"Hi {S}"}, "subject"),
    ({"text": S}, "text"),
    ({"html": f"<p>{S}</p>"}, "html"),
    ({"headers": {"X-Campaign": S}}, "headers.X-Campaign"),
    ({"headers": {f"X-{S}": "v"}}, "headers.X-\\ud800"),
    ({"attachments": [{"filename": f"{S}.pdf", "content": PDF}]}, "attachments[0].filename"),
    ({"from": f'"Acme {S}" <no-reply@acme.test>'}, "from"),
    ({"to": ["ok@example.test", f"Ann {S} <ann@example.test>"]}, "to[1]"),
    ({"reply_to": f"{S} <help@acme.test>"}, "reply_to"),
    ({"idempotency_key": f"k{S}"}, "idempotency_key"),
    ({"template_id": "welcome", "template_vars": {S: "x"}}, "template_vars.\\ud800"),
]
COMPAT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"payload": {"subject": S, "body_text": "x"}}, "payload.subject"),
    ({"payload": {"body_text": S}}, "payload.body_text"),
    ({"metadata": {"from_email": "shop@acme.test", "order": S}}, "metadata.order"),
    ({"destination": {"email": f"{S}@example.test"}}, "destination.email"),
]


def raw(body: object) -> dict[str, Any]:
    """Request arguments carrying `body` as JSON with \\u escapes (httpx's json= cannot)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


async def assert_nothing_stored(postroom: Running, http: httpx.AsyncClient) -> None:
    assert await postroom.spool.list_messages() == []
    listed = await http.get("/v1/messages")
    events = await http.get("/v1/events")
    assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    assert events.status_code == 200 and events.json()["data"] == [], events.text


async def test_a_surrogate_in_any_send_field_is_422_naming_it(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        for change, field in NATIVE_CASES:
            response = await http.post("/v1/messages", **raw({**SEND, **change}))
            assert response.status_code == 422, (field, response.text)
            assert response.json()["error"] == "validation_error"
            assert [d["field"] for d in response.json()["details"]] == [field], response.json()
        for change, field in COMPAT_CASES:
            response = await http.post("/v1/send", **raw({**COMPAT, **change}))
            assert response.status_code == 422, (field, response.text)
            assert [d["field"] for d in response.json()["details"]] == [field], response.json()
        await assert_nothing_stored(postroom, http)


async def test_every_surrogate_is_named_at_once(postroom: Running):
    body = {**SEND, "subject": S, "metadata": {S: S, "k": S}}
    async with postroom.http(await postroom.new_key()) as http:
        response = await http.post("/v1/messages", **raw(body))
        assert response.status_code == 422, response.text
        assert sorted(d["field"] for d in response.json()["details"]) == [
            "metadata.\\ud800", "metadata.k", "subject"
        ]
        await assert_nothing_stored(postroom, http)


async def test_a_batch_refuses_only_the_item_with_a_surrogate(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        response = await http.post(
            "/v1/messages/batch", **raw([SEND, {**SEND, "tags": [{"name": S}]}])
        )
        assert response.status_code == 207, response.text
        accepted, refused = response.json()["data"]
        assert refused["error"] == "validation_error"
        assert [d["field"] for d in refused["details"]] == ["tags[0].name"]
        [stored] = await postroom.spool.list_messages()
        assert stored.id == accepted["id"]
        # What was stored reads back: no 500 on any listing.
        for path in (f"/v1/messages/{stored.id}", "/v1/messages", "/v1/events"):
            assert (await http.get(path)).status_code == 200, path
