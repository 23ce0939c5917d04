"""Intake's header reader finds the fields the email package's header parser finds."""

from __future__ import annotations

from email.parser import BytesHeaderParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.headers import DEFAULT_POLICY, read_fields

_PARSER = BytesHeaderParser(policy=DEFAULT_POLICY)
_NAMES = ("From", "Sender", "Subject", "To")

PROPERTY = settings(
    max_examples=300, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

names = st.sampled_from(
    ["From", "from", "FROM", "Sender", "Subject", "subject", "To", "X-Other", "From ", ""]
)
values = st.one_of(
    st.sampled_from([
        "a@acme.test", '"Acme, Inc." <billing@acme.test>', "=?utf-8?q?Gr=C3=BC=C3=9Fe?=",
        "  padded\tvalue  ", "", "bob@", "<>", "Undisclosed recipients:;", "a@b.test, c@d.test",
    ]),
    st.text(st.characters(codec="utf-8", blacklist_characters="\r\n"), max_size=40),
)
lines = st.one_of(
    st.tuples(names, values).map(lambda nv: f"{nv[0]}:{nv[1]}"),
    st.tuples(names, values).map(lambda nv: f"{nv[0]}: {nv[1]}"),
    values.map(lambda v: " " + v),  # a continuation line
    values.map(lambda v: "\t" + v),
    st.sampled_from(["From sender@acme.test Mon Jan  1 00:00:00 2024", "no colon here", ":x"]),
)


def _outcome(read):
    """What reading a field gives: its text, or the exception the email package raised (it
    raises for some malformed addresses, and must raise the same for both)."""
    try:
        return read()
    except Exception as exc:
        return type(exc)


def _seen(fields, name):
    return _outcome(lambda: [(h.name, str(h)) for h in fields.get_all(name) or []])


def _first(fields, name):
    return _outcome(lambda: None if fields[name] is None else str(fields[name]))


@PROPERTY
@given(st.lists(lines, max_size=8), st.booleans())
def test_the_fields_read_are_the_parsers(header_lines: list[str], with_body: bool):
    block = "".join(line + "\r\n" for line in header_lines).encode("utf-8")
    if with_body:
        block += b"\r\nbody line\r\n"
    parsed = _PARSER.parsebytes(block, headersonly=True)
    read = read_fields(block, _NAMES)
    for name in _NAMES:
        assert _seen(read, name) == _seen(parsed, name), name
        expected = _first(parsed, name)
        assert _first(read, name) == expected, name
        assert _outcome(lambda n=name: read.text(n)) == ("" if expected is None else expected)


def test_only_the_fields_asked_for_are_kept():
    block = b"From: a@acme.test\r\nSubject: hi\r\nX-Big: " + b"x" * 500 + b"\r\n\r\n"
    read = read_fields(block, ["Subject"])
    assert read["From"] is None
    assert read.text("Subject") == "hi"
    assert read.get_all("X-Big") is None


def test_a_folded_subject_is_unfolded():
    block = b"Subject: a long\r\n subject\r\n\tfolded\r\nFrom: a@acme.test\r\n\r\nbody"
    read = read_fields(block, ["Subject", "From"])
    assert read.text("Subject") == "a long subject\tfolded"
    assert [a.addr_spec for a in read["From"].addresses] == ["a@acme.test"]
