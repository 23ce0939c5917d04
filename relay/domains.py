"""Sending domains: their keys, the DNS records to publish, and a live check of those records.

Owns what `postroom domains add|show|verify` and `/v1/domains` need beyond the spool: new DKIM
keys (relay/dkim.py makes them), the records to publish — the DKIM TXT record(s), an SPF
suggestion naming this host, a starter DMARC record (`p=none` with a report address) — and
`verify`, which looks each one up live through `delivery.dns_nameservers` (no cache, relay/mx.py
asks) and judges it ok, missing or wrong with what was found, or unknown when DNS did not answer.
Judging is pure (`judge`, `spf_match`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from config import Settings
from relay.mx import build_resolver, lookup
from store import DnsRecord, DomainKeys, RecordStatus

_TAG = re.compile(r"\s*([A-Za-z0-9_]+)\s*=\s*([^;]*)")
#: RFC 7208 §4.6.4: a check follows at most 10 terms that need DNS; `verify` looks up at most
#: this many `include:` / `redirect=` targets.
SPF_LOOKUP_LIMIT = 10


def dns_records(keys: DomainKeys, hostname: str) -> list[DnsRecord]:
    """What the domain should publish: DKIM key(s), SPF for this host, a starter DMARC."""
    from relay.dkim import txt_records  # see `Domains.generate`

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


def spf_records(found: Sequence[str]) -> list[str]:
    """The SPF records among a name's TXT strings (RFC 7208 §4.5: `v=spf1`, then a space)."""
    return [t for t in found if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


@dataclass(frozen=True, slots=True)
class SpfTerm:
    """One term of an SPF record (RFC 7208 §4.6.1), lower-cased, its qualifier apart."""

    text: str  # as written, lower-cased
    qualifier: str  # "+", "-", "~" or "?"
    name: str  # the mechanism ("a", "ip4", "include", "all" …) or modifier ("redirect")
    value: str  # after ":" (mechanism) or "=" (modifier); "" when absent
    is_modifier: bool


def spf_terms(record: str) -> list[SpfTerm]:
    """The terms after `v=spf1`: modifiers are `name=value` with no ":" before the "="."""
    terms = []
    for text in record.lower().split()[1:]:
        name, sep, value = text.partition("=")
        if sep and ":" not in name and "/" not in name:
            terms.append(SpfTerm(text, "+", name, value, True))
            continue
        qualifier = text[0] if text[0] in "+-~?" else "+"
        name, _, value = text.lstrip("+-~?").partition(":")
        terms.append(SpfTerm(text, qualifier, name, value, False))
    return terms


def spf_targets(record: str) -> list[str]:
    """The domains a record's `include:` mechanisms and `redirect=` modifier point at."""
    return [
        t.value for t in spf_terms(record)
        if t.value and t.name == ("redirect" if t.is_modifier else "include")
    ]


@dataclass(frozen=True, slots=True)
class SpfMatch:
    """Which term of an SPF record lets this host send, or which terms were not judged."""

    term: str = ""  # the term naming the host, e.g. "a:mail.example.com"; "" when none does
    via: tuple[str, ...] = ()  # the include: / redirect= terms followed to reach it
    unchecked: tuple[str, ...] = ()  # terms that might cover the host: mx, exists, a:other…

    @property
    def is_match(self) -> bool:
        return bool(self.term)


def spf_match(
    domain: str,
    record: str,
    hostname: str,
    addresses: Sequence[str] = (),
    included: Mapping[str, Sequence[str]] | None = None,
    depth: int = 0,
) -> SpfMatch:
    """The first pass-qualified term of `record` (the SPF record of `domain`) naming this host.

    A term names the host when it is `a:HOST` (or a bare `a` at the host's own name), or
    `ip4:` / `ip6:` holding one of its `addresses`. `include:` and `redirect=` are followed
    through `included` (each target's TXT strings, as looked up) up to SPF_LOOKUP_LIMIT deep;
    terms after `all` are never reached (RFC 7208 §5.1). No SPF evaluation beyond that: `mx`,
    `exists`, `ptr` and `a:` of another name come back unchecked, for the operator to judge.
    """
    host = hostname.lower().rstrip(".")
    domain = domain.lower().rstrip(".")
    ips = [ipaddress.ip_address(a) for a in addresses]
    included = included or {}
    unchecked: list[str] = []
    redirect = ""
    for term in spf_terms(record):
        if term.is_modifier:
            redirect = term.value if term.name == "redirect" else redirect
            continue
        if term.name == "all":
            return SpfMatch(unchecked=tuple(unchecked))  # redirect= is ignored too (§6.1)
        if term.qualifier != "+":
            continue
        value = term.value
        if term.name == "a" and (value.partition("/")[0] or domain) == host:
            return SpfMatch(term.text)
        if term.name in ("ip4", "ip6") and value:
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                continue
            if any(ip.version == network.version and ip in network for ip in ips):
                return SpfMatch(term.text)
        elif term.name == "include" and value:
            found = _follow(value, hostname, addresses, included, depth)
            if found is None:
                unchecked.append(term.text)
            elif found.is_match:
                return SpfMatch(found.term, (term.text, *found.via))
            else:
                unchecked += found.unchecked
        elif term.name in ("a", "mx", "exists", "ptr"):
            unchecked.append(term.text)
    if redirect:
        found = _follow(redirect, hostname, addresses, included, depth)
        if found is None:
            unchecked.append(f"redirect={redirect}")
        elif found.is_match:
            return SpfMatch(found.term, (f"redirect={redirect}", *found.via))
        else:
            unchecked += found.unchecked
    return SpfMatch(unchecked=tuple(unchecked))


def _follow(
    target: str,
    hostname: str,
    addresses: Sequence[str],
    included: Mapping[str, Sequence[str]],
    depth: int,
) -> SpfMatch | None:
    """The match in the SPF record at `target` (an include or redirect); None when it was not
    looked up or the lookup limit is reached. A target without one SPF record matches nothing."""
    if target not in included or depth + 1 >= SPF_LOOKUP_LIMIT:
        return None
    records = spf_records(included[target])
    if len(records) != 1:
        return SpfMatch()
    return spf_match(target, records[0], hostname, addresses, included, depth + 1)


def judge(
    expected: DnsRecord,
    found: Sequence[str],
    hostname: str,
    addresses: Sequence[str] = (),
    included: Mapping[str, Sequence[str]] | None = None,
) -> DnsRecord:
    """The expected record with its status, given the TXT strings found at its name.

    DKIM: ok when a record publishes the same public key (`p=`), else wrong. SPF: the one
    `v=spf1` record must let this host send (`spf_match`, given the host's `addresses` and the
    `included` records). DMARC: one `v=DMARC1` record, whatever its policy. No record of the
    kind at all is missing.
    """
    kind = _kind(expected)
    detail = ""
    if kind == "dkim":
        relevant = [t for t in found if "p=" in t or t.lower().startswith("v=dkim1")]
        want = _tags(expected.value).get("p")
        ok = any(_tags(t).get("p", "").replace(" ", "") == want for t in relevant)
    elif kind == "spf":
        relevant = spf_records(found)
        match = SpfMatch()
        if len(relevant) == 1:
            match = spf_match(expected.name, relevant[0], hostname, addresses, included)
        ok = match.is_match
        if match.via:
            detail = f"names {hostname} through {' → '.join(match.via)} ({match.term})"
        elif len(relevant) == 1 and not ok:
            detail = f"the SPF record does not name {hostname}"
            if match.unchecked:
                detail += f": check that {', '.join(match.unchecked)} covers it"
    else:
        relevant = [t for t in found if t.lower().startswith("v=dmarc1")]
        ok = len(relevant) == 1
    if not relevant:
        status = RecordStatus.MISSING
    else:
        status = RecordStatus.OK if ok else RecordStatus.WRONG
    if kind != "dkim" and len(relevant) > 1:
        detail = f"{len(relevant)} {kind.upper()} records: there must be one"
    elif status is RecordStatus.WRONG and kind == "dkim":
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
        # relay.dkim is imported on first use: it loads `cryptography` and dkimpy (~10 MiB of
        # RSS), which a worker process serving the API needs only when a domain is added.
        from relay.dkim import generate_keys

        return generate_keys(name, selector, with_ed25519, now)

    def records(self, keys: DomainKeys) -> list[DnsRecord]:
        return dns_records(keys, self._hostname)

    async def verify(self, keys: DomainKeys) -> list[DnsRecord]:
        """Each record looked up live and judged ok / missing / wrong, or unknown when the
        lookup failed (timed out, SERVFAIL): "not published" and "could not ask" differ."""
        expected = self.records(keys)
        answers, addresses = await asyncio.gather(
            asyncio.gather(*(lookup(self._resolver, r.name, "TXT") for r in expected)),
            self._addresses(),
        )
        results = []
        for record, answer in zip(expected, answers, strict=True):
            if answer.error is not None:
                results.append(
                    DnsRecord(record.type, record.name, record.value, RecordStatus.UNKNOWN,
                              (), f"the DNS lookup failed: {answer.error}")
                )
                continue
            included = {}
            if _kind(record) == "spf":
                included = await self._spf_targets(answer.values)
            results.append(
                judge(record, answer.values, self._hostname, addresses, included)
            )
        return results

    async def _addresses(self) -> list[str]:
        """This host's addresses, for `ip4:` / `ip6:` terms (none when DNS has none)."""
        found = await asyncio.gather(
            lookup(self._resolver, self._hostname, "A"),
            lookup(self._resolver, self._hostname, "AAAA"),
        )
        return [address for answer in found for address in answer.values]

    async def _spf_targets(self, found: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The TXT strings at each `include:` / `redirect=` target, followed breadth first
        (at most SPF_LOOKUP_LIMIT names; a failed lookup counts as nothing found)."""
        included: dict[str, tuple[str, ...]] = {}
        pending = [t for r in spf_records(found) for t in spf_targets(r)]
        while pending and len(included) < SPF_LOOKUP_LIMIT:
            name = pending.pop(0)
            if name in included:
                continue
            answer = await lookup(self._resolver, name, "TXT")
            included[name] = answer.values
            pending += [t for r in spf_records(answer.values) for t in spf_targets(r)]
        return included
