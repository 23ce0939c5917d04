"""Trace fields: the Received header, Message-ID/Date when missing, and EHLO names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from relay.trace import SessionFacts, header_fields, is_valid_helo, received_header, stamp

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
FACTS = SessionFacts(helo="client.test", client_ip="192.0.2.1")


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("client.test", True),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("bücher.test", True),
        ("evil.test\rX-Injected: yes", False),
        ("evil.test\nX-Injected: yes", False),
        ("evil\x00.test", False),
        ("evil\x7f.test", False),
        ("evil\t.test", False),
        ("two words", False),
        ("bad\udcff.test", False),  # a byte that is not UTF-8, as aiosmtpd decodes it
        ("a" * 256, False),
        ("", False),
    ],
)
def test_helo_names(name: str, valid: bool):
    assert is_valid_helo(name) is valid


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (FACTS, ["Received: from client.test ([192.0.2.1])",
                 "\tby relay.test (Postroom) with ESMTP",
                 "\tfor <a@example.test>; Fri, 02 Jan 2026 03:04:05 +0000"]),
        (SessionFacts(helo="c.test", client_ip="::1", tls_version="TLSv1.3",
                      tls_cipher="TLS_AES_256_GCM_SHA384", tls_bits=256, auth_key_id="key_1"),
         ["Received: from c.test ([IPv6:::1])",
          "\tby relay.test (Postroom) with ESMTPSA",
          "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))",
          "\t(authenticated with API key key_1)",
          "\tfor <a@example.test>; Fri, 02 Jan 2026 03:04:05 +0000"]),
        (SessionFacts(helo="c.test", client_ip="192.0.2.1", is_esmtp=False),
         ["Received: from c.test ([192.0.2.1])",
          "\tby relay.test (Postroom) with SMTP",
          "\tfor <a@example.test>; Fri, 02 Jan 2026 03:04:05 +0000"]),
        # Defence in depth: a name that got past the EHLO check still cannot break the header.
        (SessionFacts(helo="x\r\nBcc: y (z)", client_ip="192.0.2.1", auth_key_id="k"),
         ["Received: from x??Bcc:?y??z? ([192.0.2.1])",
          "\tby relay.test (Postroom) with ESMTPA",
          "\t(authenticated with API key k)",
          "\tfor <a@example.test>; Fri, 02 Jan 2026 03:04:05 +0000"]),
    ],
    ids=["plain", "tls+auth", "helo", "hostile-name"],
)
def test_received_header(facts: SessionFacts, expected: list[str]):
    header = received_header(facts, hostname="relay.test", recipients=["a@example.test"], now=NOW)
    assert header.split("\r\n") == expected


def test_received_names_no_recipient_when_there_are_several():
    header = received_header(
        FACTS, hostname="relay.test", recipients=["a@example.test", "b@example.test"], now=NOW
    )
    assert header.endswith("with ESMTP\r\n\t; Fri, 02 Jan 2026 03:04:05 +0000")
    assert "a@example.test" not in header


@pytest.mark.parametrize(
    ("content", "names", "end"),
    [
        (b"Subject: a\r\nDate: x\r\n\r\nbody\r\n", {"subject", "date"}, 21),
        (b"Subject: a\n folded\nMessage-ID: <m>\n\nbody", {"subject", "message-id"}, 35),
        (b"Subject: a\r\rbody", {"subject"}, 11),
        (b"just a body line\r\n", set(), 0),
        (b"\r\nbody after an empty header\r\n", set(), 0),
        (b"Subject: only headers", {"subject"}, 21),
        (b"", set(), 0),
    ],
    ids=["crlf", "lf-folded", "bare-cr", "no-header", "empty-header", "no-body", "empty"],
)
def test_header_fields(content: bytes, names: set[str], end: int):
    assert header_fields(content) == (names, end)


def stamped(content: bytes) -> bytes:
    return stamp(content, FACTS, hostname="relay.test", recipients=["a@example.test"], now=NOW,
                 message_id="<new@relay.test>")


def test_stamp_adds_message_id_and_date_when_missing():
    out = stamped(b"Subject: hi\r\n\r\nbody\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"Received: from client.test")
    assert b"\r\nMessage-ID: <new@relay.test>\r\n" in head
    assert b"\r\nDate: Fri, 02 Jan 2026 03:04:05 +0000\r\n" in head
    assert head.endswith(b"Subject: hi")
    assert body == b"body\r\n"


def test_stamp_keeps_the_senders_message_id_and_date():
    original = b"Message-Id: <theirs@app.test>\r\nDATE: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nb"
    out = stamped(original)
    assert out.endswith(original)
    assert b"<new@relay.test>" not in out and out.count(b"Date:") == 0


def test_stamp_puts_a_headerless_message_into_the_body():
    out = stamped(b"hello, no header here\r\n")
    assert out.endswith(b"\r\n\r\nhello, no header here\r\n")


def test_each_message_is_dated_with_its_own_second_and_zone():
    # The date text is made once a second (`date_text`): the next second, or the same instant
    # in another zone, must still be written as email.utils writes it.
    later = NOW.replace(second=6, microsecond=999_999)
    elsewhere = NOW.astimezone(timezone(timedelta(hours=-5)))
    dates = [
        stamp(b"Subject: x\r\n\r\nbody\r\n", FACTS, hostname="mx.test", recipients=["a@b.test"],
              now=now, message_id="<m@mx.test>").split(b"\r\nDate: ")[1].split(b"\r\n")[0]
        for now in (NOW, NOW.replace(microsecond=500_000), later, elsewhere, NOW)
    ]
    assert dates == [
        b"Fri, 02 Jan 2026 03:04:05 +0000",
        b"Fri, 02 Jan 2026 03:04:05 +0000",
        b"Fri, 02 Jan 2026 03:04:06 +0000",
        b"Thu, 01 Jan 2026 22:04:05 -0500",
        b"Fri, 02 Jan 2026 03:04:05 +0000",
    ]
