"""One-click unsubscribe (RFC 8058) end to end: marketing mail carries signed List-Unsubscribe
headers with a per-recipient token; the POST suppresses that recipient for marketing mail, on the
API listener and on the public one (which serves nothing else); forged tokens change nothing."""

from __future__ import annotations

import base64
import email
import logging
import re
from email.policy import default as default_policy
from urllib.parse import urlsplit

import dkim
import httpx
import pytest

from relay.dkim import generate_keys
from relay.unsubscribe import add_headers
from store import EventFilter, EventType, SuppressionFilter, make_token, read_token
from tests.conftest import Running
from tests.support import DnsServer, MxSink
from tests.test_dkim import dns_lookup, publish, signatures

PUBLIC_URL = "https://mail.acme.test"


def header(data: bytes, name: str) -> str:
    value = email.message_from_bytes(data, policy=default_policy)[name]
    return "" if value is None else str(value)


def link_path(data: bytes) -> str:
    [url] = re.findall(r"<(https://[^>]+)>", header(data, "List-Unsubscribe"))
    assert url.startswith(PUBLIC_URL + "/unsubscribe/")
    return urlsplit(url).path


def forge(token: str) -> str:
    body, mac = token.split(".")
    flipped = "A" if mac[0] != "A" else "B"
    return f"{body}.{flipped}{mac[1:]}"


def test_tokens_bind_message_and_address():
    secret = b"k" * 32
    token = make_token(secret, "msg_1", "Ann@Example.test")
    assert read_token(secret, token) == ("msg_1", "ann@example.test")
    assert read_token(b"x" * 32, token) is None
    assert read_token(secret, forge(token)) is None
    other = make_token(secret, "msg_1", "bob@example.test")
    swapped = other.split(".")[0] + "." + token.split(".")[1]
    assert read_token(secret, swapped) is None
    assert read_token(secret, "garbage") is None and read_token(secret, "a.b.c") is None
    payload = base64.urlsafe_b64encode(b"msg_1").rstrip(b"=").decode()
    assert read_token(secret, payload + "." + token.split(".")[1]) is None


@pytest.mark.parametrize("present", [False, True])
def test_headers_are_added_once(present: bool):
    content = b"From: a@acme.test\r\n" + (
        b"List-Unsubscribe: <mailto:own@acme.test>\r\n" if present else b""
    ) + b"Subject: x\r\n\r\nbody\r\n"
    out = add_headers(content, "https://h.test/unsubscribe/t", "u@acme.test")
    if present:
        assert out == content
    else:
        assert out.startswith(
            b"List-Unsubscribe: <https://h.test/unsubscribe/t>,\r\n"
            b" <mailto:u@acme.test?subject=unsubscribe>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        )


async def test_one_click_unsubscribe_end_to_end(start, dns: DnsServer, mx_sink: MxSink):
    postroom: Running = await start(
        api={"public_url": PUBLIC_URL, "public_listen": "127.0.0.1:0"},
        policy={"allow_unconfigured_domains": False},
    )
    keys = generate_keys("acme.test", "pr", with_ed25519=False, now=0)
    await postroom.spool.add_domain(keys)
    publish(dns, keys)
    key = await postroom.new_key()
    base = {"from": "News <news@acme.test>", "subject": "Sale", "text": "50% off"}
    async with postroom.http(key) as http:
        marketing = await http.post("/v1/messages", json={
            **base, "to": ["a@example.test", "b@example.test"], "message_type": "marketing",
        })
        assert marketing.status_code == 202, marketing.text
        plain = await http.post("/v1/messages", json={**base, "to": "a@example.test"})
        assert plain.status_code == 202

    received = await mx_sink.wait_for_messages(3)
    copies = {r.rcpt_tos[0]: r.data for r in received if header(r.data, "List-Unsubscribe")}
    assert sorted(copies) == ["a@example.test", "b@example.test"]  # one transaction each
    [transactional] = [r.data for r in received if not header(r.data, "List-Unsubscribe")]
    assert header(transactional, "List-Unsubscribe-Post") == ""
    lookup = dns_lookup(dns)
    for data in copies.values():
        assert header(data, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        [sig] = signatures(data)
        signed = re.split(rb"\s*:\s*", sig[b"h"].strip())
        assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed
        assert dkim.DKIM(data).verify(dnsfunc=lookup)
    path_a, path_b = link_path(copies["a@example.test"]), link_path(copies["b@example.test"])
    assert path_a != path_b

    host, port = postroom.service.public_address or ("", 0)
    public = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10)
    async with public, postroom.http() as main:
        # The public listener serves the unsubscribe routes and nothing else.
        for path in ("/v1/messages/x", "/metrics", "/healthz", "/v1/domains"):
            assert (await public.get(path)).status_code == 404, path
        page = await public.get(path_a)
        assert page.status_code == 200 and 'method="post"' in page.text
        assert "a@example.test" in page.text
        assert (await main.get(path_b)).status_code == 200  # the API listener serves it too

        token_a, token_b = path_a.rsplit("/", 1)[1], path_b.rsplit("/", 1)[1]
        swapped = token_b.split(".")[0] + "." + token_a.split(".")[1]
        for bad in (forge(token_a), swapped, "nonsense"):
            refused = await public.post(f"/unsubscribe/{bad}",
                                        content=b"List-Unsubscribe=One-Click")
            assert refused.status_code == 404 and "not valid" in refused.text
        assert (await public.get(f"/unsubscribe/{forge(token_a)}")).status_code == 404
        assert await postroom.spool.list_suppressions(SuppressionFilter()) == []

        form = {"content-type": "application/x-www-form-urlencoded"}
        for _ in range(2):  # a second click changes nothing
            done = await public.post(path_a, content=b"List-Unsubscribe=One-Click",
                                     headers=form)
            assert done.status_code == 200 and "a@example.test" in done.text

    [entry] = await postroom.spool.list_suppressions(SuppressionFilter())
    assert (entry.email, entry.reason) == ("a@example.test", "unsubscribe")
    assert entry.message_id == marketing.json()["id"]
    [event] = await postroom.spool.list_events(EventFilter(type=EventType.EMAIL_UNSUBSCRIBED))
    assert event.recipient == "a@example.test"
    assert event.data["message_id"] == marketing.json()["id"]

    # Marketing mail to a is suppressed now; transactional mail still goes.
    async with postroom.http(key) as http:
        again = await http.post("/v1/messages", json={
            **base, "to": "a@example.test", "message_type": "marketing"})
        assert again.json()["status"] == "suppressed"
        receipt = await http.post("/v1/messages", json={**base, "to": "a@example.test"})
        assert receipt.json()["status"] == "queued"


async def test_an_unsubscribe_logs_one_line_once(start, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="store")
    postroom: Running = await start(api={"public_url": PUBLIC_URL})
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        sent = await http.post("/v1/messages", json={
            "from": "news@acme.test", "to": "Ann@example.test", "subject": "Sale",
            "text": "50% off", "message_type": "marketing"})
        assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    token = make_token(await postroom.spool.unsubscribe_secret(), message_id, "ann@example.test")
    async with postroom.http() as http:
        for _ in range(2):  # the second click adds nothing and logs nothing
            done = await http.post(f"/unsubscribe/{token}", content=b"List-Unsubscribe=One-Click")
            assert done.status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unsubscribed" in r.getMessage()]
    assert lines == [f"{message_id}: to=<ann@example.test> status=unsubscribed"]
    assert not [r for r in caplog.records if "action=added" in r.getMessage()]
    assert token not in caplog.text and token.split(".")[1] not in caplog.text
