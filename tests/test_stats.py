"""Stats: counts, rates and latency percentiles against a spool with known outcomes."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config import Settings
from store import (
    Outcome,
    RecipientStatus,
    Reply,
    Source,
    Spool,
    StatsGrouping,
    Submission,
    Tag,
)
from tests.conftest import Running, postroom_cli, write_config

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0", "ok")


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(
        Settings(server={"data_dir": str(tmp_path)}, policy={"allow_unconfigured_domains": True})
    )
    yield opened
    await opened.close()


async def accept(spool: Spool, *to: str, tags: tuple[str, ...] = ()) -> str:
    sub = Submission("app@acme.test", to, CONTENT, Source.API, tags=tuple(Tag(t) for t in tags))
    return (await spool.accept(sub)).id


async def settle(spool: Spool, wanted: dict[str, RecipientStatus]) -> None:
    """Claim every due unit and record the outcome `wanted` names for its address."""
    for job in await spool.claim_due(max_units=100, per_destination=100, lease=60):
        outcomes = []
        for rcpt in job.recipients:
            status = wanted[rcpt.email]
            reply = Reply(550, "5.1.1", "no") if status is RecipientStatus.BOUNCED else OK
            due = time.time() - 1 if status is RecipientStatus.DEFERRED else None
            outcomes.append(Outcome(rcpt.id, status, reply, due_at=due))
        await spool.record_outcomes(job, outcomes)


@pytest.fixture
async def known(tmp_path: Path, spool: Spool) -> Spool:
    await accept(spool, "x@a.test", "y@b.test", tags=("a",))
    await accept(spool, "z@a.test", tags=("a", "b"))
    cancelled = await accept(spool, "w@b.test")
    await accept(spool, "v@a.test")
    await spool.cancel_message(cancelled)
    D, B = RecipientStatus.DELIVERED, RecipientStatus.BOUNCED
    await settle(spool, {"x@a.test": D, "y@b.test": B, "z@a.test": RecipientStatus.DEFERRED,
                         "v@a.test": D})
    await settle(spool, {"z@a.test": D})  # delivered on its second attempt
    # Latencies are wall-clock; pin them so the percentiles are known: 10 s, 30 s, 20 s.
    with sqlite3.connect(tmp_path / "spool.sqlite3", timeout=10) as conn:
        for email, seconds in (("x@a.test", 10), ("z@a.test", 30), ("v@a.test", 20)):
            conn.execute(
                "UPDATE recipients SET delivered_at = seconds + (SELECT created_at FROM messages"
                " WHERE seq = message_seq) FROM (SELECT ? AS seconds) WHERE email = ?",
                (seconds, email),
            )
    return spool


async def test_totals(known: Spool):
    [total] = await known.stats(0, time.time() + 60)
    assert total.group is None and total.total == 5
    counts = {s: n for s, n in total.counts.items() if n}
    assert counts == {RecipientStatus.DELIVERED: 3, RecipientStatus.BOUNCED: 1,
                      RecipientStatus.CANCELLED: 1}
    assert total.bounce_rate == 0.25  # 1 bounced of 4 delivered or bounced
    assert total.deferral_rate == 0.25  # 1 of 4 attempted was deferred once
    assert (total.latency_p50, total.latency_p95) == pytest.approx((20, 30))


async def test_groups(known: Spool):
    now = time.time()
    by_domain = {g.group: g for g in await known.stats(0, now + 60, StatsGrouping.DOMAIN)}
    assert set(by_domain) == {"a.test", "b.test"}
    assert by_domain["a.test"].counts[RecipientStatus.DELIVERED] == 3
    assert by_domain["b.test"].bounce_rate == 1.0
    assert by_domain["b.test"].latency_p50 is None
    by_tag = {g.group: g for g in await known.stats(0, now + 60, StatsGrouping.TAG)}
    assert {t: g.total for t, g in by_tag.items()} == {"a": 3, "b": 1}
    [day] = await known.stats(0, now + 60, StatsGrouping.DAY)
    assert day.group == time.strftime("%Y-%m-%d", time.gmtime(now)) and day.total == 5
    [empty] = await known.stats(0, 1)  # nothing accepted then: one group of zeros
    assert empty.total == 0 and empty.bounce_rate is None


async def test_http_shape_and_errors(postroom: Running):
    async with postroom.http(await postroom.new_key()) as client:
        r = await client.get("/v1/stats", params={"group_by": "domain"})
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"since", "until", "group_by", "data"}
        assert r.json()["data"] == []
        total = (await client.get("/v1/stats")).json()["data"][0]
        assert set(total["counts"]) == {s.value for s in RecipientStatus}
        for bad in ({"group_by": "week"}, {"since": "yesterday"},
                    {"since": "2030-01-02T00:00Z", "until": "2030-01-01T00:00Z"}):
            r = await client.get("/v1/stats", params=bad)
            assert r.status_code == 422, bad


async def test_until_at_the_epoch_is_a_bound_not_missing(postroom: Running):
    epoch = "1970-01-01T00:00:00Z"
    async with postroom.http(await postroom.new_key()) as client:
        same = await client.get("/v1/stats", params={"since": epoch, "until": epoch})
        until_only = await client.get("/v1/stats", params={"until": epoch})
        window = await client.get("/v1/stats", params={"since": epoch,
                                                        "until": "1970-01-02T00:00:00Z"})
    assert same.status_code == 422, same.text
    assert [d["field"] for d in same.json()["details"]] == ["since"]
    assert until_only.status_code == 200, until_only.text
    assert until_only.json()["until"] == "1970-01-01T00:00:00.000Z"
    assert until_only.json()["since"] == "1969-12-25T00:00:00.000Z"
    assert window.status_code == 200 and window.json()["until"] == "1970-01-02T00:00:00.000Z"


def test_cli_prints_a_table_and_json(tmp_path: Path):
    config = write_config(tmp_path / "postroom.toml", {"server": {"data_dir": "var"}})
    postroom_cli(config, "init")
    table = postroom_cli(config, "stats", "--since", "1d").stdout
    assert "delivered" in table.splitlines()[1] and table.splitlines()[2].startswith("all")
    data = json.loads(postroom_cli(config, "stats", "--group-by", "day", "--json").stdout)
    assert data["group_by"] == "day" and data["data"] == []
    bad = postroom_cli(config, "stats", "--since", "soon", check=False)
    assert bad.returncode == 1 and "--since" in bad.stderr
