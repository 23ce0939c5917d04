"""API keys: scopes on every route, test-mode keys, and the CLI that creates them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from starlette.routing import Route

from api import create_app
from store import Scope, Spool
from tests.conftest import Running, postroom_cli, write_config
from tests.support import wait_until

SEND_ROUTES = {
    ("POST", "/v1/messages"), ("POST", "/v1/messages/batch"),
    ("POST", "/v1/send"), ("POST", "/v1/send/batch"),
}
# Open by design: the probes, the contract, and the unsubscribe links (the token is the key).
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/unsubscribe/{token}"}


def every_route(postroom: Running) -> list[tuple[str, str]]:
    app = create_app(postroom.spool, postroom.service.settings, postroom.service.readiness)
    found = []
    for route in app.routes:
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, route.path))
    return found


async def test_a_send_key_is_refused_on_every_other_route(postroom: Running):
    routes = every_route(postroom)
    assert ("DELETE", "/v1/messages/{id}") in routes and ("GET", "/v1/events/stream") in routes
    async with postroom.http(await postroom.new_key(Scope.SEND)) as client:
        for method, path in routes:
            if (method, path) in SEND_ROUTES or path in OPEN_PATHS:
                continue
            r = await client.request(method, path.replace("{id}", "x"), json={})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"] == "forbidden"


async def test_a_revoked_key_stops_at_the_next_request(postroom: Running):
    new = await postroom.spool.create_key("k", Scope.FULL)
    async with postroom.http(new.secret) as client:
        assert (await client.get("/v1/messages")).status_code == 200
        await postroom.spool.revoke_key(new.key.id)
        assert (await client.get("/v1/messages")).status_code == 401


async def test_a_key_revoked_by_another_process_stops_within_a_second(postroom: Running):
    """What the service read of a key serves its requests for at most `api.lookup_cache_ttl`: a key
    revoked through a spool of its own (as `postroom keys revoke` does) fails within it."""
    new = await postroom.spool.create_key("k", Scope.FULL)
    async with postroom.http(new.secret) as client:
        assert (await client.get("/v1/messages")).status_code == 200
        other = await Spool.open(postroom.service.settings, readers=1)
        try:
            await other.revoke_key(new.key.id)
        finally:
            await other.close()
        revoked_at = time.monotonic()

        async def refused() -> bool:
            return (await client.get("/v1/messages")).status_code == 401

        await wait_until(refused, timeout=5, message="the revoked key still works")
        ttl = postroom.service.settings.api.lookup_cache_ttl
        assert time.monotonic() - revoked_at < ttl + 0.5
        assert (await client.get("/v1/messages")).status_code == 401


async def test_a_test_key_message_never_leaves_the_machine(postroom: Running, mx_sink: Any):
    key = await postroom.spool.create_key("ci", Scope.FULL, is_test=True)
    live = await postroom.new_key()
    body = {"from": "app@acme.test", "to": "a@example.test", "subject": "hi", "text": "x"}
    async with postroom.http(key.secret) as client:
        r = await client.post("/v1/messages", json=body)
        assert r.status_code == 202
        message_id = r.json()["id"]

        async def delivered() -> Any:
            got = (await client.get(f"/v1/messages/{message_id}")).json()
            return got if got["status"] == "delivered" else None

        got = await wait_until(delivered)
    assert got["test"] is True
    queued, done = got["events"]
    assert queued["data"]["test"] is True
    assert done["type"] == "email.delivered" and done["data"]["test"] is True
    assert done["data"]["reply"]["text"] == "test mode: accepted, not sent"
    # A live message sent after it reaches the sink alone: the test one never went out.
    async with postroom.http(live) as client:
        assert (await client.post("/v1/messages", json=body)).status_code == 202
    [received] = await mx_sink.wait_for_messages(1)
    assert mx_sink.messages == [received]
    async with postroom.http(live) as client:
        listed = (await client.get("/v1/messages")).json()["data"]
    assert [m["test"] for m in listed] == [False, True]


def test_cli_creates_test_and_rate_limited_keys(tmp_path: Path):
    config = write_config(tmp_path / "postroom.toml", {"server": {"data_dir": "var"}})
    postroom_cli(config, "init")
    out = postroom_cli(config, "keys", "create", "--name", "ci", "--test", "--rate-limit", "60",
                       "--json")
    created = json.loads(out.stdout)
    assert created["test"] is True and created["rate_limit"] == 60
    listed = json.loads(postroom_cli(config, "keys", "list", "--json").stdout)
    assert (listed[0]["test"], listed[0]["rate_limit"]) == (True, 60)
    bad = postroom_cli(config, "keys", "create", "--name", "x", "--rate-limit", "-1", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
