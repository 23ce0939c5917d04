"""A lone surrogate (JSON `"\\ud800"`) in the body of any non-send write route is a 422 naming
its path, and nothing is stored or changed: stored, it would make every later read a 500.

Percent-escapes that are not UTF-8 (`%ED%A0%80`) in a path or query are decoded by the server
with U+FFFD replacements, so they are just unknown values: a 404 or an empty page, never a 500.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from api.models import UNENCODABLE
from store import SuppressionFilter
from tests.conftest import Running

S = "\ud800"  # what json.loads makes of "\ud800"
ESCAPED = "%ED%A0%80"  # the CESU-8 bytes of U+D800, percent-escaped in a URL
TEMPLATE = {"name": "welcome", "subject": "Hi {{ name }}", "text": "Hello {{ name }}"}
HOOK_URL = "http://127.0.0.1:9/hook"
WEBHOOKS = {"webhooks": {"allow_private_networks": True}}


def raw(body: object) -> dict[str, Any]:
    """Request arguments carrying `body` as JSON with \\u escapes (httpx's json= cannot)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


async def refused(http: httpx.AsyncClient, method: str, path: str, body: object, *fields: str
                  ) -> None:
    """`body` is answered 422 validation_error naming exactly `fields`, each as unencodable."""
    response = await http.request(method, path, **raw(body))
    assert response.status_code == 422, (path, body, response.text)
    answer = response.json()
    assert answer["error"] == "validation_error", answer
    assert sorted(d["field"] for d in answer["details"]) == sorted(fields), answer
    assert {d["message"] for d in answer["details"]} == {UNENCODABLE}, answer


async def listed(http: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    response = await http.get(path)
    assert response.status_code == 200, (path, response.text)
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_templates_refuse_a_surrogate_in_every_field(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        cases = [
            ({"name": f"w{S}"}, "name"),
            ({"subject": f"Hi {S}"}, "subject"),
            ({"html": f"<p>{S}</p>"}, "html"),
            ({"text": S}, "text"),
            ({S: "x"}, "\\ud800"),  # a key: pydantic would name it as an unknown field
        ]
        for change, field in cases:
            await refused(http, "POST", "/v1/templates", {**TEMPLATE, **change}, field)
        assert await listed(http, "/v1/templates") == []

        created = await http.post("/v1/templates", json=TEMPLATE)
        assert created.status_code == 201, created.text
        path = f"/v1/templates/{created.json()['id']}"
        for change, field in cases:
            await refused(http, "PUT", path, {**TEMPLATE, **change}, field)
        got = await http.get(path)
        assert got.status_code == 200 and got.json()["subject"] == TEMPLATE["subject"], got.text
        assert [t["name"] for t in await listed(http, "/v1/templates")] == ["welcome"]


async def test_webhooks_refuse_a_surrogate_in_every_field(start):
    postroom: Running = await start(**WEBHOOKS)
    async with postroom.http(await postroom.new_key()) as http:
        cases = [
            ({"url": f"{HOOK_URL}/{S}"}, "url"),
            ({"description": f"ops {S}"}, "description"),
            ({"events": ["email.delivered", f"email.{S}"]}, "events[1]"),
            ({"enabled": True, S: 1}, "\\ud800"),
        ]
        for change, field in cases:
            await refused(http, "POST", "/v1/webhooks", {"url": HOOK_URL, **change}, field)
        assert await listed(http, "/v1/webhooks") == []

        created = await http.post("/v1/webhooks", json={"url": HOOK_URL, "description": "ops"})
        assert created.status_code == 201, created.text
        path = f"/v1/webhooks/{created.json()['id']}"
        for change, field in cases:
            await refused(http, "PATCH", path, change, field)
        got = await http.get(path)
        assert got.status_code == 200, got.text
        assert (got.json()["url"], got.json()["description"]) == (HOOK_URL, "ops")
        assert [w["id"] for w in await listed(http, "/v1/webhooks")] == [created.json()["id"]]

        await refused(http, "POST", f"{path}/replay", {"event_id": f"evt_{S}"}, "event_id")
        await refused(http, "POST", f"{path}/replay", {"since": S}, "since")
        assert await listed(http, f"{path}/deliveries") == []


async def test_domains_refuse_a_surrogate_in_every_field(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        cases = [
            ({"name": f"acme{S}.test"}, "name"),
            ({"selector": f"s{S}"}, "selector"),
            ({"algorithm": S}, "algorithm"),
            ({"default_sender_name": f"Acme {S}"}, "default_sender_name"),
        ]
        for change, field in cases:
            await refused(http, "POST", "/v1/domains", {"name": "acme.test", **change}, field)
        assert await listed(http, "/v1/domains") == []

        created = await http.post(
            "/v1/domains", json={"name": "acme.test", "default_sender_name": "Acme"}
        )
        assert created.status_code == 201, created.text
        await refused(http, "PATCH", "/v1/domains/acme.test", {"default_sender_name": S},
                      "default_sender_name")
        await refused(http, "PATCH", "/v1/domains/acme.test",
                      {"default_sender_name": "Acme", S: S}, "\\ud800")
        got = await http.get("/v1/domains/acme.test")
        assert got.status_code == 200 and got.json()["default_sender_name"] == "Acme", got.text
        assert [d["name"] for d in await listed(http, "/v1/domains")] == ["acme.test"]


async def test_suppressions_refuse_a_surrogate_in_every_field(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        one = {"email": "ann@example.test"}
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"email": f"ann{S}@example.test"}, ["email"]),
            ({"emails": ["bob@example.test", f"{S}@example.test"]}, ["emails[1]"]),
            ({**one, "reason": S}, ["reason"]),
            ({**one, "message_id": f"msg_{S}"}, ["message_id"]),
            ({**one, "expires_at": S}, ["expires_at"]),
            ({**one, "note": S}, ["note"]),  # unknown field, still named for what it holds
        ]
        for body, fields in cases:
            await refused(http, "POST", "/v1/suppressions", body, *fields)
        assert await listed(http, "/v1/suppressions") == []
        assert await postroom.spool.list_suppressions(SuppressionFilter(), "", 10) == []


async def test_reschedule_refuses_a_surrogate(postroom: Running):
    future = "2030-01-31T09:00:00Z"
    async with postroom.http(await postroom.new_key()) as http:
        sent = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "a@example.test", "subject": "hi", "text": "x",
            "scheduled_at": future,
        })
        assert sent.status_code == 202, sent.text
        path = f"/v1/messages/{sent.json()['id']}"
        await refused(http, "PATCH", path, {"scheduled_at": S}, "scheduled_at")
        await refused(http, "PATCH", path, {"scheduled_at": "2031-01-01T00:00:00Z", S: 1},
                      "\\ud800")
        got = await http.get(path)
        assert got.status_code == 200, got.text
        assert got.json()["scheduled_at"] == "2030-01-31T09:00:00.000Z"
        assert [m["id"] for m in await listed(http, "/v1/messages")] == [sent.json()["id"]]


async def test_undecodable_percent_escapes_in_paths_and_queries_are_no_500(postroom: Running):
    async with postroom.http(await postroom.new_key()) as http:
        assert (await http.post("/v1/suppressions", json={"email": "ann@example.test"})
                ).status_code == 201
        not_found = [
            ("GET", f"/v1/suppressions/{ESCAPED}@example.test"),
            ("DELETE", f"/v1/suppressions/{ESCAPED}@example.test"),
            ("GET", f"/v1/suppressions/ann{ESCAPED}"),
            ("GET", f"/v1/messages/{ESCAPED}"),
            ("DELETE", f"/v1/messages/{ESCAPED}"),
            ("GET", f"/v1/templates/{ESCAPED}"),
            ("DELETE", f"/v1/templates/{ESCAPED}"),
            ("GET", f"/v1/webhooks/{ESCAPED}"),
            ("DELETE", f"/v1/webhooks/{ESCAPED}"),
            ("GET", f"/v1/domains/{ESCAPED}"),
            ("DELETE", f"/v1/domains/{ESCAPED}"),
            ("GET", f"/v1/{ESCAPED}"),
        ]
        for method, path in not_found:
            response = await http.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"] == "not_found", (path, response.text)
        for path in (
            f"/unsubscribe/{ESCAPED}",
            f"/unsubscribe/{ESCAPED}.{ESCAPED}",
        ):
            for method in ("GET", "POST"):
                response = await http.request(method, path)
                assert response.status_code == 404, (method, path, response.text)
                assert "not valid" in response.text
        empty = [
            f"/v1/suppressions?search={ESCAPED}",
            f"/v1/suppressions?after={ESCAPED}",
            f"/v1/messages?recipient={ESCAPED}",
            f"/v1/messages?from={ESCAPED}&tag={ESCAPED}",
            f"/v1/events?recipient={ESCAPED}",
        ]
        for path in empty:
            assert await listed(http, path) == [], path
        for path, field in (
            (f"/v1/suppressions?reason={ESCAPED}", "reason"),
            (f"/v1/messages?status={ESCAPED}", "status"),
            (f"/v1/messages?cursor={ESCAPED}", "cursor"),
            (f"/v1/events?type={ESCAPED}", "type"),
            (f"/v1/stats?group_by={ESCAPED}", "group_by"),
        ):
            response = await http.get(path)
            assert response.status_code == 422, (path, response.text)
            assert [d["field"] for d in response.json()["details"]] == [field], response.text
        # The one stored entry is untouched and still reads back.
        assert [s["email"] for s in await listed(http, "/v1/suppressions")] == [
            "ann@example.test"
        ]
