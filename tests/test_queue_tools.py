"""`postroom queue summary|retry|cancel|purge` against the spool of a Postroom that is serving."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from relay.cli import cli
from store import EventFilter, EventType, Message, RecipientStatus, Source, Submission
from tests.conftest import Running, write_config
from tests.support import DnsServer, MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def run(config: Path, *args: str) -> Result:
    """The CLI in a thread (its own loop and connections) while the test's loop serves."""
    return await asyncio.to_thread(
        CliRunner().invoke, cli, ["--config", str(config), *args], obj={}
    )


def cli_config(tmp_path: Path, running: Running) -> Path:
    data_dir = running.service.settings.server.data_dir
    return write_config(
        tmp_path / "cli.toml",
        {"server": {"data_dir": str(data_dir)}, "policy": {"allow_unconfigured_domains": True}},
    )


async def submit(running: Running, to: str, **extra: Any) -> str:
    accepted = await running.spool.accept(
        Submission("app@acme.test", (to,), CONTENT, Source.API, **extra)
    )
    return accepted.id


async def status_of(running: Running, message_id: str) -> RecipientStatus:
    message: Message = await running.spool.get_message(message_id)
    return message.recipients[0].status


async def test_queue_tools_while_serving(
    start: Any, dns: DnsServer, mx_sink: MxSink, tmp_path: Path
):
    dns.add_mx("other.test", "mx.example.test")
    running: Running = await start(delivery={"retry_schedule": ["1h"]})
    config = cli_config(tmp_path, running)
    mx_sink.script_rcpt("a@example.test", "451 4.2.0 busy")
    mx_sink.script_rcpt("b@other.test", "451 4.2.0 busy")
    first = await submit(running, "a@example.test")
    second = await submit(running, "b@other.test")
    later = await submit(running, "c@example.test", scheduled_at=time.time() + 86400)
    for message_id in (first, second):
        await wait_until(
            lambda m=message_id: _is(running, m, RecipientStatus.DEFERRED),
            message=f"{message_id} not deferred",
        )

    summary = await run(config, "queue", "summary", "--json")
    assert summary.exit_code == 0, summary.output
    shape = json.loads(summary.stdout)
    assert shape["total"] == 3
    assert shape["buckets"][0] == "5" and shape["buckets"][-1] == "1280+"
    by_domain = {d["domain"]: d for d in shape["domains"]}
    assert by_domain["example.test"]["total"] == 2
    assert by_domain["example.test"]["counts"][0] == 2  # all younger than five minutes
    assert by_domain["other.test"]["total"] == 1
    human = await run(config, "queue", "summary")
    assert "example.test" in human.output and "TOTAL" in human.output

    # Retry: the deferred unit is due now and goes out; the scheduled one keeps its time.
    retried = await run(config, "queue", "retry", "--domain", "example.test", "--json")
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout) == {"retried": 1}
    await wait_until(lambda: _is(running, first, RecipientStatus.DELIVERED))
    assert await status_of(running, later) is RecipientStatus.SCHEDULED

    # Cancel by domain and by id: final `cancelled`, with an event each.
    cancelled = await run(config, "queue", "cancel", "--domain", "other.test", "--json")
    assert json.loads(cancelled.stdout) == {"cancelled": 1, "in_flight": 0}
    one = await run(config, "queue", "cancel", later)
    assert one.exit_code == 0 and "1 recipient(s) cancelled" in one.output
    assert await status_of(running, second) is RecipientStatus.CANCELLED
    assert await status_of(running, later) is RecipientStatus.CANCELLED
    events = await running.spool.list_events(EventFilter(type=EventType.EMAIL_CANCELLED))
    assert {e.message_id for e in events} == {second, later}
    assert all(e.data["recipient"] for e in events)
    again = await run(config, "queue", "cancel", later, "--json")
    assert json.loads(again.stdout) == {"cancelled": 0, "in_flight": 0}

    # Purge: only what matches the status; then every row of the messages is gone.
    kept = await run(config, "queue", "purge", "--status", "delivered", "--older-than", "1h")
    assert kept.exit_code == 0 and "0 message(s) removed" in kept.output
    purged = await run(
        config, "queue", "purge", "--status", "cancelled", "--older-than", "0s", "--json"
    )
    assert json.loads(purged.stdout) == {"removed": 2}
    remaining = await running.spool.list_messages()
    assert [m.id for m in remaining] == [first]
    assert not await running.spool.list_events(EventFilter(message_id=second))
    assert await running.spool.list_events(EventFilter(message_id=first))
    done = await run(config, "queue", "purge", "--status", "finished", "--older-than", "0s")
    assert "1 message(s) removed" in done.output
    assert await running.spool.list_messages() == []


async def _is(running: Running, message_id: str, status: RecipientStatus) -> bool:
    return await status_of(running, message_id) is status


async def test_queue_tools_refuse_bad_input(postroom: Running, tmp_path: Path):
    config = cli_config(tmp_path, postroom)
    for args, complaint in [
        (["retry"], "exactly one of"),
        (["retry", "msg_x", "--all"], "exactly one of"),
        (["cancel"], "exactly one of"),
        (["retry", "msg_nope"], "no message msg_nope"),
        (["cancel", "msg_nope"], "no message msg_nope"),
        (["purge", "--status", "finished", "--older-than", "soon"], "--older-than"),
    ]:
        result = await run(config, "queue", *args)
        assert result.exit_code == 1, (args, result.output)
        assert complaint in result.output, (args, result.output)
    bad_status = await run(config, "queue", "purge", "--status", "queued", "--older-than", "1d")
    assert bad_status.exit_code == 2
