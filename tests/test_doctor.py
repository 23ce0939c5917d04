"""`postroom doctor`: the pure judgements by table, then every check against real parts — the test
DNS server with a good and a broken domain, a serving Postroom on its ports, a port held by
something else, trustme and self-signed certificates, and spools with the right and wrong key."""

from __future__ import annotations

import asyncio
import base64
import datetime
import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner, Result

from config import Settings
from relay.cli import cli
from relay.commands.server import write_self_signed
from relay.dkim import generate_keys, txt_records
from relay.doctor import (
    Check,
    Listener,
    Probe,
    Status,
    judge_certificate,
    judge_dmarc,
    judge_hostname,
    judge_port,
    judge_spf,
    run_checks,
)
from relay.mx import Lookup
from store import Spool, migrate
from tests.conftest import Running, write_config
from tests.support import DnsServer

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
HOST = "postroom.test"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.check: c for c in checks}


# -- pure judgements ----------------------------------------------------------------------------

SMTP = Listener("smtp.listen", "127.0.0.1:2525", "smtp")


@pytest.mark.parametrize(
    ("error", "probe", "status", "words"),
    [
        (None, None, Status.OK, "can be bound"),
        (errno.EADDRINUSE, Probe(True, "greets '220 x Postroom ESMTP'"), Status.OK,
         "in use by Postroom"),
        (errno.EADDRINUSE, Probe(False, "greets '220 x Postfix'"), Status.FAIL,
         "in use by something else"),
        (errno.EADDRINUSE, None, Status.FAIL, "nothing answered"),
        (errno.EACCES, None, Status.WARN, "CAP_NET_BIND_SERVICE"),
        (errno.EADDRNOTAVAIL, None, Status.FAIL, "not on this host"),
    ],
    ids=["free", "postroom", "other", "silent", "privileged", "foreign-address"],
)
def test_judge_port(error: int | None, probe: Probe | None, status: Status, words: str):
    check = judge_port(SMTP, error, "reason", probe)
    assert check.status is status and words in check.detail
    assert check.check == "port smtp.listen 127.0.0.1:2525"


@pytest.mark.parametrize(
    ("record", "status", "words"),
    [
        ("v=spf1 a:postroom.test -all", Status.OK, "a:postroom.test"),
        ("v=spf1 ip4:192.0.2.0/24 -all", Status.OK, "ip4:192.0.2.0/24"),
        ("v=spf1 +ip6:2001:db8::/32 ~all", Status.OK, "ip6:2001:db8::/32"),
        ("v=spf1 ip4:198.51.100.1 -all", Status.WARN, "does not cover postroom.test"),
        ("v=spf1 include:_spf.mail.test mx -all", Status.WARN, "include:_spf.mail.test, mx"),
        ("-a:postroom.test v=spf1", Status.WARN, "no SPF record"),
        ("v=spf1 a:notpostroom.test -all", Status.WARN, "check that a:notpostroom.test"),
        ("v=spf1 -a:postroom.test ~all", Status.WARN, "does not cover postroom.test"),
        ("v=spf1 -all a:postroom.test", Status.WARN, "does not cover postroom.test"),
    ],
    ids=["a", "ip4", "ip6", "other-ip", "indirect", "not-spf", "other-name", "fail-qualified",
         "after-all"],
)
def test_judge_spf(record: str, status: Status, words: str):
    check = judge_spf("acme.test", HOST, ["192.0.2.7", "2001:db8::7"], Lookup((record,)))
    assert check.status is status and words in check.detail, check


def test_judge_spf_missing_double_and_unanswered():
    assert judge_spf("acme.test", HOST, [], Lookup()).status is Status.WARN
    two = Lookup(("v=spf1 -all", "v=spf1 a -all"))
    assert judge_spf("acme.test", HOST, [], two).status is Status.FAIL
    assert judge_spf("acme.test", HOST, [], Lookup(error="timed out")).status is Status.WARN


def test_judge_dmarc():
    assert judge_dmarc("a.test", Lookup(("v=DMARC1; p=reject; rua=mailto:x@a.test",))) == Check(
        "dmarc a.test", Status.OK, "_dmarc.a.test has a policy: p=reject"
    )
    assert judge_dmarc("a.test", Lookup(("something else",))).status is Status.WARN
    assert judge_dmarc("a.test", Lookup()).status is Status.WARN


@pytest.mark.parametrize(
    ("forward", "reverse", "statuses", "words"),
    [
        ([Lookup(("192.0.2.7",)), Lookup()], {"192.0.2.7": Lookup((HOST,))},
         (Status.OK, Status.OK), "every address's PTR names"),
        ([Lookup(("192.0.2.7",)), Lookup(("2001:db8::7",))],
         {"192.0.2.7": Lookup((HOST,)), "2001:db8::7": Lookup(("other.test",))},
         (Status.OK, Status.WARN), "2001:db8::7 has PTR other.test"),
        ([Lookup(("192.0.2.7",)), Lookup()], {"192.0.2.7": Lookup()},
         (Status.OK, Status.WARN), "192.0.2.7 has no PTR"),
        ([Lookup(), Lookup()], {}, (Status.WARN, Status.WARN), "no address to check"),
    ],
    ids=["fcrdns", "one-wrong", "no-ptr", "no-address"],
)
def test_judge_hostname(
    forward: list[Lookup], reverse: dict[str, Lookup], statuses: tuple[Status, Status],
    words: str,
):
    address, ptr = judge_hostname(HOST, forward, reverse)
    assert (address.status, ptr.status) == statuses
    assert words in ptr.detail


# -- certificates -------------------------------------------------------------------------------


def issued(ca: trustme.CA, *names: str) -> tuple[bytes, bytes, datetime.datetime]:
    from cryptography import x509

    cert = ca.issue_cert(*names)
    pem = cert.cert_chain_pems[0].bytes()
    after = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    return pem, cert.private_key_pem.bytes(), after


def test_certificate_from_a_ca(ca: trustme.CA):
    cert, key, after = issued(ca, HOST)
    now = after - datetime.timedelta(days=100)
    checks = by_name(judge_certificate(cert, key, HOST, now))
    assert all(c.status is Status.OK for c in checks.values()), checks
    assert "100 days" in checks["certificate expiry"].detail
    assert checks["certificate hostname"].detail == f"names {HOST}"


@pytest.mark.parametrize(
    ("days_left", "status", "words"),
    [(30, Status.OK, "valid until"), (10, Status.WARN, "expires in 10 day(s)"),
     (-1, Status.FAIL, "expired on")],
    ids=["fine", "near-expiry", "expired"],
)
def test_certificate_expiry(ca: trustme.CA, days_left: int, status: Status, words: str):
    cert, key, after = issued(ca, HOST)
    now = after - datetime.timedelta(days=days_left, hours=1)
    expiry = by_name(judge_certificate(cert, key, HOST, now))["certificate expiry"]
    assert expiry.status is status and words in expiry.detail


def test_certificate_wrong_name_wrong_key_and_self_signed(ca: trustme.CA, tmp_path: Path):
    cert, key, after = issued(ca, "*.other.test")
    now = after - datetime.timedelta(days=100)
    checks = by_name(judge_certificate(cert, key, "mail.other.test", now))
    assert checks["certificate hostname"].status is Status.OK  # one-label wildcard
    name = by_name(judge_certificate(cert, key, HOST, now))["certificate hostname"]
    assert name.status is Status.WARN and "*.other.test" in name.detail
    _, other_key, _ = issued(ca, HOST)
    mismatch = judge_certificate(cert, other_key, HOST, now)
    assert mismatch == [Check("certificate", Status.FAIL, "the key does not match the certificate")]
    assert judge_certificate(b"junk", key, HOST, now)[0].status is Status.FAIL

    write_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", HOST)
    own = by_name(judge_certificate(
        (tmp_path / "c.pem").read_bytes(), (tmp_path / "k.pem").read_bytes(), HOST,
        datetime.datetime.now(datetime.UTC),
    ))
    assert own["certificate"].status is Status.OK
    assert own["certificate issuer"].status is Status.WARN
    assert "self-signed" in own["certificate issuer"].detail
    assert own["certificate hostname"].status is Status.OK


# -- against real parts -------------------------------------------------------------------------


def publish(dns: DnsServer, domain: str, keys_value: list[tuple[str, str]]) -> None:
    for name, value in keys_value:
        dns.add_txt(name, value)
    dns.add_txt(domain, "v=spf1 a:postroom.test -all")
    dns.add_txt(f"_dmarc.{domain}", "v=DMARC1; p=quarantine")


async def hold_port(answer: bytes) -> asyncio.Server:
    """Something that is not Postroom on a port: it says `answer` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def test_doctor_with_a_serving_postroom_a_good_and_a_broken_domain(
    start: Any, dns: DnsServer, make_settings: Callable[..., Settings]
):
    running: Running = await start(smtp={"tls_listen": ["127.0.0.1:0"]})
    dns.add_a(HOST, "127.0.0.1")
    dns.add_ptr("127.0.0.1", HOST)
    good = generate_keys("good.test", "postroom", True, time.time())
    broken = generate_keys("broken.test", "postroom", False, time.time())
    stale = generate_keys("broken.test", "postroom", False, time.time())  # not the stored key
    await running.spool.add_domain(good)
    await running.spool.add_domain(broken)
    publish(dns, "good.test", [(r.name, r.value) for r in txt_records(good)])
    dns.add_txt(txt_records(stale)[0].name, txt_records(stale)[0].value)
    dns.add_txt("broken.test", "v=spf1 ip4:198.51.100.1 -all")
    api_host, api_port = running.service.api_address or ("", 0)

    settings = make_settings(
        smtp={"listen": [f"127.0.0.1:{running.smtp_port}"],
              "tls_listen": [f"127.0.0.1:{running.smtps_port}"]},
        api={"listen": f"{api_host}:{api_port}"},
    )
    checks = by_name(await run_checks(settings))

    for setting, port in (("smtp.listen", running.smtp_port),
                          ("smtp.tls_listen", running.smtps_port),
                          ("api.listen", api_port)):
        port_check = checks[f"port {setting} 127.0.0.1:{port}"]
        assert port_check.status is Status.OK, port_check
        assert port_check.detail.startswith("in use by Postroom"), port_check
    assert checks["port api.listen " + f"127.0.0.1:{api_port}"].detail.endswith("(ready)")
    expected_ok = [
        "config", "certificate", "certificate expiry", "certificate issuer",
        "certificate hostname", "spool", "spool schema", "spool integrity", "spool encryption",
        "dns resolver", "hostname address", "hostname ptr", "dkim good.test", "spf good.test",
        "dmarc good.test",
    ]
    assert {n: checks[n].status for n in expected_ok} == dict.fromkeys(expected_ok, Status.OK)
    assert "postroom-ed25519._domainkey.good.test" in checks["dkim good.test"].detail
    assert checks["dkim broken.test"].status is Status.FAIL
    assert "is not the stored key" in checks["dkim broken.test"].detail
    assert checks["spf broken.test"].status is Status.WARN
    assert checks["dmarc broken.test"].status is Status.WARN

    # A port held by something else is a failure.
    smtp_other = await hold_port(b"220 mail.other.test ESMTP Postfix\r\n")
    api_other = await hold_port(b"")
    smtp_port, other_api_port = port_of(smtp_other), port_of(api_other)
    try:
        busy = make_settings(
            smtp={"listen": [f"127.0.0.1:{smtp_port}"]},
            api={"listen": f"127.0.0.1:{other_api_port}"},
        )
        found = by_name(await run_checks(busy))
    finally:
        for server in (smtp_other, api_other):
            server.close()
            await server.wait_closed()
    smtp_check = found[f"port smtp.listen 127.0.0.1:{smtp_port}"]
    assert smtp_check.status is Status.FAIL and "Postfix" in smtp_check.detail
    api_check = found[f"port api.listen 127.0.0.1:{other_api_port}"]
    assert api_check.status is Status.FAIL and "in use by something else" in api_check.detail


async def test_doctor_cli_json_and_exit_codes(tmp_path: Path, dns: DnsServer):
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "postroom.toml", {
        "server": {"data_dir": str(data_dir), "hostname": HOST},
        "smtp": {"listen": ["127.0.0.1:0"]},
        "api": {"listen": "127.0.0.1:0"},
        "delivery": {"dns_nameservers": [f"127.0.0.1:{dns.port}"], "dns_timeout": "2s"},
    })

    async def doctor(path: Path) -> Result:
        return await asyncio.to_thread(
            CliRunner().invoke, cli, ["--config", str(path), "doctor", "--json"], obj={}
        )

    missing = await doctor(config)  # no spool yet, no certificate
    assert missing.exit_code == 1, missing.output
    rows = json.loads(missing.stdout)
    assert all(set(r) == {"check", "status", "detail"} for r in rows)
    found = {r["check"]: r for r in rows}
    assert found["spool"]["status"] == "fail" and "postroom init" in found["spool"]["detail"]
    assert found["certificate"]["status"] == "warn"
    assert found["hostname address"]["status"] == "warn"

    assert (await asyncio.to_thread(
        CliRunner().invoke, cli, ["--config", str(config), "init"], obj={}
    )).exit_code == 0
    dns.add_a(HOST, "127.0.0.1")
    healthy = await doctor(config)
    assert healthy.exit_code == 0, healthy.output
    human = await asyncio.to_thread(
        CliRunner().invoke, cli, ["--config", str(config), "doctor"], obj={}
    )
    assert human.exit_code == 0
    assert "warn  certificate issuer" in human.stdout and "0 fail" in human.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nlisten = 25\n")
    refused = await doctor(bad)
    assert refused.exit_code == 2
    [row] = json.loads(refused.stdout)
    assert row["check"] == "config" and row["status"] == "fail"
    assert "smtp.listen" in row["detail"]


async def test_doctor_spool_encryption_key(
    make_settings: Callable[..., Settings], dns: DnsServer
):
    def key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    right = key()
    spool = await Spool.open(make_settings(storage={"encryption_key": right}), readers=1)
    await spool.add_domain(generate_keys("acme.test", "postroom", False, time.time()))
    await spool.close()

    checks = by_name(await run_checks(make_settings(storage={"encryption_key": right})))
    assert checks["spool encryption"].status is Status.OK
    assert "encrypted at rest" in checks["spool encryption"].detail
    assert checks["dkim acme.test"].status is Status.FAIL  # opened with the key; unpublished

    wrong = by_name(await run_checks(make_settings(storage={"encryption_key": key()})))
    assert wrong["spool encryption"].status is Status.FAIL
    assert "not the key this spool was encrypted with" in wrong["spool encryption"].detail
    assert "dkim acme.test" not in wrong
    assert by_name(await run_checks(make_settings()))["spool encryption"].status is Status.FAIL


async def test_doctor_leaves_an_old_spool_alone(make_settings: Callable[..., Settings]):
    settings = make_settings()
    applied = migrate(settings.spool_path)
    with sqlite3.connect(settings.spool_path) as conn:
        conn.execute("DELETE FROM schema_version WHERE version = (SELECT max(version) FROM "
                     "schema_version)")
    checks = by_name(await run_checks(settings))
    assert checks["spool schema"].status is Status.WARN
    assert "postroom db migrate" in checks["spool schema"].detail
    with sqlite3.connect(settings.spool_path) as conn:  # doctor migrated nothing
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(applied) - 1
