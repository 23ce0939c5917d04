"""DKIM: signatures on the bytes the MX received verify (dkimpy) against the test DNS server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.resolver
import pytest

from relay.dkim import (
    KeyRing,
    Signer,
    from_domain,
    generate_keys,
    headers_to_sign,
    is_fast_rsa_in_use,
    txt_records,
)
from store import DomainKeys, RecipientStatus, Source, Submission
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running, postroom_cli
from tests.support import DnsServer, MxSink, wait_until

HEADERS = (
    b"From: App <app@acme.test>\r\n"
    b"To: user@example.test\r\n"
    b"Subject: =?utf-8?q?h=C3=A9llo?=\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@acme.test>\r\n"
    b"List-Unsubscribe: <https://acme.test/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
)
# Bare LFs, a long line, leading dots (dot-stuffed on the wire) and 8-bit text.
BODY = (
    b"first line\nbare LF line\n" + b"x" * 900 + b"\n.leading dot\n..two dots\n.\n"
    + "h\u00e9llo w\u00f6rld \u2713\n".encode()
    + b"trailing spaces   \n\n\n"
)


def dns_lookup(server: DnsServer) -> Callable[..., bytes]:
    """dkimpy's `dnsfunc`, asking the test DNS server over the real protocol."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.port = server.port  # before nameservers (STYLE.md gotcha 19)
    resolver.nameservers = ["127.0.0.1"]

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def publish(server: DnsServer, keys: DomainKeys) -> None:
    for record in txt_records(keys):
        server.add_txt(record.name, record.value)


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    d = dkim.DKIM(message)
    return [
        dkim.util.parse_tag_value(value.replace(b"\r\n", b""))
        for name, value in d.headers
        if name.lower() == b"dkim-signature"
    ]


def test_the_fast_rsa_path_is_in_use():
    assert is_fast_rsa_in_use()


@pytest.mark.parametrize("both", [False, True], ids=["rsa", "rsa+ed25519"])
def test_signatures_verify_and_follow_policy(dns: DnsServer, both: bool):
    keys = generate_keys("acme.test", "s1", with_ed25519=both, now=0)
    publish(dns, keys)
    content = HEADERS + BODY.replace(b"\n", b"\r\n")
    signed = Signer(keys).sign(content)
    sigs = signatures(signed)
    assert [s[b"a"] for s in sigs] == ([b"ed25519-sha256"] if both else []) + [b"rsa-sha256"]
    for index, sig in enumerate(sigs):
        assert sig[b"c"] == b"relaxed/relaxed"
        assert b"l" not in sig
        signed_headers = re.split(rb"\s*:\s*", sig[b"h"])
        assert signed_headers.count(b"from") == 2  # over-signed
        assert b"list-unsubscribe" in signed_headers
        assert b"list-unsubscribe-post" in signed_headers
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=dns_lookup(dns))


def test_headers_to_sign_oversigns_every_identity_header_present_or_not():
    content = b"From: a@acme.test\r\nsubject: x\r\nX-Other: y\r\n\r\nbody\r\n"
    names = headers_to_sign(content)
    assert names[:2] == [b"from", b"subject"]  # as they occur; X-Other is not signed
    assert names.count(b"from") == 2 and names.count(b"subject") == 2
    assert b"reply-to" in names and b"sender" in names and b"cc" in names
    assert b"x-other" not in names


def test_an_identity_header_added_after_signing_breaks_the_signature(dns: DnsServer):
    keys = generate_keys("acme.test", "s1", with_ed25519=False, now=0)
    publish(dns, keys)
    signed = Signer(keys).sign(HEADERS + BODY.replace(b"\n", b"\r\n"))
    assert dkim.DKIM(signed).verify(dnsfunc=dns_lookup(dns))
    head, sep, body = signed.partition(b"\r\n\r\n")
    for added in (b"Reply-To: attacker@evil.test", b"Sender: attacker@evil.test",
                  b"Cc: victim@example.test"):
        assert added.split(b":")[0].lower() + b":" not in head.lower()
        forged = head + b"\r\n" + added + sep + body
        assert not dkim.DKIM(forged).verify(dnsfunc=dns_lookup(dns)), added


@pytest.mark.parametrize(
    ("content", "domain"),
    [
        (b"From: App <app@Acme.Test>\r\n\r\n", "acme.test"),
        (b"Subject: x\r\nfrom:\r\n \"Folded, Name\" <a@b.test>\r\n\r\n", "b.test"),
        (b"Subject: x\r\n\r\nFrom: body@not.header\r\n", None),
        (b"From: undisclosed\r\n\r\n", None),
    ],
)
def test_from_domain(content: bytes, domain: str | None):
    assert from_domain(content) == domain


async def test_keyring_caches_hits_and_misses():
    calls: list[str] = []
    keys = generate_keys("acme.test", "s1", with_ed25519=False, now=0)
    now = [0.0]

    async def lookup(name: str) -> DomainKeys | None:
        calls.append(name)
        return keys if name == "acme.test" else None

    ring = KeyRing(lookup, ttl=60, clock=lambda: now[0])
    assert await ring.signer_for(b"From: a@acme.test\r\n\r\n") is not None
    assert await ring.signer_for(b"From: a@other.test\r\n\r\n") is None
    assert await ring.signer_for(b"From: b@acme.test\r\n\r\n") is not None
    assert calls == ["acme.test", "other.test"]
    now[0] = 61.0
    await ring.signer_for(b"From: a@other.test\r\n\r\n")
    assert calls == ["acme.test", "other.test", "other.test"]


def test_private_keys_stay_out_of_reprs():
    keys = generate_keys("acme.test", "s1", with_ed25519=True, now=0)
    assert b"PRIVATE" in keys.rsa_key
    assert "PRIVATE" not in repr(keys) and str(keys.ed25519_key) not in repr(keys)


@WITH_AND_WITHOUT_WORKERS  # with workers, a worker signs
@pytest.mark.parametrize("both", [False, True], ids=["rsa", "rsa+ed25519"])
async def test_delivered_mail_verifies_against_dns(
    postroom: Running, mx_sink: MxSink, dns: DnsServer, both: bool
):
    keys = generate_keys("acme.test", "pr", with_ed25519=both, now=0)
    await postroom.spool.add_domain(keys)
    publish(dns, keys)
    accepted = await postroom.spool.accept(
        Submission("app@acme.test", ("user@example.test",), HEADERS + BODY, Source.API)
    )
    [received] = await mx_sink.wait_for_messages(1)
    sigs = signatures(received.data)
    assert len(sigs) == (2 if both else 1)
    lookup = dns_lookup(dns)
    for index in range(len(sigs)):
        assert dkim.DKIM(received.data).verify(idx=index, dnsfunc=lookup), index
    # What was signed is what was sent: the body arrived intact.
    assert received.data.endswith(BODY.replace(b"\n", b"\r\n"))

    async def delivered() -> bool:
        message = await postroom.spool.get_message(accepted.id)
        return message.recipients[0].status is RecipientStatus.DELIVERED

    await wait_until(delivered)


async def test_mail_from_a_domain_without_keys_goes_unsigned(postroom: Running, mx_sink: MxSink):
    await postroom.spool.accept(
        Submission("app@nokeys.test", ("user@example.test",),
                   b"From: app@nokeys.test\r\nSubject: x\r\n\r\nhi\r\n", Source.API)
    )
    [received] = await mx_sink.wait_for_messages(1)
    assert b"DKIM-Signature" not in received.data


def test_cli_domains_add_prints_the_records(tmp_path: Path):
    config = tmp_path / "postroom.toml"
    postroom_cli(config, "init", "--data-dir", "var")
    out = postroom_cli(config, "domains", "add", "Acme.Test.", "--selector", "s2",
                       "--algorithm", "both", "--json")
    data = json.loads(out.stdout)
    assert data["name"] == "acme.test"
    names = [(r["name"], r["value"].split(";")[1].strip()) for r in data["records"][:2]]
    assert names == [("s2._domainkey.acme.test", "k=rsa"),
                     ("s2-ed25519._domainkey.acme.test", "k=ed25519")]
    assert [r["name"] for r in data["records"][2:]] == ["acme.test", "_dmarc.acme.test"]
    assert "PRIVATE" not in out.stdout + out.stderr
    again = postroom_cli(config, "domains", "add", "acme.test", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = postroom_cli(config, "domains", "add", "not a domain", check=False)
    assert bad.returncode == 1 and "not a domain name" in bad.stderr
    bad = postroom_cli(config, "domains", "add", "b.test", "--algorithm", "ed25519", check=False)
    assert bad.returncode == 2  # never ed25519 alone
