"""Delivery writes MAIL and RCPT paths of plain addresses itself (relay/transport.py
`PLAIN_ADDRESS`): the path must be the one aiosmtplib's own `quote_address` gives, for every
address the fast path takes."""

from __future__ import annotations

from aiosmtplib.email import quote_address
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.transport import PLAIN_ADDRESS


@settings(max_examples=500, deadline=None)
@given(st.from_regex(PLAIN_ADDRESS, fullmatch=True))
def test_a_plain_address_gets_the_path_aiosmtplib_would_send(address: str):
    assert f"<{address}>" == quote_address(address)


def test_what_is_not_plain_is_left_to_aiosmtplib():
    for address in ('"john doe"@example.test', "jürgen@bücher.test", "Ann <ann@example.test>",
                    "a..b@example.test", "user@-bad.test", "user@example.test "):
        assert PLAIN_ADDRESS.fullmatch(address) is None, address
