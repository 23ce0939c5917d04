"""The recipient-domain check: refuse mail to domains that cannot receive any, before storing it.

Owns asking DNS, at request time, whether a recipient's domain can take mail: an MX (unless it is
the RFC 7505 null MX), or else an A/AAAA record (the implicit MX of RFC 5321 §5.1). A domain with
neither, or one that does not exist, is refused; a DNS failure or timeout is not a verdict and
lets the message in (delivery will retry). Verdicts are cached, concurrent lookups of one domain
share one query, and dnspython's exceptions never leave this module.

It asks the servers delivery asks (`delivery.dns_nameservers`, read through the shared
`DeliverySettings.nameserver_addresses`) with its own resolver: the API does not import the relay.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from config import Settings


class Lookup(Enum):
    """The outcome of one DNS question, reduced to what the verdict needs."""

    FOUND = "found"
    NONE = "none"  # NOERROR without an answer (NODATA)
    NXDOMAIN = "nxdomain"
    NULL_MX = "null_mx"
    ERROR = "error"  # SERVFAIL, timeout, no server answered


@dataclass(frozen=True, slots=True)
class Verdict:
    """None: the domain may receive mail (or we could not tell); else why it cannot."""

    refusal: str | None
    is_certain: bool


# How long verdicts are remembered: firm answers for a while, DNS failures only briefly.
_CERTAIN_TTL = 300.0
_UNCERTAIN_TTL = 30.0


def decide(domain: str, mx: Lookup, address: Lookup | None = None) -> Verdict:
    """The verdict from the MX lookup and, where it is needed, the A/AAAA lookups' outcome."""
    if mx is Lookup.FOUND:
        return Verdict(None, True)
    if mx is Lookup.NULL_MX:
        return Verdict(f"{domain} accepts no mail (null MX)", True)
    if mx is Lookup.NXDOMAIN:
        return Verdict(f"{domain} does not exist", True)
    if mx is Lookup.ERROR:
        return Verdict(None, False)
    if address is Lookup.FOUND:
        return Verdict(None, True)
    if address is Lookup.ERROR or address is None:
        return Verdict(None, False)
    return Verdict(f"{domain} has no MX and no A/AAAA record", True)


def build_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """A resolver asking delivery's DNS servers (the system's when none are configured)."""
    servers = settings.delivery.nameserver_addresses
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*s) for s in servers]
    resolver.cache = dns.resolver.LRUCache(max_size=settings.api.recipient_domain_cache_size)
    resolver.lifetime = settings.delivery.dns_timeout
    resolver.timeout = min(settings.delivery.dns_timeout, 2.0)
    return resolver


class RecipientDomains:
    """Checks recipient domains, caching verdicts (bounded, expiring) and sharing lookups."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        cache_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._cache: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock
        self._pending: dict[str, asyncio.Future[Verdict]] = {}
        self._slots = asyncio.Semaphore(32)

    async def refusals(self, domains: Iterable[str]) -> dict[str, str]:
        """For each domain that cannot receive mail, why not."""
        unique = list(dict.fromkeys(domains))
        verdicts = await asyncio.gather(*(self.check(d) for d in unique))
        return {d: v.refusal for d, v in zip(unique, verdicts, strict=True) if v.refusal}

    async def check(self, domain: str) -> Verdict:
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(domain)
            return cached[1]
        pending = self._pending.get(domain)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._pending[domain] = future
        try:
            verdict = await self._lookup(domain)
            future.set_result(verdict)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._pending[domain]
        ttl = _CERTAIN_TTL if verdict.is_certain else _UNCERTAIN_TTL
        self._cache[domain] = (self._clock() + ttl, verdict)
        self._cache.move_to_end(domain)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return verdict

    async def _lookup(self, domain: str) -> Verdict:
        async with self._slots:
            mx = await self._ask_mx(domain)
            if mx is not Lookup.NONE:
                return decide(domain, mx)
            found = [await self._ask(domain, rdtype) for rdtype in ("A", "AAAA")]
        if Lookup.FOUND in found:
            address = Lookup.FOUND
        elif Lookup.ERROR in found:
            address = Lookup.ERROR
        else:
            address = Lookup.NONE
        return decide(domain, mx, address)

    async def _ask_mx(self, domain: str) -> Lookup:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return Lookup.NXDOMAIN
        except dns.resolver.NoAnswer:
            return Lookup.NONE
        except dns.exception.DNSException:
            return Lookup.ERROR
        exchanges = [r.exchange.to_text().rstrip(".") for r in answer]
        if exchanges == [""]:
            return Lookup.NULL_MX
        return Lookup.FOUND

    async def _ask(self, domain: str, rdtype: str) -> Lookup:
        try:
            await self._resolver.resolve(domain, rdtype)
        except dns.resolver.NXDOMAIN:
            return Lookup.NXDOMAIN
        except dns.resolver.NoAnswer:
            return Lookup.NONE
        except dns.exception.DNSException:
            return Lookup.ERROR
        return Lookup.FOUND
