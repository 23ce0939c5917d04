"""MX resolution (RFC 5321 §5.1): a destination domain → the hosts to try, in order.

Owns the dnspython async resolver (built once at start-up, with a TTL-honouring cache, pointed at
`delivery.dns_nameservers` when set) and the translation of DNS results and errors into a `Route`:
hosts by preference (equal preferences shuffled), each with its IPv6 and IPv4 addresses
interleaved, implicit MX on the domain's own A/AAAA, null MX (RFC 7505), or a permanent/temporary
failure as a `Reply` the engine records; and `screen`, which refuses mail loops and (by policy)
private addresses; and `lookup`, the plain record lookups `postroom doctor` makes. dnspython's
exceptions never leave this module.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

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
        temporary = False
        for _, _, name in records:
            if name in ("", "."):
                continue
            addresses = await self._addresses(name)
            if addresses is None:
                temporary = True
            elif addresses:
                hosts.append(MxHost(name=name, addresses=addresses))
        if not hosts:
            if temporary:
                return Route(failure=Reply(451, "4.4.3", f"address lookup for the MX hosts of "
                                                         f"{domain} failed"))
            return Route(failure=Reply(451, "4.4.3", f"no address for the MX hosts of {domain}"))
        return Route(hosts=tuple(hosts))

    async def _implicit(self, domain: str) -> Route:
        addresses = await self._addresses(domain)
        if addresses is None:
            # A SERVFAIL or timeout says nothing about the domain: try again later.
            return Route(failure=Reply(451, "4.4.3", f"address lookup for {domain} failed"))
        if not addresses:
            return Route(failure=Reply(550, "5.1.2", f"{domain} has no MX and no address"))
        return Route(hosts=(MxHost(name=domain, addresses=addresses),))

    async def _addresses(self, name: str) -> tuple[str, ...] | None:
        """IPv6 and IPv4 addresses, interleaved so a failing family never blocks the other;
        None when a lookup failed temporarily and nothing was found."""
        found: dict[str, list[str]] = {"AAAA": [], "A": []}
        failed = False
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                failed = True
                continue
            found[rdtype].extend(r.to_text() for r in answer)
        if failed and not (found["AAAA"] or found["A"]):
            return None
        return interleave(found["AAAA"], found["A"])


def interleave(first: Sequence[str], second: Sequence[str]) -> tuple[str, ...]:
    """first[0], second[0], first[1], … : one address family's failure costs one try."""
    out: list[str] = []
    for pair in itertools.zip_longest(first, second):
        out.extend(a for a in pair if a is not None)
    return tuple(out)


def screen(
    route: Route,
    own_hostname: str,
    own_listeners: Collection[tuple[str, int]],
    port: int,
    allow_private: bool,
) -> Route:
    """Drop addresses policy forbids; a route that reaches Postroom itself is a mail loop.

    An MX named like us, or an address and port where our own SMTP listeners accept, would hand
    the message back to us: bounce `5.4.6` (RFC 3463) instead of looping. With `allow_private`
    false, private, loopback and link-local addresses are refused (`5.4.4`, unroutable).
    """
    if route.failure is not None:
        return route
    own = {(ip, p) for ip, p in own_listeners}
    wildcard_ports = {p for ip, p in own_listeners if ip in ("0.0.0.0", "::")}  # noqa: S104
    hosts: list[MxHost] = []
    for host in route.hosts:
        if host.name.lower() == own_hostname.lower():
            return Route(failure=Reply(554, "5.4.6", f"mail for {host.name} loops back to myself"))
        kept = []
        for address in host.addresses:
            ip = ipaddress.ip_address(address)
            if (address, port) in own or (port in wildcard_ports and ip.is_loopback):
                return Route(
                    failure=Reply(554, "5.4.6", f"mail for {host.name} loops back to myself")
                )
            if not allow_private and (ip.is_private or ip.is_loopback or ip.is_link_local):
                continue
            kept.append(address)
        if kept:
            hosts.append(MxHost(host.name, tuple(kept)))
    if not hosts:
        return Route(failure=Reply(550, "5.4.4", "every MX host has a private address"))
    return Route(hosts=tuple(hosts))


# -- plain lookups (postroom doctor) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """The records found for one question, or why no server answered it.

    `error` None means a server answered: `values` may then be empty (NXDOMAIN or no record of
    that type). TXT values are the record's strings joined (RFC 7208 §3.3); names lose the dot.
    """

    values: tuple[str, ...] = ()
    error: str | None = None


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> Lookup:
    """The `rdtype` records of `name`; PTR takes an IP address and asks its reverse name."""
    try:
        qname = dns.reversename.from_address(name) if rdtype == "PTR" else name
        answer = await resolver.resolve(qname, rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Lookup()
    except dns.exception.Timeout:
        return Lookup(error="timed out")
    except dns.resolver.NoNameservers:
        return Lookup(error="no nameserver answered (SERVFAIL or refused)")
    except dns.exception.DNSException as exc:
        return Lookup(error=f"lookup failed: {exc}")
    values = []
    for rdata in answer:
        if rdtype == "TXT":
            values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
        else:
            values.append(rdata.to_text().rstrip(".").lower())
    return Lookup(values=tuple(values))
