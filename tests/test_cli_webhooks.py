"""`postroom webhooks …` and `postroom events tail`, run in-process against a real spool."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from standardwebhooks import Webhook

from config import load_settings
from relay.cli import cli
from store import Source, Spool, Submission, migrate
from tests.conftest import write_config
from tests.support import WebhookSink


def make_config(tmp_path: Path, name: str, allow_private: bool) -> Path:
    data: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data")},
        "webhooks": {"allow_private_networks": allow_private},
        "policy": {"allow_unconfigured_domains": True},
    }
    config = write_config(tmp_path / name, data)
    migrate(load_settings(config).spool_path)
    return config


async def run(config: Path, *args: str) -> Result:
    """The CLI in a thread: it runs its own event loop while the test's loop serves the sink."""
    return await asyncio.to_thread(
        CliRunner().invoke, cli, ["--config", str(config), *args], obj={}
    )


async def test_webhooks_add_list_test_remove(tmp_path: Path):
    config = make_config(tmp_path, "postroom.toml", allow_private=True)
    strict = make_config(tmp_path, "strict.toml", allow_private=False)
    async with WebhookSink() as sink:
        refused = await run(strict, "webhooks", "add", sink.url)
        assert refused.exit_code == 1 and "webhook_url_private" in refused.output
        bad = await run(config, "webhooks", "add", sink.url, "--events", "email.nope")
        assert bad.exit_code == 1 and "unknown event type" in bad.output

        added = await run(config, "webhooks", "add", sink.url, "--events",
                          "email.delivered,email.bounced", "--json")
        assert added.exit_code == 0, added.output
        hook = json.loads(added.output)
        assert hook["secret"].startswith("whsec_")
        assert hook["events"] == ["email.delivered", "email.bounced"]

        listed = await run(config, "webhooks", "list", "--json")
        [shown] = json.loads(listed.output)
        assert shown["id"] == hook["id"] and "secret" not in shown
        assert hook["secret"] not in listed.output

        tested = await run(config, "webhooks", "test", hook["id"])
        assert tested.exit_code == 0, tested.output
        [request] = sink.requests
        payload = Webhook(hook["secret"]).verify(request.body, request.headers)
        assert payload["type"] == "webhook.test"

        sink.default_status = 503
        failed = await run(config, "webhooks", "test", hook["id"])
        assert failed.exit_code == 1 and "503" in failed.output

        removed = await run(config, "webhooks", "remove", hook["id"])
        assert removed.exit_code == 0
        assert json.loads((await run(config, "webhooks", "list", "--json")).output) == []
        missing = await run(config, "webhooks", "remove", hook["id"])
        assert missing.exit_code == 1 and "no webhook endpoint" in missing.output


async def test_events_tail(tmp_path: Path):
    config = make_config(tmp_path, "postroom.toml", allow_private=False)
    spool = await Spool.open(load_settings(config))
    try:
        for address in ("a@example.test", "b@example.test", "c@example.test"):
            await spool.accept(
                Submission("app@acme.test", (address,), b"Subject: x\r\n\r\nx\r\n", Source.API)
            )
    finally:
        await spool.close()
    tailed = await run(config, "events", "tail", "-n", "2", "--json")
    assert tailed.exit_code == 0, tailed.output
    lines = [json.loads(line) for line in tailed.output.splitlines()]
    assert [e["recipient"] for e in lines] == ["b@example.test", "c@example.test"]
    assert all(e["type"] == "email.queued" and e["message_id"] for e in lines)
    human = await run(config, "events", "tail", "--recipient", "a@example.test")
    assert "email.queued" in human.output and "to=<a@example.test>" in human.output
