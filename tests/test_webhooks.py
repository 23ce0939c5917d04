"""Webhooks: retry decisions and signatures (pure), then real deliveries to a real receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from config import Settings
from relay.egress import Egress, build_resolver, is_public, literal_address
from relay.webhooks import WebhookDispatcher, decide, retry_at, sign
from store import (
    AttemptResult,
    NewWebhook,
    OutboxStatus,
    Scope,
    Source,
    Spool,
    Submission,
    WebhookEndpoint,
)
from tests.conftest import Running
from tests.support import DnsServer, MxSink, WebhookRequest, WebhookSink, wait_until
from tests.support.webhook_sink import Reply

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"
FAST = {
    "webhooks": {
        "allow_private_networks": True,
        "retry_schedule": ["100ms", "100ms", "100ms"],
        "poll_interval": "50ms",
    }
}
DEFAULT_SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


# -- pure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "rand", "expected"),
    [
        (1, 0.5, 1005.0),  # first failure: 5 s, no jitter at the midpoint
        (2, 0.5, 1300.0),
        (7, 0.5, 1000.0 + 36000.0),  # the last retry
        (8, 0.5, None),  # 8 attempts made: given up (≈ 28 h after the first)
        (1, 0.0, 1000.0 + 4.5),  # -10 %
        (1, 1.0, 1000.0 + 5.5),  # +10 %
        (0, 0.5, None),
    ],
)
def test_retry_schedule(attempts: int, rand: float, expected: float | None):
    assert retry_at(attempts, DEFAULT_SCHEDULE, 0.1, 1000.0, lambda: rand) == expected


def test_default_schedule_spans_about_28_hours():
    assert 27 * 3600 < sum(DEFAULT_SCHEDULE) < 29 * 3600


@pytest.mark.parametrize(
    ("result", "attempts", "status", "due", "disabled"),
    [
        (AttemptResult(200, 0.1), 1, OutboxStatus.DELIVERED, None, False),
        (AttemptResult(204, 0.1), 5, OutboxStatus.DELIVERED, None, False),
        (AttemptResult(410, 0.1), 1, OutboxStatus.FAILED, None, True),
        (AttemptResult(500, 0.1), 1, OutboxStatus.PENDING, 105.0, False),
        (AttemptResult(302, 0.1), 1, OutboxStatus.PENDING, 105.0, False),
        (AttemptResult(None, 10.0, "timed out"), 2, OutboxStatus.PENDING, 400.0, False),
        (AttemptResult(500, 0.1), 8, OutboxStatus.FAILED, None, False),
    ],
)
def test_decide(result: AttemptResult, attempts: int, status: OutboxStatus, due: float | None,
                disabled: bool):
    outcome = decide(result, attempts, DEFAULT_SCHEDULE, 0.1, 100.0, lambda: 0.5)
    assert outcome.status is status
    assert outcome.due_at == due
    assert (outcome.disable_reason is not None) == disabled


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> Any:
    return Webhook(secret).verify(body, headers)


def test_signatures_verify_and_tampering_fails():
    body = b'{"id":"evt_1","type":"email.delivered"}'
    now = int(datetime.now(UTC).timestamp())
    headers = sign([SECRET], "evt_1", now, body)
    assert verify(SECRET, headers, body)["id"] == "evt_1"
    expected = hmac.new(b"k" * 32, body, hashlib.sha256).hexdigest()
    assert headers["X-Postroom-Signature"] == f"sha256={expected}"
    tampered = [
        ({**headers, "webhook-id": "evt_2"}, body),
        ({**headers, "webhook-timestamp": str(now - 1)}, body),
        (headers, body.replace(b"delivered", b"bounced")),
    ]
    for bad_headers, bad_body in tampered:
        with pytest.raises(WebhookVerificationError):
            verify(SECRET, bad_headers, bad_body)


def test_during_rotation_both_secrets_sign():
    body = b"{}"
    now = int(datetime.now(UTC).timestamp())
    headers = sign([SECRET, OLD_SECRET], "evt_1", now, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    verify(SECRET, headers, body)
    verify(OLD_SECRET, headers, body)


@pytest.mark.parametrize(
    ("host", "public"),
    [("127.0.0.1", False), ("10.0.0.1", False), ("169.254.169.254", False), ("::1", False),
     ("::ffff:127.0.0.1", False), ("2130706433", False), ("127.1", False), ("0x7f.0.0.1", False),
     ("100.64.0.1", False), ("224.0.0.1", False), ("93.184.216.34", True),
     ("2606:4700::1", True)],
)
def test_address_classification(host: str, public: bool):
    address = literal_address(host)
    assert address is not None
    assert is_public(address) is public


def test_names_are_not_literal_addresses():
    assert literal_address("deadbeef") is None
    assert literal_address("hook.example.test") is None


# -- against a real receiver ----------------------------------------------------------------------


@pytest.fixture
async def sink() -> AsyncIterator[WebhookSink]:
    async with WebhookSink() as receiver:
        yield receiver


async def submit(postroom: Running, *recipients: str) -> str:
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", recipients or ("user@example.test",), CONTENT, Source.API)
    )
    return accepted.id


async def add_webhook(postroom: Running, key: str, url: str, **fields: Any) -> dict[str, Any]:
    async with postroom.http(key) as http:
        response = await http.post("/v1/webhooks", json={"url": url, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def attempts_of(postroom: Running, key: str, webhook_id: str) -> list[dict[str, Any]]:
    async with postroom.http(key) as http:
        response = await http.get(f"/v1/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data[::-1]  # oldest first


async def wait_for_attempts(
    postroom: Running, key: str, webhook_id: str, n: int
) -> list[dict[str, Any]]:
    """The attempt log (oldest first) once it holds `n` entries."""

    async def logged() -> list[dict[str, Any]] | None:
        log = await attempts_of(postroom, key, webhook_id)
        return log if len(log) >= n else None

    return await wait_until(logged)


def check_signed(request: WebhookRequest, secret: str) -> dict[str, Any]:
    payload: dict[str, Any] = verify(secret, request.headers, request.body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    simple = hmac.new(key, request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-postroom-signature"] == f"sha256={simple}"
    assert request.headers["webhook-id"] == payload["id"]
    return payload


async def test_events_are_delivered_signed(start: Callable[..., Any], sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, description="app")
    assert hook["secret"].startswith("whsec_")
    assert hook["events"] == ["*"] and hook["enabled"] is True
    message_id = await submit(postroom)
    requests = await sink.wait_for_requests(2)
    payloads = [check_signed(r, hook["secret"]) for r in requests]
    assert sorted(p["type"] for p in payloads) == ["email.delivered", "email.queued"]
    for payload in payloads:
        assert set(payload) == {"id", "type", "created_at", "data"}
        assert payload["id"].startswith("evt_")
        assert payload["data"]["message_id"] == message_id
        assert payload["data"]["recipient"] == "user@example.test"
    assert all(r.headers["content-type"] == "application/json" for r in requests)

    log = await wait_until(lambda: attempts_of(postroom, key, hook["id"]))
    assert {a["status_code"] for a in log} == {200}
    assert all(a["success"] and a["error"] is None for a in log)
    async with postroom.http(key) as http:
        listed = (await http.get("/v1/webhooks")).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]]
    assert "secret" not in listed[0]


async def test_failure_is_retried_with_the_same_webhook_id(
    start: Callable[..., Any], sink: WebhookSink
):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    sink.script_status(500)
    await submit(postroom)
    first, second = await sink.wait_for_requests(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    check_signed(second, hook["secret"])

    async def two_attempts() -> list[dict[str, Any]] | None:
        log = await attempts_of(postroom, key, hook["id"])
        return log if len(log) == 2 else None

    log = await wait_until(two_attempts)
    assert [(a["attempt"], a["status_code"], a["success"]) for a in log] == [
        (1, 500, False), (2, 200, True),
    ]
    assert len(sink.requests) == 2  # email.delivered is not subscribed


async def test_410_gone_disables_the_endpoint(start: Callable[..., Any], sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    sink.script_status(410)
    await submit(postroom)
    await sink.wait_for_requests(1)

    async def disabled() -> dict[str, Any] | None:
        async with postroom.http(key) as http:
            shown: dict[str, Any] = (await http.get(f"/v1/webhooks/{hook['id']}")).json()
        return shown if not shown["enabled"] else None

    shown = await wait_until(disabled)
    assert "410" in shown["disabled_reason"]
    await submit(postroom)
    log = await attempts_of(postroom, key, hook["id"])
    assert [a["status_code"] for a in log] == [410]
    assert len(sink.requests) == 1


async def test_credentials_in_the_url_become_basic_auth(
    start: Callable[..., Any], sink: WebhookSink
):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    url = f"http://app:s%40cret@127.0.0.1:{sink.port}/hooks?x=1"
    hook = await add_webhook(postroom, key, url, events=["email.queued"])
    await submit(postroom)
    [request] = await sink.wait_for_requests(1)
    assert request.path == "/hooks?x=1"
    assert request.headers["host"] == f"127.0.0.1:{sink.port}"
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"app:s@cret").decode()
    check_signed(request, hook["secret"])


async def test_a_name_is_resolved_by_our_resolver_and_sent_as_host(
    start: Callable[..., Any], dns: DnsServer, sink: WebhookSink
):
    dns.add_a("hook.example.test", "127.0.0.1")
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, f"http://hook.example.test:{sink.port}/",
                             events=["email.queued"])
    await submit(postroom)
    [request] = await sink.wait_for_requests(1)
    assert request.headers["host"] == f"hook.example.test:{sink.port}"
    assert ("hook.example.test", "A") in dns.queries
    check_signed(request, hook["secret"])


async def test_redirects_are_not_followed(start: Callable[..., Any], sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    async with WebhookSink() as elsewhere:
        sink.location = elsewhere.url
        sink.script_status(302, 302, 302, 302)
        hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
        await submit(postroom)

        async def given_up() -> list[dict[str, Any]] | None:
            log = await attempts_of(postroom, key, hook["id"])
            return log if len(log) == 4 else None  # the first attempt and three retries

        log = await wait_until(given_up)
        assert {a["status_code"] for a in log} == {302}
        assert elsewhere.requests == []


async def test_rotation_keeps_the_old_secret_signing(start: Callable[..., Any],
                                                     sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    async with postroom.http(key) as http:
        rotated = (await http.post(f"/v1/webhooks/{hook['id']}/rotate-secret")).json()
        tested = (await http.post(f"/v1/webhooks/{hook['id']}/test")).json()
    assert rotated["secret"] != hook["secret"]
    assert tested["status_code"] == 200 and tested["success"] is True
    [request] = sink.requests
    assert request.json()["type"] == "webhook.test"
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    check_signed(request, rotated["secret"])  # the simple scheme uses the newest secret
    verify(hook["secret"], request.headers, request.body)
    log = await attempts_of(postroom, key, hook["id"])
    assert [(a["event_type"], a["status_code"]) for a in log] == [("webhook.test", 200)]


SSRF_URLS = [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://2130706433/hook",
    "http://localhost:8080/hook",
    "http://hook.example.test/hook",  # the test DNS server resolves it to 127.0.0.1
]


async def test_private_urls_are_refused_without_the_switch(
    start: Callable[..., Any], dns: DnsServer
):
    dns.add_a("hook.example.test", "127.0.0.1")
    postroom: Running = await start()
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        for url in SSRF_URLS:
            response = await http.post("/v1/webhooks", json={"url": url})
            assert response.status_code == 422, url
            body = response.json()
            assert body["error"] == "webhook_url_private", url
            assert body["details"][0]["field"] == "url"
            assert "allow_private_networks" in body["message"]
        for url, slug in [("ftp://example.com/", "webhook_url_invalid"),
                          ("http:///nohost", "webhook_url_invalid"),
                          ("http://nowhere.example.test/", "webhook_url_unresolvable")]:
            response = await http.post("/v1/webhooks", json={"url": url})
            assert (response.status_code, response.json()["error"]) == (422, slug), url
        assert (await http.get("/v1/webhooks")).json()["data"] == []


async def test_private_address_is_refused_at_delivery_time(
    start: Callable[..., Any], dns: DnsServer, sink: WebhookSink
):
    dns.add_a("hook.example.test", "93.184.216.34", ttl=0)
    postroom: Running = await start(webhooks={"retry_schedule": ["1h"]})
    key = await postroom.new_key()
    hook = await add_webhook(
        postroom, key, f"http://hook.example.test:{sink.port}/", events=["email.queued"]
    )
    dns.remove("hook.example.test")
    dns.add_a("hook.example.test", "127.0.0.1", ttl=0)  # rebound after the check
    await submit(postroom)
    [attempt] = await wait_until(lambda: attempts_of(postroom, key, hook["id"]))
    assert attempt["status_code"] is None
    assert "127.0.0.1" in attempt["error"] and attempt["error"].startswith("refused")
    assert sink.requests == []


async def test_pending_deliveries_go_out_after_a_restart(
    start: Callable[..., Any], sink: WebhookSink
):
    await sink.stop()  # the receiver is down
    settings = {"webhooks": {**FAST["webhooks"], "retry_schedule": ["1s"] * 5}}
    first: Running = await start(**settings)
    key = await first.new_key()
    hook = await add_webhook(first, key, sink.url, events=["email.queued"])
    await submit(first)
    log = await wait_until(lambda: attempts_of(first, key, hook["id"]))
    assert log[0]["status_code"] is None and "connection" in log[0]["error"]
    await first.stop()

    await sink.start()  # back on the same port
    second: Running = await start(**settings)
    [request] = await sink.wait_for_requests(1)
    payload = check_signed(request, hook["secret"])
    assert payload["type"] == "email.queued"
    await second.stop()


async def test_crud_patch_replay_and_delete(start: Callable[..., Any], sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"], enabled=False)
    await submit(postroom)
    async with postroom.http(key) as http:
        events = (await http.get("/v1/events")).json()["data"]
        assert [e["type"] for e in events] == ["email.queued"]
        patched = await http.patch(f"/v1/webhooks/{hook['id']}",
                                   json={"enabled": True, "description": "now on"})
        assert patched.status_code == 200
        assert patched.json()["enabled"] is True and patched.json()["description"] == "now on"
        # Disabled at the time, so nothing was queued for it: replay sends it now.
        replayed = await http.post(f"/v1/webhooks/{hook['id']}/replay",
                                   json={"event_id": events[0]["id"]})
        assert replayed.status_code == 202 and replayed.json() == {"queued": 1}
        [request] = await sink.wait_for_requests(1)
        assert check_signed(request, hook["secret"])["id"] == events[0]["id"]
        replayed = await http.post(f"/v1/webhooks/{hook['id']}/replay",
                                   json={"since": "2000-01-01T00:00:00Z"})
        assert replayed.json() == {"queued": 1}
        bad = await http.patch(f"/v1/webhooks/{hook['id']}", json={"events": ["email.nope"]})
        assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "events"
        bad = await http.post(f"/v1/webhooks/{hook['id']}/replay", json={})
        assert bad.status_code == 422
        assert (await http.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
        assert (await http.get(f"/v1/webhooks/{hook['id']}")).status_code == 404
        assert (await http.delete(f"/v1/webhooks/{hook['id']}")).status_code == 404
    send_only = await postroom.new_key(scope=Scope.SEND)
    async with postroom.http(send_only) as http:
        assert (await http.get("/v1/webhooks")).status_code == 403


async def test_payload_carries_the_message_tags_and_metadata(
    start: Callable[..., Any], sink: WebhookSink
):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "user@example.test", "subject": "s", "text": "hi",
            "tags": ["welcome", {"name": "plan", "value": "pro"}],
            "metadata": {"order": "42"}})
        assert response.status_code == 202, response.text
    [request] = await sink.wait_for_requests(1)
    data = check_signed(request, hook["secret"])["data"]
    assert data["tags"] == ["welcome", {"name": "plan", "value": "pro"}]
    assert data["metadata"] == {"order": "42"}


async def test_integer_query_parameters_are_validated(
    start: Callable[..., Any], sink: WebhookSink
):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url)
    url = f"/v1/webhooks/{hook['id']}/deliveries"
    async with postroom.http(key) as http:
        for params, field in [({"before": "99999999999999999999999"}, "before"),
                              ({"before": str(2**63)}, "before"), ({"before": "-1"}, "before"),
                              ({"before": "²"}, "before"), ({"before": "1e3"}, "before"),
                              ({"limit": "²"}, "limit"), ({"limit": "0"}, "limit")]:
            response = await http.get(url, params=params)
            assert response.status_code == 422, params
            body = response.json()
            assert body["error"] == "validation_error", params
            assert [d["field"] for d in body["details"]] == [field], params
        for before in (str(2**63 - 1), "0", ""):
            response = await http.get(url, params={"before": before})
            assert response.status_code == 200, before


async def test_a_trickling_reply_is_cut_off_at_the_deadline(
    start: Callable[..., Any], sink: WebhookSink
):
    # One byte every 0.3 s never trips httpx's per-read timeout of 1 s: ≈ 30 s for the answer.
    postroom: Running = await start(webhooks={**FAST["webhooks"], "timeout": "1s"})
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    sink.script(Reply(trickle=0.3))
    await submit(postroom)
    first, second = await wait_for_attempts(postroom, key, hook["id"], 2)
    assert first["status_code"] is None and first["success"] is False
    assert first["error"] == "timed out after 1s"
    assert 900 <= first["latency_ms"] < 2500  # the deadline, not the trickle's 30 s
    assert (second["attempt"], second["status_code"], second["success"]) == (2, 200, True)
    one, two = sink.requests
    assert one.headers["webhook-id"] == two.headers["webhook-id"]


async def test_a_huge_reply_is_not_read_whole(start: Callable[..., Any], sink: WebhookSink):
    postroom: Running = await start(**FAST)
    key = await postroom.new_key()
    hook = await add_webhook(postroom, key, sink.url, events=["email.queued"])
    sink.script(Reply(body_size=300 * 2**20))
    await submit(postroom)
    [attempt] = await wait_until(lambda: attempts_of(postroom, key, hook["id"]))
    assert (attempt["status_code"], attempt["success"]) == (200, True)
    assert attempt["latency_ms"] < 2000
    # Postroom hung up after a few KB: the receiver got no further than the socket buffers.
    [sent] = sink.body_bytes_sent
    assert sent < 32 * 2**20
    await submit(postroom)  # a fresh connection serves the next delivery
    log = await wait_for_attempts(postroom, key, hook["id"], 2)
    assert [a["status_code"] for a in log] == [200, 200]


async def test_a_hanging_endpoint_does_not_delay_another(
    start: Callable[..., Any], sink: WebhookSink, mx_sink: MxSink
):
    postroom: Running = await start(webhooks={**FAST["webhooks"], "timeout": "3s"})
    key = await postroom.new_key()
    async with WebhookSink() as hanging:
        hanging.script(*[Reply(delay=60)] * 4)  # accepts the request, never answers
        stuck = await add_webhook(postroom, key, hanging.url)
        await add_webhook(postroom, key, sink.url)
        message_id = await submit(postroom)
        # The other endpoint gets both events, the mail is delivered, and all of it while the
        # hanging endpoint still holds its requests (no attempt of it has ended yet).
        requests = await sink.wait_for_requests(2)
        assert sorted(r.json()["type"] for r in requests) == ["email.delivered", "email.queued"]
        assert all(r.json()["data"]["message_id"] == message_id for r in requests)
        await mx_sink.wait_for_messages(1)
        await hanging.wait_for_requests(1)
        assert await attempts_of(postroom, key, stuck["id"]) == []


# -- retry timing, with a clock the test advances -------------------------------------------------


class FakeClock:
    """The dispatcher's time: it moves only when the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_clock() -> FakeClock:
    # Ahead of the wall clock, which stamps the outbox rows `accept` writes (due at once), and a
    # whole second, so `webhook-timestamp` (whole seconds) is exactly the clock's time.
    return FakeClock(float(int(time.time()) + 100))


@asynccontextmanager
async def dispatching(
    make_settings: Callable[..., Settings], clock: FakeClock, **webhooks: Any
) -> AsyncIterator[tuple[Spool, Settings]]:
    """A real spool and a real dispatcher running on `clock`, polling every 20 ms (real)."""
    settings = make_settings(
        webhooks={"allow_private_networks": True, "poll_interval": "20ms", **webhooks}
    )
    spool = await Spool.open(settings)
    dispatcher = WebhookDispatcher(
        spool, settings, Egress(build_resolver(settings), True), clock=clock
    )
    running = asyncio.create_task(dispatcher.run())
    try:
        yield spool, settings
    finally:
        await dispatcher.stop(5)
        await asyncio.wait_for(running, 10)
        await spool.close()


def outbox_row(settings: Settings) -> tuple[str, int, float | None]:
    """(status, attempts, due_at) of the one outbox row."""
    with closing(sqlite3.connect(f"file:{settings.spool_path}?mode=ro", uri=True)) as conn:
        [row] = conn.execute("SELECT status, attempts, due_at FROM webhook_outbox").fetchall()
    return row[0], row[1], row[2]


async def recorded(settings: Settings, attempts: int) -> tuple[str, int, float | None]:
    """The outbox row once `attempts` attempts are recorded (not while one holds the lease)."""

    def row() -> tuple[str, int, float | None] | None:
        current = outbox_row(settings)
        return current if current[1] == attempts and current[0] != "sending" else None

    return await wait_until(row, timeout=5)


async def no_request_beyond(sink: WebhookSink, n: int, wait: float = 0.5) -> None:
    await asyncio.sleep(wait)  # 25 polls of the dispatcher
    assert len(sink.requests) == n


def queued_submission() -> Submission:
    return Submission("app@acme.test", ("user@example.test",), CONTENT, Source.API)


async def test_a_500_is_retried_once_the_clock_reaches_the_first_step(
    make_settings: Callable[..., Settings], sink: WebhookSink
):
    clock = fake_clock()
    t0 = clock.now
    sink.script_status(500)
    async with dispatching(make_settings, clock) as (spool, settings):  # the default schedule
        assert settings.webhooks.retry_schedule[0] == 5.0
        assert settings.webhooks.retry_jitter == 0.1
        created = await spool.create_webhook(sink.url, ("email.queued",))
        await spool.accept(queued_submission())

        [first] = await sink.wait_for_requests(1, timeout=2)  # at once
        assert first.headers["webhook-timestamp"] == str(int(t0))
        status, attempts, due_at = await recorded(settings, 1)
        assert (status, attempts) == ("pending", 1)
        assert due_at is not None
        assert t0 + 4.5 <= due_at <= t0 + 5.5  # 5 s ± 10 %

        await no_request_beyond(sink, 1)  # real time passes, the clock does not
        clock.now = due_at - 0.01
        await no_request_beyond(sink, 1, wait=0.3)
        assert outbox_row(settings)[:2] == ("pending", 1)

        clock.now = t0 + 6.0
        _, second = await sink.wait_for_requests(2, timeout=2)
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        assert second.headers["webhook-timestamp"] == str(int(t0 + 6.0))
        check_signed(second, created.secret)
        assert (await recorded(settings, 2))[0] == "delivered"
        log = await spool.list_webhook_attempts(created.endpoint.id)
        assert [(a.attempt, a.status_code) for a in reversed(log)] == [(1, 500), (2, 200)]
        await no_request_beyond(sink, 2, wait=0.2)


async def test_a_spent_schedule_gives_up_after_the_last_step(
    make_settings: Callable[..., Settings], sink: WebhookSink
):
    clock = fake_clock()
    sink.script_status(500, 500, 500, 500)
    async with dispatching(make_settings, clock, retry_schedule=["1s", "2s"]) as (spool, settings):
        created = await spool.create_webhook(sink.url, ("email.queued",))
        await spool.accept(queued_submission())
        await sink.wait_for_requests(1, timeout=2)
        for attempts, step in [(1, 1.0), (2, 2.0)]:
            status, made, due_at = await recorded(settings, attempts)
            assert (status, made) == ("pending", attempts)
            assert due_at is not None
            assert clock.now + 0.9 * step <= due_at <= clock.now + 1.1 * step
            clock.now = due_at + 0.01
            await sink.wait_for_requests(attempts + 1, timeout=2)

        assert await recorded(settings, 3) == ("failed", 3, None)
        clock.now += 30 * 86400.0  # long after any step: nothing is due any more
        await no_request_beyond(sink, 3)
        assert len({r.headers["webhook-id"] for r in sink.requests}) == 1
        log = await spool.list_webhook_attempts(created.endpoint.id)
        assert [(a.attempt, a.status_code) for a in reversed(log)] == [
            (1, 500), (2, 500), (3, 500),
        ]


def test_secret_is_not_in_repr():
    endpoint = WebhookEndpoint(1, "wh_1", "http://x/", ("*",), "", True, None, 0.0, 0.0,
                               secrets=(SECRET,))
    assert SECRET not in repr(endpoint)
    assert SECRET not in repr(NewWebhook(endpoint, SECRET))
