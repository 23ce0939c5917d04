"""`postroom doctor`: can this host run Postroom, and will receivers trust the mail it sends?

Owns the checks — the config, the listening ports, the TLS certificate, the spool, the DNS
resolver, the hostname's addresses and reverse DNS, and each sending domain's DKIM, SPF and DMARC
records — each a `Check`: ok, warn or fail with a one-line reason. The judgements (`judge_*`) are
pure functions of what was found and the time; `run_checks` gathers the facts: it binds sockets,
asks what answers on a busy port, reads the spool without changing it (store `inspect_spool`) and
asks DNS through relay/mx.py.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from config import Settings, parse_address
from relay.dkim import txt_records
from relay.domains import spf_match, spf_records
from relay.mx import Lookup, build_resolver, lookup
from store import DomainKeys, SpoolHealth, StoreError, inspect_spool

#: A certificate closer than this to its expiry is a warning (renewals usually run at 30 days).
EXPIRY_WARNING_DAYS = 21
#: How long a probe of a busy port waits for an answer.
PROBE_TIMEOUT = 3.0


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    check: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail}


def ok(check: str, detail: str) -> Check:
    return Check(check, Status.OK, detail)


def warn(check: str, detail: str) -> Check:
    return Check(check, Status.WARN, detail)


def fail(check: str, detail: str) -> Check:
    return Check(check, Status.FAIL, detail)


def has_failure(checks: Sequence[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


# -- config -----------------------------------------------------------------------------------


def judge_config(path: Path | None, problems: Sequence[str] = ()) -> Check:
    """The config loaded (from `path`, which may not exist: defaults), or why it did not."""
    if problems:
        return fail("config", "; ".join(problems))
    if path is None or not path.is_file():
        return ok("config", "no config file: defaults and POSTROOM_* environment")
    return ok("config", f"loaded {path}")


# -- ports ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    setting: str  # smtp.listen, smtp.tls_listen or api.listen
    address: str  # as configured
    kind: str  # "smtp", "smtps" or "api"

    @property
    def name(self) -> str:
        return f"port {self.setting} {self.address}"


@dataclass(frozen=True, slots=True)
class Probe:
    """Who answers on a port that is in use."""

    is_postroom: bool
    detail: str


def listeners(settings: Settings) -> list[Listener]:
    found = [Listener("smtp.listen", a, "smtp") for a in settings.smtp.listen]
    found += [Listener("smtp.tls_listen", a, "smtps") for a in settings.smtp.tls_listen]
    found.append(Listener("api.listen", settings.api.listen, "api"))
    return found


def judge_port(
    listener: Listener, error: int | None, reason: str = "", probe: Probe | None = None
) -> Check:
    """Bound (`error` None), or busy (EADDRINUSE, then `probe` says by whom), or refused."""
    name = listener.name
    if error is None:
        return ok(name, "can be bound")
    if error == errno.EADDRINUSE:
        if probe is not None and probe.is_postroom:
            return ok(name, f"in use by Postroom ({probe.detail})")
        said = probe.detail if probe is not None else "nothing answered"
        return fail(name, f"in use by something else ({said})")
    if error == errno.EACCES:
        return warn(name, "permission denied here: a port below 1024 needs root or "
                          "CAP_NET_BIND_SERVICE (the systemd unit grants it)")
    if error == errno.EADDRNOTAVAIL:
        return fail(name, "the address is not on this host")
    return fail(name, f"cannot bind: {reason}")


def try_bind(address: str) -> tuple[int | None, str]:
    """Bind (and release) every address `host:port` stands for, as the listener would."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return errno.EADDRNOTAVAIL, str(exc)
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            # As asyncio's create_server: TIME_WAIT connections must not count as "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.errno, exc.strerror or str(exc)
        finally:
            sock.close()
    return None, ""


def _probe_host(host: str) -> str:
    """Where to connect to reach a listener bound to `host` (wildcards mean loopback)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a configured wildcard, reached on loopback
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


async def probe(listener: Listener) -> Probe:
    """Ask what answers on a busy port: Postroom greets as "Postroom ESMTP"; its API answers
    both /healthz and /readyz."""
    host, port = parse_address(listener.address)
    host = _probe_host(host)
    try:
        if listener.kind == "api":
            return await _probe_api(host, port)
        return await _probe_smtp(host, port, is_tls=listener.kind == "smtps")
    except (OSError, TimeoutError, ssl.SSLError, httpx.HTTPError, ValueError) as exc:
        return Probe(False, f"no answer: {exc.__class__.__name__}")


async def _probe_smtp(host: str, port: int, is_tls: bool) -> Probe:
    context = None
    if is_tls:
        # Only "who is there", never trust: the certificate is judged by its own check.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context), PROBE_TIMEOUT
    )
    try:
        greeting = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    text = greeting.decode("ascii", "replace").strip()[:100] or "no greeting"
    return Probe("Postroom" in text, f"greets {text!r}" if text else text)


async def _probe_api(host: str, port: int) -> Probe:
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with httpx.AsyncClient(base_url=f"http://{netloc}", timeout=PROBE_TIMEOUT) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    try:
        is_alive = health.status_code == 200 and health.json() == {"status": "ok"}
        state = ready.json().get("ready")
    except ValueError:
        is_alive, state = False, None
    if is_alive and isinstance(state, bool):
        return Probe(True, "ready" if state else "not ready")
    return Probe(False, f"GET /healthz answered {health.status_code}")


# -- certificate --------------------------------------------------------------------------------


def judge_certificate(
    cert_pem: bytes, key_pem: bytes, hostname: str, now: datetime.datetime
) -> list[Check]:
    """Loads and matches its key; then its validity, issuer and names."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return [fail("certificate", "the certificate file holds no PEM certificate")]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        return [fail("certificate", f"the key does not load: {exc}")]
    cert = chain[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return [fail("certificate", "the key does not match the certificate")]
    checks = [ok("certificate", f"loads and matches its key ({cert.subject.rfc4514_string()})")]
    checks.append(_judge_validity(cert, now))
    if cert.issuer == cert.subject:
        checks.append(warn("certificate issuer", "self-signed: clients that verify certificates "
                                                 "refuse it; use one from a CA"))
    else:
        checks.append(ok("certificate issuer", f"issued by {cert.issuer.rfc4514_string()}"))
    names = certificate_names(cert)
    if any(_name_matches(pattern, hostname) for pattern in names):
        checks.append(ok("certificate hostname", f"names {hostname}"))
    else:
        shown = ", ".join(names) or "none"
        checks.append(warn("certificate hostname", f"does not name {hostname} (names: {shown})"))
    return checks


def _judge_validity(cert: x509.Certificate, now: datetime.datetime) -> Check:
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        return fail("certificate expiry", f"not valid before {before:%Y-%m-%d %H:%M} UTC")
    if now >= after:
        return fail("certificate expiry", f"expired on {after:%Y-%m-%d}")
    days = int((after - now).total_seconds() // 86400)
    if days < EXPIRY_WARNING_DAYS:
        return warn("certificate expiry", f"expires in {days} day(s), on {after:%Y-%m-%d}")
    return ok("certificate expiry", f"valid until {after:%Y-%m-%d} ({days} days)")


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names in subjectAltName, else the subject's common name (RFC 6125 §6.4.4)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)]
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def _name_matches(pattern: str, hostname: str) -> bool:
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        # A wildcard stands for exactly one left-most label (RFC 6125 §6.4.3).
        head, _, rest = hostname.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == hostname


def check_certificate(settings: Settings, now: datetime.datetime) -> list[Check]:
    """The configured certificate, else the self-signed pair `postroom init` made."""
    configured = settings.smtp.tls_cert is not None
    cert = settings.smtp.tls_cert or settings.tls_dir / "cert.pem"
    key = settings.smtp.tls_key or settings.tls_dir / "key.pem"
    if not configured and not cert.exists():
        if settings.smtp.tls_listen:
            return [fail("certificate", f"smtp.tls_listen needs a certificate: none at {cert}")]
        return [warn("certificate", f"none at {cert}: STARTTLS and AUTH are off "
                                    "(`postroom init` makes one, or set smtp.tls_cert)")]
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        return [fail("certificate", f"cannot read {exc.filename}: {exc.strerror}")]
    return judge_certificate(cert_pem, key_pem, settings.server.hostname, now)


# -- spool --------------------------------------------------------------------------------------


def judge_spool(path: Path, health: SpoolHealth | None, error: str | None = None) -> list[Check]:
    """The spool opens, its schema is current, it is sound, and the key opens it."""
    if health is None:
        if not path.exists():
            return [fail("spool", f"no spool at {path}: run `postroom init`")]
        return [fail("spool", error or f"cannot open {path}")]
    checks = [ok("spool", f"opens {path}")]
    have, latest = health.schema_version, health.latest_version
    if have > latest:
        checks.append(fail("spool schema", f"version {have} is newer than this Postroom "
                                           f"({latest}): upgrade Postroom"))
    elif have < latest:
        checks.append(warn("spool schema", f"version {have} of {latest}: `postroom db migrate` "
                                           "(serve also migrates at start)"))
    else:
        checks.append(ok("spool schema", f"up to date (version {have})"))
    if health.problems:
        more = f" (+{len(health.problems) - 1} more)" if len(health.problems) > 1 else ""
        checks.append(fail("spool integrity", health.problems[0] + more))
    else:
        checks.append(ok("spool integrity", "PRAGMA integrity_check: ok"))
    if health.key_problem is not None:
        checks.append(fail("spool encryption", health.key_problem))
    elif health.is_encrypted:
        checks.append(ok("spool encryption", "encrypted at rest; the configured key opens it"))
    else:
        checks.append(ok("spool encryption", "not encrypted at rest"))
    return checks


# -- DNS ----------------------------------------------------------------------------------------


def judge_resolver(servers: str, answer: Lookup) -> Check:
    """Any answer to `. NS`, even NXDOMAIN, shows the resolver works."""
    if answer.error is not None:
        return fail("dns resolver", f"{servers}: {answer.error}")
    return ok("dns resolver", f"{servers} answer")


def judge_hostname(
    hostname: str, forward: Sequence[Lookup], reverse: dict[str, Lookup]
) -> list[Check]:
    """The hostname's A/AAAA records, and forward-confirmed reverse DNS (each address's PTR
    names the hostname): receivers distrust a sender without them. Warnings only."""
    addresses = [a for answer in forward for a in answer.values]
    errors = [answer.error for answer in forward if answer.error is not None]
    if not addresses:
        said = errors[0] if errors else "no A or AAAA record"
        return [
            warn("hostname address", f"{hostname}: {said}"),
            warn("hostname ptr", f"{hostname}: no address to check"),
        ]
    checks = [ok("hostname address", f"{hostname} has {', '.join(addresses)}")]
    wrong = []
    want = hostname.lower().rstrip(".")
    for address in addresses:
        answer = reverse.get(address, Lookup(error="not asked"))
        if answer.error is not None:
            wrong.append(f"{address}: {answer.error}")
        elif not answer.values:
            wrong.append(f"{address} has no PTR")
        elif want not in answer.values:
            wrong.append(f"{address} has PTR {', '.join(answer.values)}")
    if wrong:
        checks.append(warn("hostname ptr", f"not {hostname}: " + "; ".join(wrong)))
    else:
        checks.append(ok("hostname ptr", f"every address's PTR names {hostname}"))
    return checks


def _tags(record: str) -> dict[str, str]:
    """A tag=value list (DKIM RFC 6376 §3.2, DMARC RFC 7489 §6.4); names lower case."""
    tags = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def judge_dkim(keys: DomainKeys, found: dict[str, Lookup]) -> Check:
    """Each published key (TXT at selector._domainkey) is the one the spool signs with."""
    name = f"dkim {keys.name}"
    problems, shown = [], []
    for expected in txt_records(keys):
        answer = found.get(expected.name, Lookup(error="not asked"))
        shown.append(expected.name)
        if answer.error is not None:
            return warn(name, f"{expected.name}: {answer.error}")
        wanted = _tags(expected.value)["p"]
        published = [_tags(v).get("p") for v in answer.values]
        if wanted in published:
            continue
        if not answer.values:
            problems.append(f"no TXT record at {expected.name}")
        else:
            problems.append(f"the TXT record at {expected.name} is not the stored key")
    if problems:
        return fail(name, "; ".join(problems) + ": publish what `postroom domains add` printed")
    return ok(name, f"{', '.join(shown)} publish the stored key")


def judge_spf(domain: str, hostname: str, addresses: Sequence[str], answer: Lookup) -> Check:
    """One SPF record, naming this host (a:hostname, or ip4/ip6 holding one of its addresses).

    The terms are matched as `postroom domains verify` matches them (relay/domains.py
    `spf_match`), without following: `include:`, `mx` and `redirect=` are named for the
    operator to check.
    """
    name = f"spf {domain}"
    if answer.error is not None:
        return warn(name, answer.error)
    records = spf_records(answer.values)
    if not records:
        return warn(name, f"no SPF record at {domain}: receivers cannot tell that this host "
                          "may send its mail")
    if len(records) > 1:
        return fail(name, f"{len(records)} SPF records at {domain}: a permerror (RFC 7208 §4.5)")
    host = hostname.lower().rstrip(".")
    match = spf_match(domain, records[0], hostname, addresses)
    if match.is_match:
        return ok(name, f"names this host ({match.term})")
    if match.unchecked:
        return warn(name, f"does not name {host} directly: check that "
                          f"{', '.join(match.unchecked)} covers it")
    return warn(name, f"does not cover {host} or its addresses")


def judge_dmarc(domain: str, answer: Lookup) -> Check:
    name = f"dmarc {domain}"
    if answer.error is not None:
        return warn(name, answer.error)
    records = [v for v in answer.values if v.lower().startswith("v=dmarc1")]
    if not records:
        return warn(name, f"no DMARC record at _dmarc.{domain}")
    policy = _tags(records[0]).get("p", "none")
    return ok(name, f"_dmarc.{domain} has a policy: p={policy}")


# -- running them -------------------------------------------------------------------------------


async def run_checks(settings: Settings, now: datetime.datetime | None = None) -> list[Check]:
    """Every check, in the order they are shown."""
    now = now or datetime.datetime.now(datetime.UTC)
    checks = [judge_config(settings.config_path)]
    for listener in listeners(settings):
        error, reason = try_bind(listener.address)
        found = await probe(listener) if error == errno.EADDRINUSE else None
        checks.append(judge_port(listener, error, reason, found))
    checks += check_certificate(settings, now)
    health, problem = None, None
    try:
        health = await asyncio.to_thread(inspect_spool, settings)
    except StoreError as exc:
        problem = str(exc)
    checks += judge_spool(settings.spool_path, health, problem)
    checks += await check_dns(settings, health.domains if health else ())
    return checks


async def check_dns(settings: Settings, domains: Sequence[DomainKeys]) -> list[Check]:
    resolver = build_resolver(settings)
    servers = ", ".join(
        f"{h}:{p}" for h, p in settings.delivery.nameserver_addresses
    ) or "the system's nameservers"
    root = await lookup(resolver, ".", "NS")
    checks = [judge_resolver(servers, root)]
    if root.error is not None:
        return checks  # every other lookup would only time out again
    hostname = settings.server.hostname
    forward = list(await asyncio.gather(
        lookup(resolver, hostname, "A"), lookup(resolver, hostname, "AAAA")
    ))
    addresses = [a for answer in forward for a in answer.values]
    ptrs = await asyncio.gather(*(lookup(resolver, a, "PTR") for a in addresses))
    checks += judge_hostname(hostname, forward, dict(zip(addresses, ptrs, strict=True)))
    for keys in domains:
        names = [r.name for r in txt_records(keys)]
        dkim_answers, spf, dmarc = await asyncio.gather(
            asyncio.gather(*(lookup(resolver, n, "TXT") for n in names)),
            lookup(resolver, keys.name, "TXT"),
            lookup(resolver, f"_dmarc.{keys.name}", "TXT"),
        )
        checks.append(judge_dkim(keys, dict(zip(names, dkim_answers, strict=True))))
        checks.append(judge_spf(keys.name, hostname, addresses, spf))
        checks.append(judge_dmarc(keys.name, dmarc))
    return checks
