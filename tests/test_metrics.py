"""GET /metrics: the families, parsed by prometheus_client, moving as mail flows; log lines."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from relay.egress import Egress, build_resolver
from relay.metrics import QUEUE_CACHE, Metrics
from relay.webhooks import WebhookDispatcher
from store import QueueSummary, RecipientStatus, Source, Spool, Submission
from tests.conftest import Running
from tests.support import MxSink, WebhookSink, wait_until

FAMILIES = {
    "postroom_messages_accepted": "counter",
    "postroom_recipient_outcomes": "counter",
    "postroom_delivery_latency_seconds": "histogram",
    "postroom_queue_depth": "gauge",
    "postroom_queue_oldest_age_seconds": "gauge",
    "postroom_smtp_sessions": "counter",
    "postroom_smtp_sessions_active": "gauge",
    "postroom_smtp_auth_failures": "counter",
    "postroom_spool_commit_batch_size": "histogram",
    "postroom_spool_commit_seconds": "histogram",
    "postroom_spool_commit_failures": "counter",
    "postroom_webhook_attempts": "counter",
    "postroom_webhook_failures": "counter",
    "postroom_webhook_given_up": "counter",
    "postroom_webhook_backlog": "gauge",
}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(postroom: Running) -> Samples:
    async with postroom.http() as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def parse(text: str) -> Samples:
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, name
    return samples


def send_over_smtp(port: int, tls: ssl.SSLContext, key: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=tls)
        client.ehlo()
        client.user, client.password = "app", "pr_not-a-key"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)  # one attempt (login() tries each mechanism)
        client.login("app", key)
        client.sendmail("app@acme.test", ["smtp@example.test"], b"Subject: m\r\n\r\nhi\r\n")


async def test_metrics_families_move_as_mail_flows(
    postroom: Running, mx_sink: MxSink, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="relay")
    before = await scrape(postroom)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "http@example.test", "subject": "m", "text": "hi"})
        assert response.status_code == 202
    await asyncio.to_thread(send_over_smtp, postroom.smtp_port, client_tls, key)
    await mx_sink.wait_for_messages(2)

    async def delivered_twice() -> bool:
        now = await scrape(postroom)
        return now[("postroom_recipient_outcomes_total", (("status", "delivered"),))] == 2

    await wait_until(delivered_twice)
    after = await scrape(postroom)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("postroom_messages_accepted_total", source="api") == 1
    assert moved("postroom_messages_accepted_total", source="smtp") == 1
    assert moved("postroom_recipient_outcomes_total", status="delivered") == 2
    assert moved("postroom_delivery_latency_seconds_count") == 2
    assert moved("postroom_smtp_sessions_total") == 1
    assert moved("postroom_smtp_auth_failures_total") == 1
    assert after[("postroom_smtp_sessions_active", ())] == 0
    assert moved("postroom_spool_commit_batch_size_count") >= 5  # key, 2 accepts, claims, outcomes
    assert moved("postroom_spool_commit_seconds_count") >= 5

    # One line for the SMTP session; neither the key nor a body in any line.
    [line] = [r.getMessage() for r in caplog.records if r.name == "relay.sessions"]
    assert line.startswith("smtp session from 127.0.0.1:")
    assert "helo=client.test tls=yes auth=key_" in line
    assert "accepted=1 auth_failures=1" in line
    assert key not in caplog.text and "hi\r\n" not in caplog.text


async def test_queue_gauges_show_pending_work(start, mx_sink: MxSink):
    postroom = await start(delivery={"mx_port": 1})  # nothing answers: the unit stays pending
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "stuck@example.test", "subject": "m", "text": "hi"})
        assert response.status_code == 202
    samples = await scrape(postroom)
    depth = {labels[0][1]: value for (name, labels), value in samples.items()
             if name == "postroom_queue_depth"}
    assert set(depth) == {"scheduled", "queued", "sending", "deferred"}
    assert sum(depth.values()) == 1
    assert samples[("postroom_queue_oldest_age_seconds", ())] >= 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_queue_summary_is_cached_between_scrapes():
    calls = []

    async def summary() -> QueueSummary:
        calls.append(1)
        return QueueSummary(counts={RecipientStatus.QUEUED: len(calls)}, oldest_queued_at=None)

    clock = FakeClock()
    metrics = Metrics(summary, clock=clock)
    cases = [(0.0, 1), (QUEUE_CACHE / 2, 1), (QUEUE_CACHE, 2), (0.1, 2), (QUEUE_CACHE * 3, 3)]
    for advance, expected_calls in cases:
        clock.now += advance
        text = (await metrics.render()).decode()
        assert len(calls) == expected_calls, advance
        assert f'postroom_queue_depth{{status="queued"}} {float(expected_calls)}' in text


async def test_not_ready_while_the_spool_cannot_commit(postroom: Running):
    spool = postroom.spool
    key = await postroom.new_key()
    pages = await spool._writer.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    # Reproduce a full disk: the writer's connection may not grow the file any further.
    await spool._writer.run(lambda conn: conn.execute(f"PRAGMA max_page_count={pages + 2}"))
    big = {"from": "app@acme.test", "to": "a@example.test", "subject": "big",
           "text": "x" * 400_000}
    async with postroom.http(key) as http:
        assert (await http.post("/v1/messages", json=big)).status_code == 507
        assert (await http.get("/readyz")).status_code == 503
        samples = await scrape(postroom)
        assert samples[("postroom_spool_commit_failures_total", ())] == 1
        await spool._writer.run(lambda conn: conn.execute("PRAGMA max_page_count=1073741823"))
        assert (await http.post("/v1/messages", json=big)).status_code == 202
        assert (await http.get("/readyz")).status_code == 200


async def test_webhook_families_show_backlog_and_failures(make_settings: Callable[..., Settings]):
    """The dispatcher and the metrics wired as the service wires them, against a real receiver
    that fails, then accepts, then answers 410 Gone."""
    settings = make_settings(webhooks={
        "allow_private_networks": True, "retry_schedule": ["100ms"], "poll_interval": "50ms"})
    spool = await Spool.open(settings)

    clock = FakeClock()  # each scrape below moves it past the cache: every one reads the spool
    metrics = Metrics(spool.queue_summary, clock=clock, webhook_backlog=spool.webhook_backlog)
    dispatcher = WebhookDispatcher(
        spool, settings, Egress(build_resolver(settings), True), metrics=metrics
    )

    async def webhook_samples() -> dict[str, float]:
        clock.now += QUEUE_CACHE
        samples = parse((await metrics.render()).decode())
        return {name: samples[(f"postroom_webhook_{name}", ())]
                for name in ("attempts_total", "failures_total", "given_up_total", "backlog")}

    async def reached(expected: dict[str, float]) -> bool:
        return await webhook_samples() == expected

    def submission() -> Submission:
        return Submission("app@acme.test", ("u@example.test",), b"Subject: m\r\n\r\nhi\r\n",
                          Source.API)

    try:
        async with WebhookSink() as sink:
            sink.script_status(500)
            await spool.create_webhook(sink.url, ("email.queued",))
            await spool.accept(submission())
            await spool.accept(submission())
            assert await webhook_samples() == {
                "attempts_total": 0, "failures_total": 0, "given_up_total": 0, "backlog": 2}
            running = asyncio.create_task(dispatcher.run())
            # One 500 (retried 100 ms later), then two 200s: the backlog drains.
            after_retry = {"attempts_total": 3, "failures_total": 1, "given_up_total": 0,
                           "backlog": 0}
            await wait_until(lambda: reached(after_retry))
            sink.script_status(410)
            await spool.accept(submission())
            after_gone = {"attempts_total": 4, "failures_total": 2, "given_up_total": 1,
                          "backlog": 0}
            await wait_until(lambda: reached(after_gone))
            await dispatcher.stop(1)
            await running
    finally:
        await spool.close()

