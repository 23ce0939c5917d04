"""Where webhook requests may go: URL rules, name resolution, and the address to connect to.

Owns the network-safety rule for outgoing webhook requests: only `http`/`https` URLs; the host
resolved with Postroom's own resolver (`delivery.dns_nameservers`, like MX lookups); loopback,
link-local, private, multicast and every other non-global address refused unless
`webhooks.allow_private_networks` is on. The caller connects to the address returned here, so the
address checked is the address used (a second lookup could be rebound). dnspython's exceptions
never leave this module.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from config import Settings, parse_address
from store import UrlRefusal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL and the address its requests are pinned to."""

    url: str
    scheme: str
    host: str  # as in the URL (no brackets), for Host and TLS SNI
    port: int
    address: IPAddress
    username: str | None = field(default=None, repr=False)  # from user:password@ in the URL
    password: str | None = field(default=None, repr=False)

    @property
    def pinned_url(self) -> str:
        """The URL with the host replaced by the checked address (credentials go in `auth`)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return SplitResult(parts.scheme, f"{host}:{self.port}", parts.path or "/", parts.query,
                           "").geturl()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, including the numeric IPv4 forms C libraries accept
    (`2130706433`, `127.1`, `0x7f.0.0.1`), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_V4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: not loopback, link-local, private, shared, multicast, …"""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def parse_url(url: str) -> SplitResult | UrlRefusal:
    """The URL's parts, or why it is not a usable webhook URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return UrlRefusal("webhook_url_invalid", "the URL cannot be parsed")
    if parts.scheme not in ("http", "https"):
        return UrlRefusal("webhook_url_invalid", "only http and https URLs are allowed")
    if not parts.hostname:
        return UrlRefusal("webhook_url_invalid", "the URL has no host")
    if port == 0:
        return UrlRefusal("webhook_url_invalid", "the URL's port is 0")
    return parts


def build_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """A resolver for webhook hosts: the configured nameservers, else the system's."""
    servers = settings.delivery.dns_nameservers
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*parse_address(s if ":" in s else f"{s}:53"))
            for s in servers
        ]
    resolver.cache = dns.resolver.LRUCache(max_size=1_000)
    resolver.lifetime = settings.delivery.dns_timeout
    resolver.timeout = min(settings.delivery.dns_timeout, 2.0)
    return resolver


class Egress:
    """Check webhook URLs and pick the address to connect to."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, allow_private: bool) -> None:
        self._resolver = resolver
        self.allow_private = allow_private

    async def target(self, url: str) -> Target | UrlRefusal:
        parts = parse_url(url)
        if isinstance(parts, UrlRefusal):
            return parts
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self._addresses(host)
        if isinstance(addresses, UrlRefusal):
            return addresses
        if not self.allow_private:
            # Every address must be public: a name with one private address among public
            # ones is refused too, since any of them may be the one used.
            for address in addresses:
                if not is_public(address):
                    return UrlRefusal(
                        "webhook_url_private",
                        f"{host} is (or resolves to) the non-public address {address}; set "
                        "webhooks.allow_private_networks = true to allow private networks",
                    )
        return Target(
            url=url, scheme=parts.scheme, host=host, port=port, address=addresses[0],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    async def _addresses(self, host: str) -> list[IPAddress] | UrlRefusal:
        literal = literal_address(host)
        if literal is not None:
            return [literal]
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):  # RFC 6761 §6.3
            return [ipaddress.IPv4Address("127.0.0.1")]
        found: list[IPAddress] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                return UrlRefusal("webhook_url_unresolvable", f"cannot resolve {host} now")
            found.extend(ipaddress.ip_address(r.to_text()) for r in answer)
        if not found:
            return UrlRefusal("webhook_url_unresolvable", f"{host} has no address")
        return found
