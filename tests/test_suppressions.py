"""The suppression list: the API and CLI, events, and what it blocks on both front doors —
unsubscribes block marketing mail only, every other reason blocks all mail."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from store import EventFilter, EventType, NewSuppression, RecipientStatus, SuppressionReason
from tests.conftest import Running, postroom_cli, settings_data, write_config
from tests.support import DnsServer, MxSink, RawSmtp, wait_until

TRUSTED = {"trusted_networks": ["127.0.0.0/8"]}


def send_body(to: str, message_type: str = "transactional") -> dict[str, object]:
    return {"from": "app@acme.test", "to": to, "subject": "Hi", "text": "Hello",
            "message_type": message_type}


async def status_of(postroom: Running, message_id: str) -> RecipientStatus:
    return (await postroom.spool.get_message(message_id)).recipients[0].status


async def test_api_add_list_page_show_remove_with_events(postroom: Running):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        added = await http.post(
            "/v1/suppressions",
            json={"emails": ["B@example.test", "a@example.test", "c@example.test"]},
        )
        assert added.status_code == 201, added.text
        assert added.json()["added"] == ["b@example.test", "a@example.test", "c@example.test"]
        unsub = await http.post(
            "/v1/suppressions", json={"email": "d@example.test", "reason": "unsubscribe"}
        )
        assert unsub.status_code == 201
        again = await http.post("/v1/suppressions", json={"email": "a@example.test"})
        assert again.status_code == 200 and again.json()["already_suppressed"] == [
            "a@example.test"
        ]
        bad = await http.post("/v1/suppressions", json={"email": "nope", "reason": "x"})
        assert bad.status_code == 422
        assert {d["field"] for d in bad.json()["details"]} == {"email", "reason"}

        first = (await http.get("/v1/suppressions", params={"limit": 2})).json()
        assert [s["email"] for s in first["data"]] == ["a@example.test", "b@example.test"]
        assert first["has_more"] is True
        rest = (await http.get(
            "/v1/suppressions", params={"limit": 2, "after": first["next_cursor"]}
        )).json()
        assert [s["email"] for s in rest["data"]] == ["c@example.test", "d@example.test"]
        assert rest["has_more"] is False
        only = (await http.get("/v1/suppressions", params={"reason": "unsubscribe"})).json()
        assert [s["email"] for s in only["data"]] == ["d@example.test"]
        found = (await http.get("/v1/suppressions", params={"search": "C@"})).json()
        assert [s["email"] for s in found["data"]] == ["c@example.test"]

        one = (await http.get("/v1/suppressions/A@example.test")).json()
        assert one["reason"] == "manual" and one["expires_at"] is None
        assert (await http.delete("/v1/suppressions/a@example.test")).status_code == 204
        assert (await http.get("/v1/suppressions/a@example.test")).status_code == 404
        assert (await http.delete("/v1/suppressions/a@example.test")).status_code == 404
    created = await postroom.spool.list_events(EventFilter(type=EventType.SUPPRESSION_CREATED))
    assert len(created) == 4 and created[0].data["reason"] == "manual"
    [deleted] = await postroom.spool.list_events(EventFilter(type=EventType.SUPPRESSION_DELETED))
    assert deleted.recipient == "a@example.test" and deleted.data["reason"] == "manual"


async def test_suppression_blocks_by_reason_and_message_type_on_both_doors(
    start, mx_sink: MxSink
):
    postroom: Running = await start(smtp=TRUSTED)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        await http.post("/v1/suppressions", json={"email": "unsub@example.test",
                                                  "reason": "unsubscribe"})
        await http.post("/v1/suppressions", json={"email": "blocked@example.test",
                                                  "reason": "complaint"})
        await http.post("/v1/suppressions", json={"email": "was@example.test",
                                                  "expires_at": "2001-01-01T00:00:00Z"})
        sent = {}
        for name, to, kind in [
            ("unsub_marketing", "unsub@example.test", "marketing"),
            ("unsub_transactional", "unsub@example.test", "transactional"),
            ("complaint_transactional", "blocked@example.test", "transactional"),
            ("expired", "was@example.test", "marketing"),
        ]:
            answer = await http.post("/v1/messages", json=send_body(to, kind))
            assert answer.status_code == 202, answer.text
            sent[name] = answer.json()
    assert sent["unsub_marketing"]["status"] == "suppressed"
    assert sent["complaint_transactional"]["status"] == "suppressed"
    assert sent["unsub_transactional"]["status"] == "queued"
    assert sent["expired"]["status"] == "queued"

    # SMTP mail is transactional: an unsubscribe does not block it, a complaint does.
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO app.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<blocked@example.test>")
        await client.command("DATA")
        await client.send(b"From: cron@acme.test\r\nSubject: x\r\n\r\nHi\r\n.\r\n")
        reply = await client.reply()
    assert reply.startswith("250 ")
    smtp_id = reply.split()[-1]
    assert await status_of(postroom, smtp_id) is RecipientStatus.SUPPRESSED

    received = await mx_sink.wait_for_messages(2)
    assert sorted(r.rcpt_tos[0] for r in received) == ["unsub@example.test", "was@example.test"]

    async def delivered() -> bool:
        statuses = [
            await status_of(postroom, sent[name]["id"])
            for name in ("unsub_transactional", "expired")
        ]
        return statuses == [RecipientStatus.DELIVERED] * 2

    await wait_until(delivered)
    assert len(mx_sink.messages) == 2


def test_cli_add_import_export_remove(
    tmp_path: Path, dns: DnsServer, server_cert: tuple[Path, Path]
):
    config = write_config(tmp_path / "postroom.toml", settings_data(tmp_path, dns, 25, server_cert))
    postroom_cli(config, "init")
    out = postroom_cli(config, "suppressions", "add", "x@example.test", "--reason", "complaint")
    assert "suppressed x@example.test" in out.stdout
    bad = postroom_cli(config, "suppressions", "add", "x@", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(
        "email,reason,expires_at\n"
        "a@example.test,unsubscribe,\n"
        "not-an-address,manual,\n"
        "B@Example.test\n"
        "c@example.test,spam,\n"
        "\n"
        "x@example.test,manual,\n"
        "d@example.test,manual,2099-01-01T00:00:00Z\n"
        "e@example.test,manual,tomorrow\n"
    )
    imported = postroom_cli(config, "suppressions", "import", str(csv_file), check=False)
    assert imported.returncode == 1  # some lines were rejected
    assert "imported 4 address(es): 3 new, 1 already suppressed; 3 line(s) rejected" in (
        imported.stdout
    )
    for number in (3, 5, 9):
        assert f"line {number}: rejected" in imported.stderr
    listed = json.loads(postroom_cli(config, "suppressions", "list", "--json").stdout)
    assert [(s["email"], s["reason"]) for s in listed] == [
        ("a@example.test", "unsubscribe"), ("b@example.test", "manual"),
        ("d@example.test", "manual"), ("x@example.test", "complaint"),
    ]
    assert listed[2]["expires_at"] == "2099-01-01T00:00:00.000Z"
    exported = postroom_cli(config, "suppressions", "export").stdout.splitlines()
    assert exported[0] == "email,reason,created_at,expires_at,message_id"
    assert len(exported) == 5 and exported[1].startswith("a@example.test,unsubscribe,")
    assert "removed a@example.test" in postroom_cli(
        config, "suppressions", "remove", "a@example.test"
    ).stdout
    gone = postroom_cli(config, "suppressions", "remove", "a@example.test", check=False)
    assert gone.returncode == 1 and "not suppressed" in gone.stderr


def suppression_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppression:")]


async def test_each_change_logs_one_line(postroom: Running, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="store")
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        added = await http.post("/v1/suppressions", json={
            "emails": ["A@example.test", "b@example.test"], "reason": "complaint"})
        assert added.status_code == 201
        again = await http.post("/v1/suppressions", json={"email": "a@example.test"})
        assert again.status_code == 200  # already suppressed: no change, no line
        assert (await http.delete("/v1/suppressions/b@example.test")).status_code == 204
        assert (await http.delete("/v1/suppressions/b@example.test")).status_code == 404
    assert suppression_lines(caplog) == [
        "suppression: a@example.test reason=complaint action=added",
        "suppression: b@example.test reason=complaint action=added",
        "suppression: b@example.test reason=complaint action=removed",
    ]
    assert key not in caplog.text


async def test_adding_over_an_expired_entry_ends_it_first(
    postroom: Running, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="store")
    spool = postroom.spool
    await spool.add_suppressions([NewSuppression("x@example.test", expires_at=time.time() - 1)])
    [new] = await spool.add_suppressions(
        [NewSuppression("x@example.test", SuppressionReason.COMPLAINT)]
    )
    assert new
    found = await spool.list_events(EventFilter(recipient="x@example.test"))
    events = [(e.type, e.data) for e in found]
    assert events == [
        (EventType.SUPPRESSION_CREATED, {"email": "x@example.test", "reason": "manual"}),
        (EventType.SUPPRESSION_DELETED,
         {"email": "x@example.test", "reason": "manual", "expired": True}),
        (EventType.SUPPRESSION_CREATED, {"email": "x@example.test", "reason": "complaint"}),
    ]
    assert suppression_lines(caplog)[1:] == [
        "suppression: x@example.test reason=manual action=expired",
        "suppression: x@example.test reason=complaint action=added",
    ]


def test_cli_import_reads_an_excel_bom_and_names_the_reasons(
    tmp_path: Path, dns: DnsServer, server_cert: tuple[Path, Path]
):
    config = write_config(tmp_path / "postroom.toml", settings_data(tmp_path, dns, 25, server_cert))
    postroom_cli(config, "init")
    csv_file = tmp_path / "export.csv"
    csv_file.write_bytes(
        "email,reason,expires_at\r\na@example.test,manual,\r\nb@example.test,bogus,\r\n"
        .encode("utf-8-sig")
    )
    assert csv_file.read_bytes().startswith(b"\xef\xbb\xbf")
    imported = postroom_cli(config, "suppressions", "import", str(csv_file), check=False)
    assert imported.returncode == 1
    assert "imported 1 address(es): 1 new, 0 already suppressed; 1 line(s) rejected" in (
        imported.stdout
    )
    [rejected] = imported.stderr.strip().splitlines()[-1:]
    assert rejected == (
        "line 3: rejected (reason 'bogus' is not one of hard_bounce, complaint, unsubscribe, "
        "manual): b@example.test,bogus,"
    )
    assert "line 1" not in imported.stderr  # the header row, BOM and all, is skipped


async def test_a_hard_bounce_over_an_expired_entry_ends_it_and_suppresses(
    postroom: Running, mx_sink: MxSink, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="store")
    spool = postroom.spool
    # Expired, not yet swept: intake lets the mail through, the MX refuses the address.
    await spool.add_suppressions([
        NewSuppression("gone@example.test", SuppressionReason.COMPLAINT, time.time() - 1)
    ])
    mx_sink.script_rcpt("gone@example.test", "550 5.1.1 No such user")
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        sent = await http.post("/v1/messages", json=send_body("gone@example.test"))
    assert sent.status_code == 202 and sent.json()["status"] == "queued", sent.text

    async def bounced() -> bool:
        return await status_of(postroom, sent.json()["id"]) is RecipientStatus.BOUNCED

    await wait_until(bounced)
    entry = await spool.suppression("gone@example.test")
    assert entry is not None and entry.reason == "hard_bounce"
    assert entry.reply is not None and entry.reply.enhanced == "5.1.1"
    found = await spool.list_events(EventFilter(recipient="gone@example.test"))
    changes = [(e.type, e.data["reason"]) for e in found if e.type.value.startswith("supp")]
    assert changes == [
        (EventType.SUPPRESSION_CREATED, "complaint"),
        (EventType.SUPPRESSION_DELETED, "complaint"),
        (EventType.SUPPRESSION_CREATED, "hard_bounce"),
    ]
    assert [e.data.get("expired") for e in found if e.type is EventType.SUPPRESSION_DELETED] == [
        True
    ]
    assert suppression_lines(caplog)[1:] == [
        "suppression: gone@example.test reason=complaint action=expired",
        "suppression: gone@example.test reason=hard_bounce action=added",
    ]


async def test_an_expired_unswept_entry_is_absent_for_get_and_delete(postroom: Running):
    spool = postroom.spool
    await spool.add_suppressions([NewSuppression("was@example.test", expires_at=time.time() - 1)])
    assert await spool.suppression("WAS@example.test") is None
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        assert (await http.get("/v1/suppressions/was@example.test")).status_code == 404
        deleted = await http.delete("/v1/suppressions/was@example.test")
        assert deleted.status_code == 404, deleted.text
        assert deleted.json()["error"] == "not_found"
    # Nothing was changed: the sweep ends the entry, with its expired event.
    assert await spool.list_events(EventFilter(type=EventType.SUPPRESSION_DELETED)) == []
