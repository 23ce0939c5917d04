"""SMTP submission: the aiosmtpd protocol and handler behind `smtp.listen` and `smtp.tls_listen`.

Owns the policy of the SMTP front door: which connections may start a session (session limits,
AUTH lock-outs), what EHLO offers, AUTH PLAIN/LOGIN with an API key as the password (only over
TLS — STARTTLS or implicit — unless loopback is allowed plaintext), relaying only for authenticated
clients and `smtp.trusted_networks` (never an open relay: everyone else is refused at RCPT
whatever the address looks like), replies with enhanced status codes, our trace header, and a
`451 4.3.0` instead of an exception text. A finished DATA is stamped into a `Submission` and
handed to the `Door`, whose commit answers it: `250` only after the spool committed. The door
(relay/frontdoor.py, or the service process behind relay/workers.py) owns the counts and the
spool; the decisions about counts and time live in `relay/throttle.py`, the header in
`relay/trace.py`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import inspect
import ipaddress
import logging
import re
import secrets
import ssl
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, AnyStr, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from config import Settings
from relay.control import ControlError, idempotency_key, read_controls
from relay.throttle import AuthVerdict
from relay.trace import SessionFacts, is_valid_helo, stamp
from store import Principal, Source, SpoolClosed, Submission

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTH_MECHANISMS = "LOGIN PLAIN"
LOCKED_OUT = "421 4.7.0 Too many failed authentications from your address, try again later"


def parse_networks(networks: list[str]) -> list[Network]:
    """CIDRs → networks; IPv4-mapped IPv6 networks (::ffff:a.b.c.d/n) become IPv4 networks."""
    parsed: list[Network] = []
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
        parsed.append(net)
    return parsed


def peer_host(peer: object) -> str:
    """The address part of a socket peer name (host, port, …); "" when there is none."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def is_trusted(peer: object, networks: list[Network]) -> bool:
    """Whether a peer address (host, port, …) lies in one of `networks`."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(peer_host(peer).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_valid_mailbox(address: str) -> bool:
    """Whether an envelope address is `local@domain` in valid UTF-8, without control characters.

    aiosmtpd decodes command arguments as UTF-8 with `surrogateescape` (SMTPUTF8 is enabled), so
    bytes that are not UTF-8 reach the hooks as lone surrogates, which the spool cannot store:
    they are refused at MAIL/RCPT with a permanent reply, never at DATA with a temporary one.
    """
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return False
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain)


# -- replies -------------------------------------------------------------------------------------

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
# aiosmtpd's own replies that need more than a default code (STYLE.md gotcha 12).
_REWRITES = {
    "500 Command line too long": "500 5.5.2 Line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "552 Error: Too much mail data": "552 5.3.4 Message too big",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed maximum message size",
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    # 2.0.0, as Postfix answers VRFY: X.5.2 would say "syntax error" (RFC 3463 §3.6).
    "252 Cannot VRFY user, but will accept message and attempt delivery":
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
}
# aiosmtpd's HELP answers 250; RFC 5321 §4.2.2 has 214 for a help reply.
_PREFIX_REWRITES = (
    ("250 Supported commands: ", "214 2.0.0 Supported commands: "),
    ("250 Syntax: ", "214 2.0.0 Syntax: "),
)
# RFC 3463 codes for aiosmtpd's other error replies, by reply code.
_DEFAULT_ENHANCED = {
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "538": "5.7.11", "552": "5.3.4", "553": "5.1.3", "554": "5.7.0",
    "555": "5.5.4",
}


def enhance_reply(reply: str) -> str:
    """The reply with an enhanced status code (RFC 2034) if it is an error or a known 2xx.

    The greeting, EHLO's capability lines and 3xx continuations carry none by definition.
    """
    if reply in _REWRITES:
        return _REWRITES[reply]
    for prefix, replacement in _PREFIX_REWRITES:
        if reply.startswith(prefix):
            return replacement + reply[len(prefix):]
    code = reply[:3]
    if len(reply) < 4 or reply[3] != " " or code[0] not in "45" or _HAS_ENHANCED.match(reply):
        return reply
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    text = reply[4:].removeprefix("Error: ")
    return f"{code} {enhanced} {text}"


# -- logging -------------------------------------------------------------------------------------


def _redact_aiosmtpd(record: logging.LogRecord) -> bool:
    # Below WARNING aiosmtpd logs command lines, DATA lines (bodies) and AUTH continuations that
    # are not base64 (raw passwords). An "unrecognised" command may be a password a client sent
    # out of turn: log its length, not its text.
    if record.levelno < logging.WARNING:
        return False
    if record.msg == "%r unrecognised: %s" and isinstance(record.args, tuple):
        record.args = (record.args[0], f"<{len(str(record.args[1]))} characters>")
    return True


def quiet_aiosmtpd_logging() -> None:
    """Keep aiosmtpd's `mail.log` logger at WARNING and above, whatever the levels (gotcha 10)."""
    library = logging.getLogger("mail.log")
    library.setLevel(max(library.level, logging.WARNING))
    if _redact_aiosmtpd not in library.filters:
        library.addFilter(_redact_aiosmtpd)


# -- the protocol --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a new connection may start a session, and how its client is counted."""

    client: str
    is_trusted: bool
    refusal: str | None = None


class Door(Protocol):
    """What the SMTP sessions ask of the service: who may connect and AUTH, and the commit.

    In one process it is relay/frontdoor.py's `LocalDoor`, over the spool itself; in an SMTP
    worker process (`smtp.workers`) it is relay/worker.py's `RemoteDoor`, which asks the service
    process, so that session counts, AUTH lock-outs and idempotency stay one set for the whole
    server. `admit` may answer at once or with an awaitable.
    """

    def admit(self, host: str) -> Admission | Awaitable[Admission]: ...

    def release(self, client: str) -> None: ...

    async def is_locked(self, client: str) -> bool: ...

    async def authenticate(self, secret: str) -> Principal | None: ...

    async def auth_succeeded(self, client: str) -> None: ...

    async def auth_failed(self, client: str) -> AuthVerdict: ...

    async def commit(self, submission: Submission, host: str) -> str:
        """Store the message (idempotency and policy included); the SMTP reply to DATA."""
        ...


def _reverse_path(envelope: Envelope) -> str:
    """The envelope sender as stored: "" for the null reverse-path `<>` (RFC 5321 §4.5.5)."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def is_encrypted(server: SMTP) -> bool:
    """Whether the session runs over TLS, by STARTTLS or implicitly (STYLE.md gotcha 8)."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


# aiosmtpd's SMTP.__init__ finds the protocol's smtp_*/auth_* methods and the handler's
# handle_*/auth_* hooks with dir() and inspect.getmembers(): about 0.2 ms of the loop a session
# (profiled under bench/vs_postfix.sh). Sessions are built from a `_Prototype` instead, so this
# runs for the first session of each kind, and for every session only where no prototype can be
# made. Those names belong to the classes, so both objects list only them, computed once per
# class; nothing else here relies on dir().
_HOOK_PREFIXES = ("smtp_", "auth_", "handle_")
_hook_names_of: dict[type, list[str]] = {}


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: An angle-bracketed path whose local part is a dot-atom and whose domain is plain labels,
#: then the parameters: what `get_angle_addr` parses to the same address and rest (it takes
#: the blanks after `>` as part of the path; a comment there goes the long way).
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*((?:[^ \t(].*)?)\Z",
    re.S,
)


def _hook_names(cls: type) -> list[str]:
    names = _hook_names_of.get(cls)
    if names is None:
        names = _hook_names_of[cls] = [n for n in dir(cls) if n.startswith(_HOOK_PREFIXES)]
    return names


@dataclass(frozen=True, slots=True)
class _Prototype:
    """What aiosmtpd's `SMTP.__init__` made of one session, for the next sessions built with the
    same class, handler and options: its plain attributes, and the names behind its tables of
    bound methods, which each session binds to itself again."""

    state: dict[str, Any]
    smtp_methods: tuple[tuple[str, str], ...]  # (command, attribute of the session)
    auth_methods: tuple[tuple[str, str, bool], ...]  # (mechanism, attribute, of the session?)
    auth_type: type


#: What `asyncio.StreamReaderProtocol.__init__` sets, which each session makes for itself.
_STREAM_STATE: frozenset[str] | None = None
#: Prototypes a handler keeps at most: one per session class and listener, and a new one for
#: each TLS context a reload brings (the old ones are dropped with the rest).
_MAX_PROTOTYPES = 8
#: Tables whose values `_prototype_of` checks one by one.
_TABLES = frozenset({"_smtp_methods", "_auth_methods", "_handle_hooks"})


def _prototype_of(session: SubmissionSMTP, handler: SubmissionHandler) -> _Prototype | None:
    """The prototype of a session `SMTP.__init__` just built, or None where some attribute is
    not one a prototype may share (a later aiosmtpd's new state): then every session of its
    kind is built the long way, as aiosmtpd builds it."""
    global _STREAM_STATE
    if _STREAM_STATE is None:
        loop = session.loop
        bare = asyncio.StreamReaderProtocol(  # as `_init_from` calls it
            asyncio.StreamReader(loop=loop), client_connected_cb=session._cb_client_connected,
            loop=loop,
        )
        _STREAM_STATE = frozenset(vars(bare))
    state = {k: v for k, v in vars(session).items() if k not in _STREAM_STATE}
    shared = (type(None), bool, int, float, str, ssl.SSLContext, types.FunctionType)
    for name, value in state.items():
        if name in _TABLES or value is handler or value is session.loop:
            continue
        if not isinstance(value, shared):
            return None
    if any(getattr(hook, "__self__", None) is not handler
           for hook in state["_handle_hooks"].values()):
        return None
    smtp_methods = []
    for command, method in state.pop("_smtp_methods").items():
        attribute = getattr(getattr(method, "__func__", None), "__name__", "")
        if method.__self__ is not session or getattr(session, attribute) != method:
            return None
        smtp_methods.append((command, attribute))
    auth_methods = []
    auth_type: type = tuple
    for mechanism, entry in state.pop("_auth_methods").items():
        auth_type = type(entry)
        method, is_builtin = entry
        owner = session if is_builtin else handler
        attribute = getattr(getattr(method, "__func__", None), "__name__", "")
        if method.__self__ is not owner or getattr(owner, attribute) != method:
            return None
        auth_methods.append((mechanism, attribute, bool(is_builtin)))
    return _Prototype(state, tuple(smtp_methods), tuple(auth_methods), auth_type)


def _command_size_limit() -> int:
    """A command line's limit before EHLO raises it, as aiosmtpd's class-wide dict gives it."""
    return SMTP.command_size_limit


class SubmissionSMTP(SMTP):
    """aiosmtpd's protocol for one admitted session, with what its hooks cannot do.

    It releases the session's count when the connection ends, ends the session after
    `smtp.session_timeout`, adds enhanced status codes to aiosmtpd's own replies, and refuses RCPT
    from unauthenticated, untrusted clients before aiosmtpd parses the address, so no address
    form (source routes, bang paths, quoted local parts, …) reaches any other check.

    aiosmtpd's `SMTP.__init__` finds every session's methods and hooks by introspection
    (`inspect.getmembers`, `dir`, `inspect.signature`): about a tenth of an SMTP worker's CPU
    for a message sent on its own connection (profiled under bench/vs_postfix.sh). Only the
    first session of each kind is built that way; the next ones copy its state from a
    `_Prototype` and bind its tables to themselves.
    """

    def __init__(self, handler: SubmissionHandler, admission: Admission, **options: Any) -> None:
        loop = asyncio.get_running_loop()
        key = (type(self), tuple(options.items()))
        prototypes = handler.prototypes
        prototype = prototypes.get(key, False)
        if isinstance(prototype, _Prototype):
            self._init_from(prototype, handler, loop)
        else:
            super().__init__(handler, loop=loop, **options)
            if prototype is False:  # None: this kind cannot have one
                if len(prototypes) >= _MAX_PROTOTYPES:  # options renewed by reloads
                    prototypes.clear()
                prototypes[key] = _prototype_of(self, handler)
        # aiosmtpd keeps these limits in a dict of the class, which every new session clears
        # and every EHLO raises: each session keeps its own.
        self.command_size_limits = collections.defaultdict(_command_size_limit)
        self.admission = admission
        self._handler = handler
        self._deadline: asyncio.TimerHandle | None = None
        self._is_counted = True
        self._held_lines: list[str] = []
        #: The API key this session authenticated with, kept (in memory only, never logged) so
        #: that each MAIL can check it was not revoked since (`SubmissionHandler._recheck_key`).
        self.auth_secret: str | None = None

    def _init_from(
        self, prototype: _Prototype, handler: SubmissionHandler, loop: asyncio.AbstractEventLoop
    ) -> None:
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        own = vars(self)
        own.update(prototype.state)
        self.loop = loop
        self._handle_hooks = dict(prototype.state["_handle_hooks"])
        self._smtp_methods = {
            command: getattr(self, attribute) for command, attribute in prototype.smtp_methods
        }
        self._auth_methods = {
            mechanism: prototype.auth_type(getattr(self if is_builtin else handler, attribute),
                                           is_builtin)
            for mechanism, attribute, is_builtin in prototype.auth_methods
        }

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        is_first = self.transport is None  # STARTTLS calls this again with the TLS transport
        super().connection_made(transport)
        if is_first:
            self._deadline = self.loop.call_later(
                self._handler.settings.smtp.session_timeout, self._end_session
            )

    def connection_lost(self, error: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._is_counted:
            self._is_counted = False
            self._handler.door.release(self.admission.client)
        super().connection_lost(error)

    def _end_session(self) -> None:
        self._close_with(b"421 4.4.2 Session time limit exceeded, closing\r\n")

    def _timeout_cb(self) -> None:
        # aiosmtpd's idle timer (`timeout=`) closes the connection without a word; RFC 5321
        # §4.5.3.2 lets a server close after a timeout, and a 421 tells the client why. If a
        # later aiosmtpd renames this callback, its own silent close still happens.
        self._close_with(b"421 4.4.2 Idle timeout exceeded, closing\r\n")

    def _close_with(self, reply: bytes) -> None:
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(reply)
            transport.close()

    async def push(self, status: AnyStr) -> None:
        if not isinstance(status, str):
            await super().push(status)
            return
        if status[3:4] == "-":
            # A line of a multi-line reply (EHLO's capabilities): written with its last line,
            # one socket write for the whole reply instead of one per line (about 8% of an
            # SMTP worker's time went to writes, profiled under bench/vs_postfix.sh).
            self._held_lines.append(status)
            return
        if self._held_lines:
            status = "\r\n".join([*self._held_lines, enhance_reply(status)])
            self._held_lines.clear()
            await super().push(status)
            return
        await super().push(enhance_reply(status))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd 1.4's own version parses the same way but first defines a typing.Protocol
        # class on every call: about 25 µs of the loop per MAIL and per RCPT (profiled under
        # bench/accept_smtp.py). Same parse, same limits, same answers.
        if not arg:
            return "", ""
        if simple := _SIMPLE_PATH.match(arg):
            # `<dot-atom@domain>` and parameters, nearly every real MAIL and RCPT: the email
            # parser would return the same address and rest, at ten times the cost.
            addr, rest = simple.group(1), simple.group(2)
        else:
            addr, rest = self._parse_path(arg)
            if addr is None:
                return None, None
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    @staticmethod
    def _parse_path(arg: str) -> tuple[str | None, str]:
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                addr: str = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                addr = spec.addr_spec
        except HeaderParseError:
            return None, ""
        return addr, rest

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        session = self.session
        assert session is not None
        if session.host_name and not session.authenticated and not self.admission.is_trusted:
            # Never an open relay: on a submission port every recipient is a relay recipient.
            await self.push("530 5.7.0 Authentication required")
            return
        await super().smtp_RCPT(arg)


class _Gate(asyncio.Protocol):
    """The first protocol of every connection: admits it into an SMTP session or refuses it.

    Refusing here, before aiosmtpd's protocol exists, answers `421 4.7.0` without a greeting;
    an admitted connection is handed to a new `SubmissionSMTP` with `transport.set_protocol`.
    """

    def __init__(self, make_session: Callable[[Admission], SubmissionSMTP],
                 handler: SubmissionHandler) -> None:
        self._make_session = make_session
        self._handler = handler
        self._is_lost = False
        self._pending: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self._transport = transport
        verdict = self._handler.door.admit(peer_host(transport.get_extra_info("peername")))
        if isinstance(verdict, Admission):
            self._open(transport, verdict)
            return
        # A worker process asks the service (relay/workers.py): the client waits unread.
        transport.pause_reading()
        self._pending = asyncio.ensure_future(self._admit_later(transport, verdict))

    async def _admit_later(
        self, transport: asyncio.Transport, verdict: Awaitable[Admission]
    ) -> None:
        try:
            admission = await verdict
        except SpoolClosed:  # the service is gone: nothing was counted
            admission = None
        except Exception:
            logger.exception("admitting a connection failed")
            admission = None
        if self._is_lost:
            if admission is not None and admission.refusal is None:
                self._handler.door.release(admission.client)
            return
        if admission is None:
            transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
            transport.close()
            return
        transport.resume_reading()
        self._open(transport, admission)

    def _open(self, transport: asyncio.Transport, admission: Admission) -> None:
        if admission.refusal is not None:
            transport.write(admission.refusal.encode("ascii") + b"\r\n")
            transport.close()
            return
        session = self._make_session(admission)
        transport.set_protocol(session)
        session.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only while the admission is awaited: after it, the session is the protocol.
        self._is_lost = True


# -- the handler ---------------------------------------------------------------------------------


class SubmissionHandler:
    """aiosmtpd hooks and the front door's shared state; one per service, for every listener."""

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))

    def __init__(self, door: Door, settings: Settings) -> None:
        self.door = door
        self.settings = settings
        #: `SubmissionSMTP`'s prototypes, by session class and options (None: none possible).
        self.prototypes: dict[tuple[type, tuple[tuple[str, Any], ...]], _Prototype | None] = {}

    def _admission(self, server: SMTP) -> Admission:
        assert isinstance(server, SubmissionSMTP)
        return server.admission

    def _may_authenticate(self, server: SMTP) -> bool:
        if is_encrypted(server):
            return True
        return self.settings.smtp.allow_plaintext_auth_loopback and is_loopback(
            peer_host(server.session.peer if server.session else None)
        )

    # -- greeting ------------------------------------------------------------------------------

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        if not is_valid_helo(hostname):
            session.host_name = None  # a refused greeting leaves the client ungreeted
            return "501 5.5.4 Invalid HELO hostname"
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd's own list would offer STARTTLS and AUTH by whether STARTTLS happened, which
        # is wrong on an implicit-TLS listener (STYLE.md gotcha 8): the list is ours.
        if not is_valid_helo(hostname):
            session.host_name = None  # a refused greeting leaves the client ungreeted
            return ["501 5.5.4 Invalid EHLO hostname"]
        session.host_name = hostname
        capabilities = [
            server.hostname, "PIPELINING", f"SIZE {self.settings.smtp.max_message_size}",
            "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
        ]
        if server.tls_context is not None and not is_encrypted(server):
            capabilities.append("STARTTLS")
        if self._may_authenticate(server):
            capabilities.append(f"AUTH {AUTH_MECHANISMS}")
        capabilities.append("HELP")
        return [f"250-{c}" for c in capabilities[:-1]] + [f"250 {capabilities[-1]}"]

    # -- AUTH (async hooks: the key lookup awaits the spool; see STYLE.md gotchas 1 and 9) ----

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> object:
        """Runs before the mechanism: TLS required, and a locked-out client is sent away."""
        if not self._may_authenticate(server):
            return "538 5.7.11 Encryption required for requested authentication mechanism"
        admission = self._admission(server)
        if not admission.is_trusted and await self.door.is_locked(admission.client):
            await self._lock_out(server)
            return None  # replied already
        return MISSING

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Malformed PLAIN credentials")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[2], "PLAIN")

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if user is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(password, bytes)
        return await self._check(server, password, "LOGIN")

    async def _check(self, server: SMTP, password: bytes, mechanism: str) -> AuthResult:
        try:
            principal = await self.door.authenticate(password.decode("utf-8"))
        except UnicodeDecodeError:
            principal = None
        except SpoolClosed:
            await server.push("454 4.3.2 Service shutting down, try again later")
            return AuthResult(success=False, handled=True)
        admission = self._admission(server)
        if principal is not None:
            await self.door.auth_succeeded(admission.client)
            assert isinstance(server, SubmissionSMTP)
            server.auth_secret = password.decode("utf-8")
            return AuthResult(success=True, auth_data=principal)
        host = peer_host(server.session.peer if server.session else None)
        if admission.is_trusted:
            logger.info("AUTH %s failed: client=%s", mechanism, host)
        else:
            verdict = await self.door.auth_failed(admission.client)
            logger.warning("AUTH %s failed: client=%s delay=%.1fs%s", mechanism, host,
                           verdict.delay, " locked-out" if verdict.is_locked else "")
            await asyncio.sleep(verdict.delay)  # slows a guesser down, bounded per IP
            if verdict.is_locked:
                await self._lock_out(server)
                return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )

    async def _lock_out(self, server: SMTP) -> None:
        await server.push(LOCKED_OUT)
        if server.transport is not None:
            server.transport.close()

    # -- the transaction ---------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # aiosmtpd hands a null reverse-path over as the literal "<>".
        if address != "<>" and not is_valid_mailbox(address):
            return "553 5.1.7 Bad sender address syntax"
        if session.authenticated:
            refusal = await self._recheck_key(server, session)
            if refusal is not None:
                return refusal
        # The null reverse-path stays "<>" in the envelope: aiosmtpd answers RCPT with "503 need
        # MAIL command" while `mail_from` is empty. It becomes "" in the Submission.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def _recheck_key(self, server: SMTP, session: Session) -> str | None:
        """Look the session's key up again (one indexed read); a refusal if it was revoked.

        AUTH happened once, but a session may last long and send many transactions: a key
        revoked meanwhile stops at the next MAIL. The reply is `530 5.7.0` ("authentication
        required", RFC 4954 §6: for commands other than AUTH when no authentication is in
        force), not `535 5.7.8`, which answers the AUTH command itself. The session becomes
        unauthenticated, so the client may AUTH again with another key; it is refused even on
        a trusted network, since it meant to send under that key (its domains, its test mode).
        """
        assert isinstance(server, SubmissionSMTP)
        secret = server.auth_secret
        try:
            principal = await self.door.authenticate(secret) if secret is not None else None
        except SpoolClosed:
            return "451 4.3.2 Service shutting down, try again later"
        if principal is not None:
            return None
        revoked = session.auth_data.key_id if isinstance(session.auth_data, Principal) else "-"
        logger.info("refused MAIL: API key %s was revoked during the session, client=%s",
                    revoked, peer_host(session.peer))
        session.authenticated = False
        session.auth_data = None
        server.auth_secret = None
        return "530 5.7.0 Authentication required: the API key is no longer valid"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not session.authenticated and not self._admission(server).is_trusted:
            # SubmissionSMTP.smtp_RCPT refused already; kept so the rule holds on its own.
            return "530 5.7.0 Authentication required"
        if not is_valid_mailbox(address):
            return "553 5.1.3 Bad recipient address syntax"
        if len(envelope.rcpt_tos) >= self.settings.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        principal = session.auth_data if isinstance(session.auth_data, Principal) else None
        host = peer_host(session.peer)
        try:
            original, controls = read_controls(envelope.original_content or b"", time.time())
        except ControlError as exc:
            return f"550 5.6.0 {exc}"
        sender = _reverse_path(envelope)
        try:
            content = stamp(
                original,
                session_facts(server, session, principal),
                hostname=self.settings.server.hostname,
                recipients=envelope.rcpt_tos,
                now=datetime.now().astimezone(),
                message_id=f"<{secrets.token_hex(16)}@{self.settings.server.hostname}>",
            )
            submission = Submission(
                mail_from=sender,
                recipients=tuple(envelope.rcpt_tos),
                content=content,
                source=Source.SMTP,
                principal=principal,
                tags=controls.tags,
                metadata=controls.metadata,
                message_type=controls.message_type,
                priority=controls.priority,
                scheduled_at=controls.scheduled_at,
                idempotency=idempotency_key(controls, sender, envelope.rcpt_tos, original),
            )
            # The reply is the door's: 250 only once the message is committed.
            return await self.door.commit(submission, host)
        except SpoolClosed:
            return "451 4.3.2 Service shutting down, try again later"
        except Exception:  # answered here, so that aiosmtpd resets the transaction
            logger.exception("accepting a message from %s failed", host)
            return "451 4.3.0 Internal error, try again later"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers `500 Error: (Class) text`, leaking internals and telling
        # the client to give up; a failure of ours is temporary (STYLE.md gotcha 2).
        logger.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


# aiosmtpd's SMTP.__init__ reads handle_EHLO's signature for every new connection (to tell its
# old four-argument form): inspect.signature is about 13 µs of it, 4 µs with the answer ready.
SubmissionHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    SubmissionHandler.handle_EHLO
)


def session_facts(server: SMTP, session: Session, principal: Principal | None) -> SessionFacts:
    """What the `Received:` header says about this session: TLS and AUTH, never a secret."""
    facts = SessionFacts(
        helo=session.host_name or "unknown",
        client_ip=peer_host(session.peer),
        is_esmtp=session.extended_smtp,
        auth_key_id=principal.key_id if principal else None,
    )
    transport = server.transport
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    if isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
        cipher = tls.cipher()
        return SessionFacts(
            helo=facts.helo, client_ip=facts.client_ip, is_esmtp=facts.is_esmtp,
            auth_key_id=facts.auth_key_id, tls_version=tls.version(),
            tls_cipher=cipher[0] if cipher else None, tls_bits=cipher[2] if cipher else None,
        )
    return facts


def protocol_factory(
    handler: SubmissionHandler,
    tls_context: ssl.SSLContext | None,
    *,
    is_implicit_tls: bool,
    make_smtp: Callable[..., SubmissionSMTP] = SubmissionSMTP,
) -> Callable[[], asyncio.Protocol]:
    """What `loop.create_server` needs for one listener: a new gate per connection.

    An implicit-TLS listener is given its context through `create_server(ssl=…)`; its sessions
    get none, so that STARTTLS is not offered there. `make_smtp(handler, admission, **options)`
    builds each admitted session; the service passes relay/sessions.py's, which tracks sessions
    for the drain, the per-session log line and metrics.
    """
    settings = handler.settings
    options: dict[str, Any] = {
        "hostname": settings.server.hostname,
        "ident": "Postroom ESMTP",
        "data_size_limit": settings.smtp.max_message_size,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "tls_context": None if is_implicit_tls else tls_context,
        "require_starttls": False,
        # Our hooks decide whether AUTH may run (`handle_AUTH`): aiosmtpd's own check only knows
        # STARTTLS and would refuse AUTH on the implicit-TLS port.
        "auth_require_tls": False,
        "timeout": settings.smtp.timeout,
    }

    def make_session(admission: Admission) -> SubmissionSMTP:
        return make_smtp(handler, admission, **options)

    def factory() -> asyncio.Protocol:
        return _Gate(make_session, handler)

    return factory
