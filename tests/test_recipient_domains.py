"""The recipient-domain verdict: a table of DNS outcomes, and caching against real DNS."""

from __future__ import annotations

import pytest

from api.recipient_domains import Lookup, RecipientDomains, decide
from tests.support import DnsServer

L = Lookup


@pytest.mark.parametrize(
    ("name", "mx", "address", "refused", "certain"),
    [
        ("mx found", L.FOUND, None, False, True),
        ("null mx", L.NULL_MX, None, True, True),
        ("no such domain", L.NXDOMAIN, None, True, True),
        ("mx lookup failed", L.ERROR, None, False, False),
        ("implicit mx", L.NONE, L.FOUND, False, True),
        ("no mx, no address", L.NONE, L.NONE, True, True),
        ("no mx, address lookup failed", L.NONE, L.ERROR, False, False),
    ],
)
def test_decide(name: str, mx: Lookup, address: Lookup | None, refused: bool, certain: bool):
    verdict = decide("d.test", mx, address)
    assert (verdict.refusal is not None) == refused, name
    assert verdict.is_certain == certain, name


async def test_verdicts_are_cached_and_bounded():
    now = [0.0]
    with DnsServer() as dns:
        dns.add_mx("a.test", "mx.a.test")
        domains = RecipientDomains(dns.resolver(), cache_size=2, clock=lambda: now[0])
        assert await domains.refusals(["a.test", "a.test", "gone.test"]) == {
            "gone.test": "gone.test does not exist"
        }
        asked = len(dns.queries)
        await domains.refusals(["a.test", "gone.test"])
        assert len(dns.queries) == asked  # served from the cache
        now[0] += 3600  # expired
        await domains.refusals(["a.test"])
        assert len(dns.queries) == asked + 1
