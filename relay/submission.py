"""SMTP submission: the aiosmtpd handler behind `smtp.listen`.

Owns the policy of the SMTP front door: AUTH PLAIN/LOGIN with an API key as the password (only
over TLS: aiosmtpd enforces that with `auth_require_tls`), relaying only for authenticated clients
and `smtp.trusted_networks` (never an open relay: everyone else is refused at RCPT), replies with
enhanced status codes, and a `451 4.3.0` instead of aiosmtpd's exception text. A finished DATA
goes to `Spool.accept`; `250` is answered only after it committed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from config import Settings
from store import PolicyRejected, Principal, Source, Spool, SpoolClosed, StorageFull, Submission

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: list[str]) -> list[Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def is_trusted(peer: object, networks: list[Network]) -> bool:
    """Whether a peer address (host, port, …) lies in one of `networks`."""
    if not networks or not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class SubmissionHandler:
    """aiosmtpd hooks for one listener; shared by all its sessions."""

    def __init__(self, spool: Spool, settings: Settings) -> None:
        self._spool = spool
        self._settings = settings
        self._trusted = parse_networks(settings.smtp.trusted_networks)

    # -- AUTH (async hooks: the key lookup awaits the spool; see STYLE.md gotchas 1 and 9) ----

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
        return await self._check(parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await server.challenge_auth(SMTP.AuthLoginUsernameChallenge)
            if user is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(SMTP.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(password, bytes)
        return await self._check(password)

    async def _check(self, password: bytes) -> AuthResult:
        try:
            principal = await self._spool.authenticate(password.decode("utf-8"))
        except UnicodeDecodeError:
            principal = None
        if principal is None:
            return AuthResult(
                success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
            )
        return AuthResult(success=True, auth_data=principal)

    # -- the transaction ---------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # aiosmtpd hands a null reverse-path over as the literal "<>".
        envelope.mail_from = "" if address == "<>" else address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not session.authenticated and not is_trusted(session.peer, self._trusted):
            # Never an open relay: every recipient is a relay recipient on a submission port.
            return "530 5.7.0 Authentication required"
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return "501 5.1.3 Bad recipient address syntax"
        if len(envelope.rcpt_tos) >= self._settings.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        principal = session.auth_data if isinstance(session.auth_data, Principal) else None
        submission = Submission(
            mail_from=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            content=content,
            source=Source.SMTP,
            principal=principal,
        )
        try:
            accepted = await self._spool.accept(submission)
        except PolicyRejected as exc:
            return _policy_reply(exc)
        except StorageFull:
            return "452 4.3.1 Insufficient system storage"
        except SpoolClosed:
            return "451 4.3.2 Service shutting down, try again later"
        logger.info(
            "%s: from=<%s> size=%d nrcpt=%d client=%s auth=%s",
            accepted.id,
            submission.mail_from,
            len(content),
            len(submission.recipients),
            session.peer[0] if isinstance(session.peer, tuple) else session.peer,
            principal.key_id if principal else "-",
        )
        return f"250 2.0.0 Ok: queued as {accepted.id}"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers `500 Error: (Class) text`, leaking internals and telling
        # the client to give up; a failure of ours is temporary (STYLE.md gotcha 2).
        logger.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error, try again later"


def _policy_reply(exc: PolicyRejected) -> str:
    if exc.slug == "message_too_large":
        return f"552 5.3.4 {exc}"
    if exc.slug == "too_many_recipients":
        return f"452 4.5.3 {exc}"
    if exc.slug == "invalid_recipient":
        return f"550 5.1.3 {exc}"
    return f"550 5.7.1 {exc}"


def protocol_factory(
    spool: Spool,
    settings: Settings,
    tls_context: ssl.SSLContext | None,
    make_smtp: Callable[..., SMTP] = SMTP,
) -> Callable[[], asyncio.Protocol]:
    """What `loop.create_server` needs: a new aiosmtpd SMTP protocol per connection.

    `make_smtp(handler, **options)` builds it; the service passes relay/sessions.py's, which
    tracks sessions for the drain, the per-session log line and metrics.
    """
    handler = SubmissionHandler(spool, settings)
    options: dict[str, Any] = {
        "hostname": settings.server.hostname,
        "ident": "Postroom ESMTP",
        "data_size_limit": settings.smtp.max_message_size,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "tls_context": tls_context,
        "require_starttls": False,
        "auth_require_tls": True,
        "timeout": settings.smtp.timeout,
    }

    def factory() -> asyncio.Protocol:
        protocol: asyncio.Protocol = make_smtp(handler, **options)
        return protocol

    return factory
