"""Sending domains: keys and records over the API and the CLI, live verification against the
test DNS server, the sending-domain policy on both front doors, and default sender names."""

from __future__ import annotations

import asyncio
import email
import json
from email.policy import default as default_policy
from pathlib import Path

import dkim
import pytest

from relay.dkim import generate_keys
from relay.domains import dns_records, judge
from store import DnsRecord, RecordStatus, Spool
from tests.conftest import Running, postroom_cli, settings_data, write_config
from tests.support import DnsServer, MxSink, RawSmtp
from tests.test_dkim import dns_lookup

STRICT = {"policy": {"allow_unconfigured_domains": False}}
TRUSTED = {"trusted_networks": ["127.0.0.0/8"]}


def send_body(sender: str = "app@acme.test", **extra: object) -> dict[str, object]:
    return {"from": sender, "to": "user@example.test", "subject": "Hi", "text": "Hello", **extra}


async def smtp_send(port: int, sender: str) -> str:
    """The reply to the end of DATA (or the first refusal) for a trusted-network submission."""
    async with await RawSmtp.open(port) as client:
        await client.command("EHLO app.test")
        await client.command(f"MAIL FROM:<{sender}>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        await client.send(
            f"From: {sender}\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n.\r\n"
            .encode()
        )
        return await client.reply()


async def test_domain_records_verify_live_and_signed_mail_verifies(
    start, dns: DnsServer, mx_sink: MxSink
):
    postroom: Running = await start(**STRICT)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        created = await http.post(
            "/v1/domains",
            json={"name": "Acme.Test", "algorithm": "both", "default_sender_name": "Acme Inc"},
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert "PRIVATE" not in created.text
        assert body["name"] == "acme.test" and body["default_sender_name"] == "Acme Inc"
        records = body["records"]
        assert [(r["type"], r["name"], r["status"]) for r in records] == [
            ("TXT", "postroom._domainkey.acme.test", "unverified"),
            ("TXT", "postroom-ed25519._domainkey.acme.test", "unverified"),
            ("TXT", "acme.test", "unverified"),
            ("TXT", "_dmarc.acme.test", "unverified"),
        ]
        assert records[2]["value"] == "v=spf1 a:postroom.test ~all"
        assert records[3]["value"].startswith("v=DMARC1; p=none; rua=mailto:")

        before = (await http.post("/v1/domains/acme.test/verify")).json()
        assert [r["status"] for r in before["records"]] == ["missing"] * 4
        assert before["verified"] is False

        # Publish the RSA key and SPF as printed; a stale ed25519 key; no DMARC.
        dns.add_txt(records[0]["name"], records[0]["value"])
        stale = dns_records(generate_keys("acme.test", "x", True, 0), "postroom.test")[1]
        dns.add_txt(records[1]["name"], stale.value)
        dns.add_txt("acme.test", "google-site-verification=abc")
        dns.add_txt("acme.test", records[2]["value"])
        after = (await http.post("/v1/domains/acme.test/verify")).json()
        assert [r["status"] for r in after["records"]] == ["ok", "wrong", "ok", "missing"]
        assert after["records"][1]["found"] == [stale.value]
        assert after["records"][2]["found"] == [records[2]["value"]]

        # The printed records are the keys that sign: mail from the domain verifies at the MX.
        dns.remove(records[1]["name"], "TXT")
        dns.add_txt(records[1]["name"], records[1]["value"])
        sent = await http.post("/v1/messages", json=send_body())
        assert sent.status_code == 202, sent.text
        [received] = await mx_sink.wait_for_messages(1)
        lookup = dns_lookup(dns)
        for index in range(2):
            assert dkim.DKIM(received.data).verify(idx=index, dnsfunc=lookup), index
        message = email.message_from_bytes(received.data, policy=default_policy)
        assert str(message["From"]) == "Acme Inc <app@acme.test>"  # the default sender name

        listed = (await http.get("/v1/domains")).json()["data"]
        assert [d["name"] for d in listed] == ["acme.test"]
        assert (await http.get("/v1/domains/acme.test")).json()["algorithm"] == "both"
        patched = await http.patch("/v1/domains/acme.test", json={"default_sender_name": None})
        assert patched.json()["default_sender_name"] is None
        again = await http.post("/v1/domains", json={"name": "acme.test"})
        assert again.status_code == 409
        bad = await http.post("/v1/domains", json={"name": "not a domain"})
        assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "name"
        assert (await http.delete("/v1/domains/acme.test")).status_code == 204
        assert (await http.get("/v1/domains/acme.test")).status_code == 404
        refused = await http.post("/v1/messages", json=send_body())
        assert refused.status_code == 422
        assert refused.json()["error"] == "domain_not_configured"


async def test_unconfigured_from_domain_is_refused_on_both_doors(start):
    postroom: Running = await start(smtp=TRUSTED, **STRICT)
    await postroom.spool.add_domain(generate_keys("acme.test", "s", False, 0))
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        refused = await http.post("/v1/messages", json=send_body("app@other.test"))
        assert refused.status_code == 422
        assert refused.json()["error"] == "domain_not_configured"
        assert refused.json()["details"][0]["field"] == "from"
        batch = await http.post(
            "/v1/messages/batch", json=[send_body(), send_body("App <a@Other.Test>")]
        )
        assert batch.status_code == 207
        assert batch.json()["data"][1]["error"] == "domain_not_configured"
    assert (await smtp_send(postroom.smtp_port, "cron@other.test")).startswith("550 5.7.1")
    assert (await smtp_send(postroom.smtp_port, "cron@acme.test")).startswith("250 ")
    messages = await postroom.spool.list_messages()
    assert len(messages) == 2  # the batch's acme.test item and the SMTP one; nothing else


INCLUDED = {
    "_spf.acme.test": ["v=spf1 ip4:192.0.2.0/24 ~all"],
    "_spf.other.test": ["v=spf1 a:mail.other.test -all"],
}


@pytest.mark.parametrize(
    ("found", "status", "detail"),
    [
        ([], RecordStatus.MISSING, ""),
        (["v=spf1 a:postroom.test ~all"], RecordStatus.OK, ""),
        (["v=spf1 +a:Postroom.Test/24 -all", "other"], RecordStatus.OK, ""),
        (["v=spf1 ip4:192.0.2.7 -all"], RecordStatus.OK, ""),
        (["v=spf1 a:notpostroom.test ~all"], RecordStatus.WRONG,
         "does not name postroom.test: check that a:notpostroom.test covers it"),
        (["v=spf1 a:postroom.test.evil.test ~all"], RecordStatus.WRONG, "does not name"),
        (["v=spf1 ip4:198.51.100.0/24 ~all"], RecordStatus.WRONG, "does not name"),
        (["v=spf1 -a:postroom.test ~all"], RecordStatus.WRONG, "does not name"),
        (["v=spf1 -all a:postroom.test"], RecordStatus.WRONG, "does not name"),
        (["v=spf1 include:_spf.acme.test -all"], RecordStatus.OK,
         "through include:_spf.acme.test (ip4:192.0.2.0/24)"),
        (["v=spf1 redirect=_spf.acme.test"], RecordStatus.OK,
         "through redirect=_spf.acme.test (ip4:192.0.2.0/24)"),
        (["v=spf1 include:_spf.other.test -all"], RecordStatus.WRONG, "does not name"),
        (["v=spf1 include:_spf.unasked.test mx -all"], RecordStatus.WRONG,
         "check that include:_spf.unasked.test, mx covers it"),
        (["v=spf1 a:postroom.test ~all", "v=spf1 -all"], RecordStatus.WRONG,
         "2 SPF records"),
    ],
)
def test_spf_judgement(found: list[str], status: RecordStatus, detail: str):
    expected = DnsRecord("TXT", "acme.test", "v=spf1 a:postroom.test ~all")
    judged = judge(expected, found, "postroom.test", ["192.0.2.7"], INCLUDED)
    assert judged.status is status
    assert detail in judged.detail


async def test_verify_tells_an_unanswered_lookup_from_a_missing_record(start, dns: DnsServer):
    postroom: Running = await start(**STRICT)
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        created = await http.post("/v1/domains", json={"name": "acme.test"})
        dkim_record, _, dmarc = created.json()["records"]
        dns.add_txt(dkim_record["name"], dkim_record["value"])
        # SPF through an include to this host's address; DMARC's name answers SERVFAIL.
        dns.add_a("postroom.test", "192.0.2.7")
        dns.add_txt("acme.test", "v=spf1 a:notpostroom.test include:_spf.acme.test -all")
        dns.add_txt("_spf.acme.test", "v=spf1 ip4:192.0.2.0/24 ~all")
        dns.set_servfail(dmarc["name"])
        checked = (await http.post("/v1/domains/acme.test/verify")).json()
        assert [r["status"] for r in checked["records"]] == ["ok", "ok", "unknown"]
        assert checked["verified"] is False
        assert "SERVFAIL" in checked["records"][2]["detail"]
        assert "include:_spf.acme.test" in checked["records"][1]["detail"]

        # The include no longer covers this host; DMARC answers and is not published.
        dns.remove("_spf.acme.test")
        dns.add_txt("_spf.acme.test", "v=spf1 ip4:198.51.100.0/24 ~all")
        dns.remove(dmarc["name"])
        checked = (await http.post("/v1/domains/acme.test/verify")).json()
        assert [r["status"] for r in checked["records"]] == ["ok", "wrong", "missing"]
        assert "does not name postroom.test" in checked["records"][1]["detail"]


def test_cli_domains_list_show_verify_remove(
    tmp_path: Path, dns: DnsServer, server_cert: tuple[Path, Path]
):
    config = write_config(tmp_path / "postroom.toml", settings_data(tmp_path, dns, 25, server_cert))
    postroom_cli(config, "init")
    added = json.loads(postroom_cli(
        config, "domains", "add", "acme.test", "--sender-name", "Acme", "--json"
    ).stdout)
    for record in added["records"][:1]:
        dns.add_txt(record["name"], record["value"])
    dns.set_servfail("_dmarc.acme.test")
    [listed] = json.loads(postroom_cli(config, "domains", "list", "--json").stdout)
    assert listed["default_sender_name"] == "Acme" and "PRIVATE" not in json.dumps(listed)
    shown = json.loads(postroom_cli(config, "domains", "show", "acme.test", "--json").stdout)
    assert shown["records"] == added["records"]
    verified = postroom_cli(config, "domains", "verify", "acme.test", "--json", check=False)
    assert verified.returncode == 1  # SPF is missing; DMARC could not be looked up
    statuses = [r["status"] for r in json.loads(verified.stdout)["records"]]
    assert statuses == ["ok", "missing", "unknown"]
    human = postroom_cli(config, "domains", "verify", "acme.test", check=False).stdout
    assert "acme.test. TXT" in human and "; missing" in human
    assert "_dmarc.acme.test. TXT" in human and "; unknown" in human and "SERVFAIL" in human
    assert "removed acme.test" in postroom_cli(config, "domains", "remove", "acme.test").stdout
    gone = postroom_cli(config, "domains", "show", "acme.test", check=False)
    assert gone.returncode == 1 and "no sending domain" in gone.stderr


async def test_a_changed_default_sender_name_is_used_at_once_or_within_a_second(
    postroom: Running, mx_sink: MxSink,
):
    """The service keeps a domain's default sender name for at most `api.lookup_cache_ttl`: a change
    through the API is used by the next send, one through a spool of its own (as the CLI
    writes) within that time."""
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        added = await http.post("/v1/domains", json={"name": "acme.test",
                                                     "default_sender_name": "Acme Inc"})
        assert added.status_code == 201, added.text
        assert (await http.post("/v1/messages", json=send_body())).status_code == 202
        patched = await http.patch("/v1/domains/acme.test",
                                   json={"default_sender_name": "Acme Billing"})
        assert patched.status_code == 200, patched.text
        assert (await http.post("/v1/messages", json=send_body())).status_code == 202
        other = await Spool.open(postroom.service.settings, readers=1)
        try:
            await other.set_default_sender_name("acme.test", "Acme Ops")
        finally:
            await other.close()
        await asyncio.sleep(postroom.service.settings.api.lookup_cache_ttl)
        assert (await http.post("/v1/messages", json=send_body())).status_code == 202
    received = await mx_sink.wait_for_messages(3)
    froms = [str(email.message_from_bytes(m.data, policy=default_policy)["From"])
             for m in received]
    assert sorted(froms) == sorted(["Acme Inc <app@acme.test>", "Acme Billing <app@acme.test>",
                                    "Acme Ops <app@acme.test>"])
