"""MX resolution (RFC 5321 §5.1): a destination domain → the hosts to try, in order.

Owns the dnspython async resolver (built once at start-up, with a TTL-honouring cache, pointed at
`delivery.dns_nameservers` when set) and the translation of DNS results and errors into a `Route`:
hosts by preference, implicit MX on the domain's own A/AAAA, or a permanent/temporary failure as a
`Reply` the engine records. dnspython's exceptions never leave this module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from config import Settings
from store import Reply


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """Where to deliver a destination's mail, or why it cannot be delivered now."""

    hosts: tuple[MxHost, ...] = ()
    failure: Reply | None = None


def build_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """A resolver with a cache; the configured nameservers, else the system's."""
    servers = settings.delivery.nameserver_addresses
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*s) for s in servers]
    resolver.cache = dns.resolver.LRUCache(max_size=10_000)
    resolver.lifetime = settings.delivery.dns_timeout
    resolver.timeout = min(settings.delivery.dns_timeout, 2.0)
    return resolver


class MxResolver:
    """Resolve destinations to ordered hosts with addresses."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def route(self, domain: str) -> Route:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return Route(failure=Reply(550, "5.1.2", f"domain {domain} does not exist"))
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX records → the domain itself is the implicit MX.
            return await self._implicit(domain)
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.exception.DNSException):
            return Route(failure=Reply(451, "4.4.3", f"MX lookup for {domain} failed"))
        records = sorted(
            ((r.preference, random.random(), r.exchange.to_text().rstrip(".")) for r in answer),
        )
        if len(records) == 1 and records[0][2] in ("", "."):
            # RFC 7505 null MX: the domain accepts no mail.
            return Route(failure=Reply(556, "5.1.10", f"{domain} accepts no mail (null MX)"))
        hosts = []
        for _, _, name in records:
            if name in ("", "."):
                continue
            addresses = await self._addresses(name)
            if addresses:
                hosts.append(MxHost(name=name, addresses=addresses))
        if not hosts:
            return Route(failure=Reply(451, "4.4.3", f"no address for the MX hosts of {domain}"))
        return Route(hosts=tuple(hosts))

    async def _implicit(self, domain: str) -> Route:
        addresses = await self._addresses(domain)
        if not addresses:
            return Route(failure=Reply(550, "5.1.2", f"{domain} has no MX and no address"))
        return Route(hosts=(MxHost(name=domain, addresses=addresses),))

    async def _addresses(self, name: str) -> tuple[str, ...]:
        found: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
            except dns.exception.DNSException:
                continue
            found.extend(r.to_text() for r in answer)
        return tuple(found)
