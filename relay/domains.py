"""Sending domains: their keys, the DNS records to publish, and a live check of those records.

Owns what `postroom domains add|show|verify` and `/v1/domains` need beyond the spool: new DKIM
keys (relay/dkim.py makes them), the records to publish — the DKIM TXT record(s), an SPF
suggestion naming this host, a starter DMARC record (`p=none` with a report address) — and
`verify`, which looks each one up live through `delivery.dns_nameservers` (no cache) and judges
it ok, missing or wrong with what was found. Judging is pure (`judge`); dnspython's exceptions
stay here.
"""

from __future__ import annotations

import asyncio
import re

import dns.asyncresolver
import dns.exception
import dns.resolver

from config import Settings
from relay.dkim import generate_keys, txt_records
from relay.mx import build_resolver
from store import DnsRecord, DomainKeys, RecordStatus

_TAG = re.compile(r"\s*([A-Za-z0-9_]+)\s*=\s*([^;]*)")


def dns_records(keys: DomainKeys, hostname: str) -> list[DnsRecord]:
    """What the domain should publish: DKIM key(s), SPF for this host, a starter DMARC."""
    records = [DnsRecord("TXT", r.name, r.value) for r in txt_records(keys)]
    records.append(DnsRecord("TXT", keys.name, f"v=spf1 a:{hostname} ~all"))
    records.append(
        DnsRecord(
            "TXT", f"_dmarc.{keys.name}",
            f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{keys.name}",
        )
    )
    return records


def _tags(value: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2).strip() for m in _TAG.finditer(value)}


def _kind(record: DnsRecord) -> str:
    if "._domainkey." in record.name:
        return "dkim"
    if record.name.startswith("_dmarc."):
        return "dmarc"
    return "spf"


def judge(expected: DnsRecord, found: list[str], hostname: str) -> DnsRecord:
    """The expected record with its status, given the TXT strings found at its name.

    DKIM: ok when a record publishes the same public key (`p=`), else wrong. SPF: the one
    `v=spf1` record must name this host (or be the suggestion). DMARC: one `v=DMARC1` record,
    whatever its policy. No record of the kind at all is missing.
    """
    kind = _kind(expected)
    if kind == "dkim":
        relevant = [t for t in found if "p=" in t or t.lower().startswith("v=dkim1")]
        want = _tags(expected.value).get("p")
        ok = any(_tags(t).get("p", "").replace(" ", "") == want for t in relevant)
    elif kind == "spf":
        relevant = [t for t in found if t.lower().startswith("v=spf1")]
        ok = len(relevant) == 1 and (
            relevant[0] == expected.value or hostname.lower() in relevant[0].lower()
        )
    else:
        relevant = [t for t in found if t.lower().startswith("v=dmarc1")]
        ok = len(relevant) == 1
    if not relevant:
        status = RecordStatus.MISSING
    else:
        status = RecordStatus.OK if ok else RecordStatus.WRONG
    detail = ""
    if kind != "dkim" and len(relevant) > 1:
        detail = f"{len(relevant)} {kind.upper()} records: there must be one"
    elif status is RecordStatus.WRONG and kind == "spf":
        detail = f"the SPF record does not name {hostname}"
    elif status is RecordStatus.WRONG:
        detail = "a different key is published under this name"
    return DnsRecord(
        expected.type, expected.name, expected.value, status, tuple(relevant), detail
    )


class Domains:
    """Key generation, records and live verification for sending domains."""

    def __init__(self, settings: Settings) -> None:
        self._hostname = settings.server.hostname
        self._resolver = build_resolver(settings)
        self._resolver.cache = None  # a check must see what DNS says now

    @staticmethod
    def generate(name: str, selector: str, with_ed25519: bool, now: float) -> DomainKeys:
        """New keys (RSA-2048, and ed25519 with `with_ed25519`); CPU work: call in a thread."""
        return generate_keys(name, selector, with_ed25519, now)

    def records(self, keys: DomainKeys) -> list[DnsRecord]:
        return dns_records(keys, self._hostname)

    async def verify(self, keys: DomainKeys) -> list[DnsRecord]:
        """Each record looked up live and judged ok / missing / wrong."""
        expected = self.records(keys)
        lookups = await asyncio.gather(*(self._txt(r.name) for r in expected))
        results = []
        for record, (found, failure) in zip(expected, lookups, strict=True):
            if failure:
                results.append(
                    DnsRecord(record.type, record.name, record.value, RecordStatus.MISSING,
                              (), failure)
                )
            else:
                results.append(judge(record, found, self._hostname))
        return results

    async def _txt(self, name: str) -> tuple[list[str], str]:
        """The TXT strings at `name` (each record's strings joined), or a lookup failure."""
        try:
            answer = await self._resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], ""
        except dns.exception.Timeout:
            return [], "the DNS lookup timed out"
        except dns.exception.DNSException as exc:
            return [], f"the DNS lookup failed: {exc.__class__.__name__}"
        return [
            b"".join(rdata.strings).decode("utf-8", "replace")
            for rdata in answer
        ], ""
