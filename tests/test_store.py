"""The spool: group commit, job isolation, leases, a full disk."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from store import (
    Accepted,
    DeliveryJob,
    IdempotencyConflict,
    IdempotencyKey,
    NotFound,
    Outcome,
    PolicyRejected,
    Priority,
    RecipientStatus,
    Reply,
    Scope,
    Source,
    Spool,
    StorageFull,
    Submission,
    migrate,
)
from store.db import connect_writer
from store.intake import header_block, normalise_line_endings
from store.migrate import apply_migrations, migrations
from store.sql import Q

CONTENT = b"From: a@acme.test\r\nSubject: s\r\n\r\nbody\r\n"


def submission(*recipients: str, content: bytes = CONTENT) -> Submission:
    return Submission("a@acme.test", recipients or ("u@example.test",), content, Source.API)


@pytest.fixture
async def spool(tmp_path: Path):
    opened = await Spool.open(
        Settings(server={"data_dir": str(tmp_path)}, policy={"allow_unconfigured_domains": True})
    )
    yield opened
    await opened.close()


def spool_rows(tmp_path: Path, table: str) -> int:
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_wal_and_full_sync_on_the_writer(tmp_path: Path, spool: Spool):
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_the_wal_is_checkpointed_into_the_database_while_the_spool_is_open(
    tmp_path: Path, spool: Spool
):
    # Commits no longer checkpoint (store/checkpoint.py does, on its own thread): the messages
    # must still reach the database file itself, not only pile up in the WAL until close.
    database = tmp_path / "spool.sqlite3"
    before = database.stat().st_size
    body = CONTENT + b"x" * 20_000 + b"\r\n"
    for i in range(10):
        await spool.accept_many(
            [submission(f"u{i}-{j}@example.test", content=body) for j in range(20)]
        )
    for _ in range(100):
        if database.stat().st_size > before + 2_000_000:
            break
        await asyncio.sleep(0.05)
    assert database.stat().st_size > before + 2_000_000  # 4 MB of bodies, most copied in
    assert await spool.integrity_check() == ["ok"]


async def test_bulk_jobs_keep_their_statement_journal_in_a_file(spool: Spool):
    # Small jobs keep the copies their savepoints make in memory (cheap); a job that frees or
    # rewrites many bodies (sweeps, purges, re-encryption) would hold a copy of each body there.
    def journal(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA temp_store").fetchone()[0])

    assert await spool._writer.run(journal) == 2  # MEMORY
    assert await spool._writer.run(journal, bulk=True) == 1  # FILE
    assert await spool._writer.run(journal) == 2  # and back for the next small one


async def test_concurrent_accepts_commit_together_and_a_failing_job_fails_alone(
    tmp_path: Path, spool: Spool
):
    results = await asyncio.gather(
        *[spool.accept(submission(f"u{i}@example.test")) for i in range(50)],
        spool.revoke_key("key_missing"),  # fails inside the same group transaction
        *[spool.accept(submission(f"v{i}@example.test")) for i in range(50)],
        return_exceptions=True,
    )
    assert isinstance(results[50], NotFound)
    accepted = [r for i, r in enumerate(results) if i != 50]
    assert all(r.id.startswith("msg_") for r in accepted)
    assert len({r.id for r in accepted}) == 100
    assert spool_rows(tmp_path, "messages") == 100
    assert spool_rows(tmp_path, "recipients") == 100
    assert spool_rows(tmp_path, "events") == 100


async def _with_the_writer_held(spool: Spool, *calls: Any) -> list[Any]:
    """Run `calls` while the writer is busy with a slow job, so they share one group commit."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(conn: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.3)

    held = asyncio.ensure_future(spool._writer.run(slow))
    await started.wait()
    results = await asyncio.gather(*calls, return_exceptions=True)
    await held
    return results


async def test_single_accepts_stored_together_still_refuse_alone(tmp_path: Path, spool: Spool):
    # Neighbouring accepts in one group commit are stored by one call (the writer's `joint`);
    # a message refused inside it (its idempotency key taken meanwhile) is refused alone.
    keyed = replace(submission(), idempotency=IdempotencyKey("k", b"fingerprint"))
    results = await _with_the_writer_held(
        spool,
        *[spool.accept(submission(f"u{i}@example.test")) for i in range(5)],
        spool.accept(keyed),
        spool.accept(keyed),
        *[spool.accept(submission(f"v{i}@example.test")) for i in range(5)],
    )
    refused = [r for r in results if isinstance(r, IdempotencyConflict)]
    assert len(refused) == 1 and refused[0].slug == "idempotency_key_in_progress"
    assert sum(isinstance(r, Accepted) for r in results) == 11
    assert spool_rows(tmp_path, "messages") == 11
    assert spool_rows(tmp_path, "events") == 11


async def test_a_job_that_breaks_the_joint_call_fails_alone(tmp_path: Path, spool: Spool):
    # A message that fails inside the joint call for a reason of its own (here metadata that
    # is not JSON) rolls the joint call back; the jobs then run one by one.
    broken = replace(submission(), metadata={"x": object()})
    results = await _with_the_writer_held(
        spool,
        *[spool.accept(submission(f"u{i}@example.test")) for i in range(5)],
        spool.accept(broken),
        *[spool.accept(submission(f"v{i}@example.test")) for i in range(5)],
    )
    assert isinstance(results[5], TypeError)
    assert all(isinstance(r, Accepted) for i, r in enumerate(results) if i != 5)
    assert spool_rows(tmp_path, "messages") == 10
    assert spool_rows(tmp_path, "recipients") == 10


async def test_outcomes_recorded_together_keep_their_order_and_fail_alone(
    tmp_path: Path, spool: Spool
):
    # Neighbouring outcome records in one group commit are one call (the writer's `joint`).
    # Each event keeps its attempt's own time, a bounce's suppression follows its bounce, and
    # an outcome that cannot be written (data that is not JSON) fails alone.
    for i in range(6):
        await spool.accept(submission(f"u{i}@example.test"))
    jobs = sorted(
        await spool.claim_due(max_units=6, per_destination=6, lease=60), key=lambda j: j.message_seq
    )
    assert len(jobs) == 6
    ok = Reply(250, "2.0.0", "ok")
    gone = Reply(550, "5.1.1", "no such user")

    def outcomes(i: int, job: DeliveryJob) -> list[Outcome]:
        rcpt = job.recipients[0].id
        if i == 2:
            return [Outcome(rcpt, RecipientStatus.BOUNCED, gone, suppress=True)]
        if i == 4:
            return [Outcome(rcpt, RecipientStatus.DELIVERED, ok, data={"x": object()})]
        return [Outcome(rcpt, RecipientStatus.DELIVERED, ok)]

    def record(which: range) -> list[Any]:
        return [
            spool.record_outcomes(jobs[i], outcomes(i, jobs[i]), now=1_000_000.0 + i)
            for i in which
        ]

    assert await _with_the_writer_held(spool, *record(range(4))) == [None] * 4
    results = await _with_the_writer_held(spool, *record(range(4, 6)))
    assert isinstance(results[0], TypeError) and results[1] is None
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        statuses = [r[0] for r in conn.execute("SELECT status FROM recipients ORDER BY id")]
        events = conn.execute(
            "SELECT type, recipient, created_at FROM events WHERE type != 'email.queued' "
            "ORDER BY id"
        ).fetchall()
    assert statuses == ["delivered", "delivered", "bounced", "delivered", "sending", "delivered"]
    assert events == [
        ("email.delivered", "u0@example.test", 1_000_000.0),
        ("email.delivered", "u1@example.test", 1_000_001.0),
        ("email.bounced", "u2@example.test", 1_000_002.0),
        ("suppression.created", "u2@example.test", 1_000_002.0),
        ("email.delivered", "u3@example.test", 1_000_003.0),
        ("email.delivered", "u5@example.test", 1_000_005.0),
    ]


async def test_policy_rejections_store_nothing(tmp_path: Path, spool: Spool):
    with pytest.raises(PolicyRejected) as excinfo:
        await spool.accept(submission("no-at-sign"))
    assert excinfo.value.slug == "invalid_recipient"
    with pytest.raises(PolicyRejected) as excinfo:
        await spool.accept(submission(*[f"u{i}@example.test" for i in range(101)]))
    assert excinfo.value.slug == "too_many_recipients"
    assert spool_rows(tmp_path, "messages") == 0


async def test_duplicate_recipients_are_one_unit(spool: Spool):
    accepted = await spool.accept(submission("U@example.test", "u@example.test"))
    message = await spool.get_message(accepted.id)
    assert [r.email for r in message.recipients] == ["U@example.test"]


async def test_claim_leases_units_once_and_round_robins_destinations(spool: Spool):
    for i in range(30):
        await spool.accept(submission(f"u{i}@big.test"))
    await spool.accept(submission("one@small.test"))
    jobs = await spool.claim_due(max_units=12, per_destination=10, lease=60)
    destinations = [j.destination for j in jobs]
    # One domain's backlog does not starve the other: both are served in one claim.
    assert destinations.count("big.test") == 10
    assert destinations.count("small.test") == 1
    again = await spool.claim_due(max_units=100, per_destination=100, lease=60)
    assert {r.id for j in again for r in j.recipients}.isdisjoint(
        {r.id for j in jobs for r in j.recipients}
    )
    assert len(again) == 20


async def test_domains_sharing_a_smarthost_share_its_room_in_the_claim(spool: Spool):
    for i in range(8):
        await spool.accept(submission(f"u{i}@d{i}.test"))
    await spool.accept(submission("mx@direct.test"))
    relayed = {f"d{i}.test" for i in range(8)}
    jobs = await spool.claim_due(
        max_units=100, per_destination=2, lease=60, rooms={d: 2 for d in relayed},
        shared=lambda domain: "relay.test:25" if domain in relayed else None,
        shared_rooms={"relay.test:25": 3},
    )
    # Three for the smarthost, whichever of its domains they are for; the MX domain its own.
    destinations = [j.destination for j in jobs]
    assert sum(d in relayed for d in destinations) == 3
    assert destinations.count("direct.test") == 1
    # What was not claimed stays due for the next claim, nothing of it leased.
    rest = await spool.claim_due(max_units=100, per_destination=100, lease=60)
    assert sorted(j.destination for j in rest) == sorted(
        relayed - {d for d in destinations if d in relayed}
    )


async def test_expired_and_recovered_leases_make_units_due_again(spool: Spool):
    accepted = await spool.accept(submission())
    [job] = await spool.claim_due(10, 10, lease=60)
    assert await spool.claim_due(10, 10, lease=60) == []
    # Another run of the service (after a crash) recovers what was in flight.
    assert await spool.recover_leases() == 1
    [again] = await spool.claim_due(10, 10, lease=60)
    assert again.recipients[0].id == job.recipients[0].id
    message = await spool.get_message(accepted.id)
    assert message.recipients[0].status is RecipientStatus.SENDING
    # An expired lease is due without any recovery.
    await spool.release([])
    later = await spool.claim_due(10, 10, lease=60, now=again.recipients[0].updated_at + 61)
    assert [j.message_id for j in later] == [accepted.id]


async def test_full_disk_fails_the_batch_and_the_writer_keeps_running(
    tmp_path: Path, spool: Spool
):
    await spool.accept(submission())
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    big = CONTENT + b"x" * 400_000
    # Reproduce a full disk: the writer's connection may not grow the file any further.
    await spool._writer.run(lambda conn: conn.execute(f"PRAGMA max_page_count={pages + 2}"))
    with pytest.raises(StorageFull):
        await spool.accept(submission(content=big))
    assert not spool.is_healthy
    await spool._writer.run(lambda conn: conn.execute("PRAGMA max_page_count=1073741823"))
    accepted = await spool.accept(submission(content=big))
    assert spool.is_healthy
    assert (await spool.get_message(accepted.id)).size > 400_000
    assert spool_rows(tmp_path, "messages") == 2


async def test_keys_are_stored_as_digests(tmp_path: Path, spool: Spool):
    new = await spool.create_key("k", Scope.SEND)
    principal = await spool.authenticate(new.secret)
    assert principal is not None and principal.scope is Scope.SEND
    assert await spool.authenticate(new.secret + "x") is None
    raw = (tmp_path / "spool.sqlite3").read_bytes() + (tmp_path / "spool.sqlite3-wal").read_bytes()
    assert new.secret.encode() not in raw


async def test_key_hash_secret_changes_the_digest(tmp_path: Path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("pepper\n")
    settings = Settings(server={"data_dir": str(tmp_path)},
                        api={"key_hash_secret_file": str(secret_file)})
    peppered = await Spool.open(settings)
    new = await peppered.create_key("k", Scope.FULL)
    assert await peppered.authenticate(new.secret) is not None
    await peppered.close()
    plain = await Spool.open(Settings(server={"data_dir": str(tmp_path)}))
    assert await plain.authenticate(new.secret) is None
    await plain.close()


def test_migrations_are_numbered_without_gaps():
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_every_index_serves_a_query(tmp_path: Path):
    """Each index costs every write of its table (intake, each claim and each recorded outcome
    keep the recipients' indexes): one that no query's plan uses is only that cost."""
    migrate(tmp_path / "spool.sqlite3")
    with sqlite3.connect(tmp_path / "spool.sqlite3") as conn:
        used: set[str] = set()
        for name, sql in Q.items():
            params = {p: "[]" if p in ("ids", "seqs") else None for p in re.findall(r":(\w+)", sql)}
            try:
                plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            except sqlite3.Error as exc:  # every named query must at least be valid SQL here
                raise AssertionError(f"{name}: {exc}") from exc
            used.update(re.findall(r"\bINDEX (\w+)", " ".join(row[3] for row in plan)))
        indexes = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )}
    assert "recipients_destination_due" in indexes  # the check sees the migrated schema
    assert indexes - used == set()


async def test_restricted_key_checks_envelope_sender_and_from_header(spool: Spool):
    new = await spool.create_key("acme", Scope.SEND, ["acme.test"])
    principal = await spool.authenticate(new.secret)
    assert principal is not None and principal.sender_domains == ("acme.test",)
    ok = Submission("a@ACME.test", ("u@example.test",), CONTENT, Source.SMTP, principal)
    assert (await spool.accept(ok)).id.startswith("msg_")
    forged = CONTENT.replace(b"From: a@acme.test", b"From: boss@evil.test")
    for bad in (
        Submission("a@evil.test", ("u@example.test",), CONTENT, Source.SMTP, principal),
        Submission("a@acme.test", ("u@example.test",), forged, Source.SMTP, principal),
        Submission("", ("u@example.test",), b"Subject: s\r\n\r\nx\r\n", Source.SMTP, principal),
    ):
        with pytest.raises(PolicyRejected) as excinfo:
            await spool.accept(bad)
        assert excinfo.value.slug == "sender_not_allowed"


async def test_accept_many_refuses_items_alone_and_commits_the_rest(
    tmp_path: Path, spool: Spool
):
    key = IdempotencyKey("k", b"fingerprint")
    results = await spool.accept_many(
        [
            submission("a@example.test"),
            submission("no-at-sign"),
            replace(submission("b@example.test"), idempotency=key),
            replace(submission("c@example.test"), idempotency=key),  # the key is taken by now
        ]
    )
    assert isinstance(results[0], Accepted) and isinstance(results[2], Accepted)
    assert isinstance(results[1], PolicyRejected)
    assert isinstance(results[3], IdempotencyConflict)
    assert spool_rows(tmp_path, "messages") == 2
    assert spool_rows(tmp_path, "recipients") == 2
    assert spool_rows(tmp_path, "events") == 2  # one email.queued each, none for the refused
    assert spool_rows(tmp_path, "idempotency_keys") == 1


async def test_idempotency_verdicts_and_expiry(spool: Spool):
    key = IdempotencyKey("k", b"one")
    async with spool.hold_idempotency_keys(None, [key]) as [verdict]:
        assert verdict is None
        async with spool.hold_idempotency_keys(None, [key]) as [inner]:
            assert isinstance(inner, IdempotencyConflict)
            assert inner.slug == IdempotencyConflict.IN_PROGRESS
        accepted = await spool.accept(replace(submission(), idempotency=key))
    async with spool.hold_idempotency_keys(None, [key, IdempotencyKey("k", b"two")]) as found:
        assert found[0] == accepted
        assert isinstance(found[1], IdempotencyConflict)  # the same key twice: in progress
    async with spool.hold_idempotency_keys(None, [IdempotencyKey("k", b"two")]) as [other]:
        assert isinstance(other, IdempotencyConflict) and other.slug == "idempotency_key_reused"
    later = accepted.created_at + 86400 + 1
    async with spool.hold_idempotency_keys(None, [key], now=later) as [expired]:
        assert expired is None
@pytest.mark.parametrize(
    ("content", "normalised"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"a\r\n.\r\n\n.\n", b"a\r\n.\r\n\r\n.\r\n"),
        (b"", b""),
    ],
    ids=["crlf", "lf", "cr", "cr-crlf", "lf-cr", "mixed", "empty"],
)
def test_line_endings_are_normalised_to_crlf(content: bytes, normalised: bytes):
    assert normalise_line_endings(content) == normalised


@pytest.mark.parametrize(
    ("content", "block"),
    [
        (b"Subject: s\r\n\r\nbody\r\n\r\nmore", b"Subject: s\r\n"),
        (b"\r\n\r\nbody", b"\r\n"),
        (b"Subject: only a header\r\n", b"Subject: only a header\r\n"),
    ],
)
def test_header_block_is_the_header_only(content: bytes, block: bytes):
    assert header_block(content) == block


async def test_priority_goes_first_but_overdue_low_priority_mail_is_not_starved(spool: Spool):
    low = await spool.accept(replace(submission("low@big.test"), priority=Priority.LOW))
    for i in range(6):
        await spool.accept(replace(submission(f"h{i}@big.test"), priority=Priority.HIGH))
    now = (await spool.get_message(low.id)).created_at
    # Fresh: one slot per claim, high priority first.
    [first] = await spool.claim_due(1, 1, lease=60, now=now + 1, aging=300)
    assert first.recipients[0].email.startswith("h")
    # Overdue past the aging limit: the low-priority unit gets a turn within two claims.
    later = now + 301
    claimed = [j.recipients[0].email for _ in range(2)
               for j in await spool.claim_due(1, 1, lease=60, now=later, aging=300)]
    assert "low@big.test" in claimed


def test_due_destinations_are_the_domains_with_a_due_unit(tmp_path: Path):
    """The claim's skip-scan finds exactly the domains a plain DISTINCT over due units finds."""
    conn = connect_writer(tmp_path / "spool.db", 5.0)
    apply_migrations(conn)
    conn.execute(
        "INSERT INTO messages (id, created_at, source, mail_from, from_header, subject, size,"
        " body, tags, metadata, message_type) VALUES ('m', 0, 'api', 'a@b.test', '', '', 1,"
        " x'00', '[]', '{}', 'transactional')"
    )
    # Per domain: units waiting until 10, 20 or 30, units with no due time (final), or none.
    waits = {f"d{i}.test": [None, 10.0, 20.0, 30.0][i % 4 :: 2] for i in range(12)}
    waits["final.test"] = [None, None]
    conn.executemany(
        "INSERT INTO recipients (message_seq, email, domain, status, priority, due_at,"
        " updated_at) VALUES (1, ?, ?, 'queued', 0, ?, 0)",
        [(f"u{n}@{domain}", domain, due) for domain, dues in waits.items()
         for n, due in enumerate(dues)],
    )
    for now in (0.0, 10.0, 15.0, 20.0, 30.0, 99.0):
        plain = [r[0] for r in conn.execute(
            "SELECT DISTINCT domain FROM recipients WHERE due_at <= ? ORDER BY domain", (now,))]
        found = [r[0] for r in conn.execute(Q["due_destinations"], {"now": now, "limit": 100})]
        assert found == plain, now
        assert [r[0] for r in conn.execute(Q["due_destinations"], {"now": now, "limit": 2})] == (
            plain[:2])
    conn.close()
