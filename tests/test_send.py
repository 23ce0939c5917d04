"""The full send surface over real HTTP: fields, composition at the MX sink, schedule, limits."""

from __future__ import annotations

import base64
import email
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy

from store import Scope
from tests.conftest import WITH_AND_WITHOUT_WORKERS, Running
from tests.support import DnsServer, MxSink, wait_until

SEND = {
    "from": '"Acme" <no-reply@acme.test>',
    "to": "user@example.test",
    "subject": "Your code",
    "text": "Your code is 1234.\n",
}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()

# With workers, the messages are validated and composed in them (api/messages.py `prepare_one`).
pytestmark = WITH_AND_WITHOUT_WORKERS


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


async def test_cc_and_bcc_are_envelope_recipients_and_bcc_is_not_a_header(
    postroom: Running, mx_sink: MxSink
):
    key = await postroom.new_key()
    body = {
        **SEND,
        "to": ["Ann <ann@example.test>", "bob@example.test"],
        "cc": "carl@example.test",
        "bcc": ["secret@example.test"],
        "reply_to": "help@acme.test",
        "headers": {"X-Campaign": "spring ☀", "List-Unsubscribe": "<mailto:u@acme.test>"},
        "html": '<p>Hi <img src="cid:logo"></p>',
        "attachments": [
            {"filename": "logo.png", "content": PNG, "content_id": "logo"},
            {"filename": "résumé.pdf", "content": base64.b64encode(b"%PDF").decode(),
             "content_type": "application/pdf"},
        ],
    }
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json=body)
    assert response.status_code == 202, response.text
    [received] = await mx_sink.wait_for_messages(1)
    assert sorted(received.rcpt_tos) == sorted(
        ["ann@example.test", "bob@example.test", "carl@example.test", "secret@example.test"]
    )
    assert b"secret@example.test" not in received.data
    parsed = parse(received.data)
    assert parsed["Bcc"] is None
    assert [a.addr_spec for a in parsed["To"].addresses] == ["ann@example.test", "bob@example.test"]
    assert parsed["Cc"].addresses[0].addr_spec == "carl@example.test"
    assert parsed["Reply-To"].addresses[0].addr_spec == "help@acme.test"
    assert parsed["X-Campaign"] == "spring ☀"
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed.get_body(("plain",)) is not None and parsed.get_body(("html",)) is not None
    related = [p for p in parsed.walk() if p.get_content_type() == "multipart/related"]
    assert len(related) == 1
    [image] = [p for p in parsed.walk() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == "<logo>" and image.get_content_disposition() == "inline"
    [pdf] = parsed.iter_attachments()
    assert pdf.get_filename() == "résumé.pdf" and pdf.get_content() == b"%PDF"
    assert all(line.endswith(b"\r") or not line for line in received.data.split(b"\n")[:-1])


async def test_idn_recipient_domain_is_punycode_in_the_envelope(
    postroom: Running, mx_sink: MxSink, dns: DnsServer
):
    dns.add_mx("xn--bcher-kva.test", "mx.example.test")
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={**SEND, "to": "Jürgen <jü@bücher.test>"})
        assert response.status_code == 422  # non-ASCII local part
        response = await http.post("/v1/messages", json={**SEND, "to": "Jürgen <j@bücher.test>"})
    assert response.status_code == 202, response.text
    [received] = await mx_sink.wait_for_messages(1)
    assert received.rcpt_tos == ["j@xn--bcher-kva.test"]
    assert parse(received.data)["To"].addresses[0].display_name == "Jürgen"


async def test_tags_metadata_type_and_priority_are_stored_and_in_events(
    postroom: Running, mx_sink: MxSink
):
    key = await postroom.new_key()
    body = {**SEND, "tags": ["welcome", {"name": "tier", "value": "gold"}],
            "metadata": {"user_id": "42"}, "message_type": "marketing", "priority": "high"}
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json=body)
        assert response.status_code == 202, response.text
        message_id = response.json()["id"]

        async def delivered() -> dict[str, object] | None:
            shown = (await http.get(f"/v1/messages/{message_id}")).json()
            return shown if shown["status"] == "delivered" else None

        shown = await wait_until(delivered, message="never delivered")
    assert shown["recipients"][0]["email"] == "user@example.test"
    for event in shown["events"]:
        assert event["data"]["tags"] == ["welcome", {"name": "tier", "value": "gold"}]
        assert event["data"]["metadata"] == {"user_id": "42"}
    [rcpt] = (await postroom.spool.get_message(message_id)).recipients
    assert rcpt.priority == 10


async def test_scheduled_message_waits_for_its_time(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    async with postroom.http(key) as http:
        response = await http.post(
            "/v1/messages", json={**SEND, "scheduled_at": at.isoformat().replace("+00:00", "Z")}
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "scheduled"
        message_id = response.json()["id"]
        shown = (await http.get(f"/v1/messages/{message_id}")).json()
    assert shown["status"] == "scheduled"
    assert [e["type"] for e in shown["events"]] == ["email.scheduled"]
    assert shown["events"][0]["data"]["scheduled_at"].endswith("Z")
    [received] = await mx_sink.wait_for_messages(1)
    # The sink saw it only once its time had come.
    assert time.time() >= at.timestamp()
    assert received.rcpt_tos == ["user@example.test"]


async def test_sender_domain_restricted_key(postroom: Running, mx_sink: MxSink):
    new = await postroom.spool.create_key("acme only", Scope.SEND, ["ACME.test"])
    async with postroom.http(new.secret) as http:
        ok = await http.post("/v1/messages", json=SEND)
        assert ok.status_code == 202, ok.text
        refused = await http.post("/v1/messages", json={**SEND, "from": "x@evil.test"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "sender_not_allowed"
    assert refused.json()["details"][0]["field"] == "from"
    assert len(await postroom.spool.list_messages()) == 1


async def test_recipient_domain_check(postroom: Running, dns: DnsServer):
    dns.add_null_mx("nullmx.test")
    dns.add_a("bare.test", "127.0.0.1")  # implicit MX: accepted
    dns.add_txt("nomail.test", "v=spf1 -all")  # exists, but no MX and no address
    dns.set_servfail("broken.test")  # DNS failure: let in
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        for to, status in [
            ("a@nullmx.test", 422), ("a@nomail.test", 422), ("a@no-such-domain.test", 422),
            ("a@bare.test", 202), ("a@broken.test", 202),
        ]:
            response = await http.post(
                "/v1/messages", json={**SEND, "to": ["ok@example.test", to]}
            )
            assert response.status_code == status, (to, response.text)
            if status == 422:
                payload = response.json()
                assert payload["error"] == "invalid_recipient"
                [detail] = payload["details"]
                assert detail["field"] == "to[1]" and to in detail["message"]
    assert len(await postroom.spool.list_messages()) == 2


async def test_recipient_domain_check_can_be_off(start):
    postroom = await start(api={"check_recipient_domains": False})
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        response = await http.post("/v1/messages", json={**SEND, "to": "a@no-such-domain.test"})
    assert response.status_code == 202


LONG_LOCAL = "x" * 65 + "@example.test"
LONG_ADDRESS = "x" * 10 + "@" + ".".join(["d" * 60] * 4) + ".test"  # 259 > 254
BAD = [
    ("wrong type for to", {**SEND, "to": 5}, 422, "validation_error", "to"),
    ("wrong type in list", {**SEND, "to": ["a@example.test", 7]}, 422, "validation_error", "to[1]"),
    ("subject number", {**SEND, "subject": 1}, 422, "validation_error", "subject"),
    ("from missing", {k: v for k, v in SEND.items() if k != "from"}, 422, "validation_error",
     "from"),
    ("no recipients", {**SEND, "to": []}, 422, "validation_error", "body"),
    ("CR in from", {**SEND, "from": "a@acme.test\r"}, 422, "validation_error", "from"),
    ("LF in to", {**SEND, "to": ["a@example.test\nBcc: x@y.test"]}, 422, "validation_error",
     "to[0]"),
    ("NUL in cc", {**SEND, "cc": "a\x00@example.test"}, 422, "validation_error", "cc[0]"),
    ("LF in bcc", {**SEND, "bcc": ["b@example.test", "c@example.test\n"]}, 422,
     "validation_error", "bcc[1]"),
    ("CR in reply_to", {**SEND, "reply_to": "r@acme.test\r"}, 422, "validation_error",
     "reply_to[0]"),
    ("LF in subject", {**SEND, "subject": "a\nb"}, 422, "validation_error", "subject"),
    ("NUL in text", {**SEND, "text": "a\x00b"}, 422, "validation_error", "text"),
    ("NUL in html", {**SEND, "html": "<p>\x00</p>"}, 422, "validation_error", "html"),
    ("LF in header value", {**SEND, "headers": {"X-A": "1\nBcc: x@y.test"}}, 422,
     "validation_error", "headers.X-A"),
    ("bad header name", {**SEND, "headers": {"X A": "1"}}, 422, "validation_error", "headers.X A"),
    ("owned header", {**SEND, "headers": {"bcc": "x@y.test"}}, 422, "validation_error",
     "headers.bcc"),
    ("content header", {**SEND, "headers": {"Content-Type": "text/x"}}, 422, "validation_error",
     "headers.Content-Type"),
    ("LF in filename", {**SEND, "attachments": [{"filename": "a\n.txt", "content": PNG}]}, 422,
     "validation_error", "attachments[0].filename"),
    ("bad base64", {**SEND, "attachments": [{"filename": "a.png", "content": "%%%"}]}, 422,
     "validation_error", "attachments[0].content"),
    ("bad content type", {**SEND, "attachments": [
        {"filename": "a.png", "content": PNG, "content_type": "image\r\n/png"}]}, 422,
     "validation_error", "attachments[0].content_type"),
    ("LF in content_id", {**SEND, "attachments": [
        {"filename": "a.png", "content": PNG, "content_id": "x\ny"}]}, 422,
     "validation_error", "attachments[0].content_id"),
    ("LF in tag", {**SEND, "tags": ["a\nb"]}, 422, "validation_error", "tags[0].name"),
    ("LF in tag value", {**SEND, "tags": [{"name": "a", "value": "b\r"}]}, 422,
     "validation_error", "tags[0].value"),
    ("nested metadata", {**SEND, "metadata": {"a": {"b": "c"}}}, 422, "validation_error",
     "metadata.a"),
    ("NUL in metadata", {**SEND, "metadata": {"a": "\x00"}}, 422, "validation_error",
     "metadata.a"),
    ("bad message_type", {**SEND, "message_type": "bulk"}, 422, "validation_error",
     "message_type"),
    ("bad priority", {**SEND, "priority": "urgent"}, 422, "validation_error", "priority"),
    ("past scheduled_at", {**SEND, "scheduled_at": "2001-01-01T00:00:00Z"}, 422,
     "validation_error", "scheduled_at"),
    ("naive scheduled_at", {**SEND, "scheduled_at": "2099-01-01T00:00:00"}, 422,
     "validation_error", "scheduled_at"),
    ("numeric scheduled_at", {**SEND, "scheduled_at": 4102444800}, 422, "validation_error",
     "scheduled_at"),
    ("overlong local part", {**SEND, "to": LONG_LOCAL}, 422, "validation_error", "to[0]"),
    ("overlong address", {**SEND, "to": LONG_ADDRESS}, 422, "validation_error", "to[0]"),
    ("too many in to", {**SEND, "to": [f"u{i}@example.test" for i in range(51)]}, 422,
     "validation_error", "to"),
    ("too many in all", {**SEND, "to": [f"u{i}@example.test" for i in range(50)],
                          "cc": [f"c{i}@example.test" for i in range(50)],
                          "bcc": "b@example.test"}, 422, "too_many_recipients", "to"),
    ("unknown field", {**SEND, "template": "x"}, 422, "validation_error", "template"),
    ("unknown attachment field", {**SEND, "attachments": [
        {"filename": "a", "content": PNG, "inline": True}]}, 422, "validation_error",
     "attachments[0].inline"),
    ("bad idempotency key", {**SEND, "idempotency_key": "\u00e9"}, 422, "validation_error",
     "idempotency_key"),
]


async def test_bad_input_matrix(postroom: Running):
    """Each bad input: its exact status, slug and field; nothing reaches the spool."""
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        for name, body, status, slug, field in BAD:
            response = await http.post("/v1/messages", json=body)
            assert response.status_code == status, (name, response.text)
            payload = response.json()
            assert payload["error"] == slug, (name, payload)
            assert payload["message"], name
            assert field in [d["field"] for d in payload["details"]], (name, payload)
            assert "Traceback" not in response.text
    assert await postroom.spool.list_messages() == []
