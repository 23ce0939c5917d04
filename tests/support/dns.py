"""Authoritative test DNS server (UDP and TCP on one loopback port), built on dnslib.

Owns `DnsServer`: an in-memory zone that tests mutate while it runs. It serves from its own
threads, so it keeps answering even while the test's event loop is blocked.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

import dns.asyncresolver
import dns.reversename
from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RD, RR, TXT, A, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, TCPServer, UDPServer

log = logging.getLogger(__name__)

_UDP_LIMIT = 512  # RFC 1035 limit without EDNS; larger replies set TC so clients retry on TCP


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class _Handler(DNSHandler):
    """dnslib's handler, plus UDP truncation honouring the client's EDNS payload size."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply: DNSRecord = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp":
            opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
            limit = max(_UDP_LIMIT, opt[0].rclass) if opt else _UDP_LIMIT
            if len(packed) > limit:
                # Keep the question (dnslib's truncate() drops it, which resolvers reject).
                reply.rr, reply.auth, reply.ar = [], [], []
                reply.header.tc = 1
                packed = reply.pack()
        return packed


class DnsServer:
    """Authoritative DNS server on 127.0.0.1, UDP and TCP on the same (ephemeral) port.

    Names are case-insensitive and trailing-dot tolerant. Unknown names answer NXDOMAIN; a name
    that exists (or has names below it) but lacks the asked type answers NOERROR/NODATA.
    `queries` lists every question received as (normalised qname, qtype) e.g. ("a.test", "MX").
    """

    def __init__(self) -> None:
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, list[RR]] = {}
        self._servfail: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[UDPServer | TCPServer] = []
        self._threads: list[threading.Thread] = []

    # -- zone mutation (thread-safe, allowed while running) -----------------------------------

    def _add(self, name: str, rtype: int, rdata: RD, ttl: int) -> None:
        rr = RR(_norm(name) + ".", rtype, rdata=rdata, ttl=ttl)
        with self._lock:
            self._records.setdefault(_norm(name), []).append(rr)

    def add_mx(self, domain: str, host: str, preference: int = 10, ttl: int = 60) -> None:
        self._add(domain, QTYPE.MX, MX(host, preference), ttl)

    def add_null_mx(self, domain: str, ttl: int = 60) -> None:
        """RFC 7505 "no mail accepted": a single MX with preference 0 and exchange "."."""
        self._add(domain, QTYPE.MX, MX(".", 0), ttl)

    def add_a(self, name: str, ip: str, ttl: int = 60) -> None:
        self._add(name, QTYPE.A, A(ip), ttl)

    def add_aaaa(self, name: str, ip: str, ttl: int = 60) -> None:
        self._add(name, QTYPE.AAAA, AAAA(ip), ttl)

    def add_ptr(self, ip: str, name: str, ttl: int = 60) -> None:
        """A PTR record for `ip` (at its in-addr.arpa / ip6.arpa name) naming `name`."""
        self._add(dns.reversename.from_address(ip).to_text(), QTYPE.PTR, PTR(name), ttl)

    def add_txt(self, name: str, text: str | bytes, ttl: int = 60) -> None:
        """One TXT record; text over 255 bytes is split into several character-strings."""
        raw = text.encode() if isinstance(text, str) else text
        chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        self._add(name, QTYPE.TXT, TXT(chunks), ttl)

    def set_servfail(self, domain: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL for every query of exactly this name (only of `rtype`, e.g. "A",
        if given)."""
        with self._lock:
            self._servfail.add(_norm(domain) + (f"/{rtype}" if rtype else ""))

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop the records of a name (only those of `rtype`, e.g. "MX", if given) and its
        SERVFAIL flag."""
        key = _norm(name)
        with self._lock:
            self._servfail = {s for s in self._servfail if s.split("/")[0] != key}
            keep = [rr for rr in self._records.pop(key, []) if rtype and QTYPE[rr.rtype] != rtype]
            if keep:
                self._records[key] = keep

    # -- dnslib resolver interface (called from server threads) ------------------------------

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname, qtype = _norm(str(request.q.qname)), request.q.qtype
        reply = request.reply()  # sets qr, aa, ra and copies the question
        with self._lock:
            self.queries.append((qname, QTYPE.get(qtype, str(qtype))))
            qtype_name = QTYPE.get(qtype, str(qtype))
            if qname in self._servfail or f"{qname}/{qtype_name}" in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            exists = any(n == qname or n.endswith("." + qname) for n in self._records)
            answers = [rr for rr in self._records.get(qname, []) if rr.rtype == qtype]
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        for rr in answers:
            reply.add_answer(rr)
        return reply

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DnsServer:
        logger = DNSLogger(log="-request,-reply", prefix=False, logf=log.debug)
        for _ in range(20):
            udp = UDPServer(("127.0.0.1", 0), _Handler)
            port = udp.server_address[1]
            try:
                tcp = TCPServer(("127.0.0.1", port), _Handler)
            except OSError:  # TCP side of that port is taken: try another port
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("could not bind UDP and TCP on the same loopback port")
        self.port = port
        for proto, server in (("udp", udp), ("tcp", tcp)):
            server.resolver, server.logger = self, logger
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
                name=f"dns-{proto}-{port}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def resolver(self, lifetime: float = 3.0) -> dns.asyncresolver.Resolver:
        """A dnspython async resolver that asks only this server (no /etc/resolv.conf)."""
        res = dns.asyncresolver.Resolver(configure=False)
        res.port = self.port  # must be set before `nameservers`, which captures the port
        res.nameservers = ["127.0.0.1"]
        res.lifetime = lifetime
        return res

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
