"""SMTP transactions with one host address, through aiosmtplib.

Owns the conversation with a receiving MTA or smarthost: connect (to the resolved IP, from
`delivery.source_address` when set), EHLO with our hostname, the TLS policy (opportunistic
STARTTLS without certificate checks as MTAs do, `required`, `verify` against the MX name sent as
SNI, or implicit TLS to a smarthost), AUTH for smarthosts, then MAIL, one RCPT per recipient and
DATA when any recipient was accepted — all in one write when the server offers PIPELINING
(RFC 2920), as Postfix's smtp client does, and one command at a time otherwise. Recipients refused
with `552` at RCPT ("too many recipients", RFC 5321 §4.5.3.1.10) get a new transaction on the
same connection. It returns each
recipient's reply, or a session-level failure that tells the engine to try the next address.
Any timeout drops the connection. aiosmtplib's exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import aiosmtplib
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, PERIOD_REGEX

from relay.deadlines import Deadline
from relay.outcome import make_reply
from store import Reply

logger = logging.getLogger(__name__)

# QUIT on a session closed for idling or at shutdown: a polite goodbye, not worth waiting for.
_QUIT_TIMEOUT = 5.0

TlsMode = Literal["opportunistic", "required", "verify", "implicit"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per phase (RFC 5321 §4.5.3.2): the reply after the final dot may take minutes."""

    connect: float
    command: float
    data: float


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How to talk to a host: our name, TLS, AUTH (smarthosts), the source address."""

    local_hostname: str
    timeouts: Timeouts
    tls: TlsMode = "opportunistic"
    tls_ca_file: str | None = None
    source_address: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message for some recipients of one destination: (recipient id, address) pairs."""

    mail_from: str
    recipients: tuple[tuple[int, str], ...]
    content: bytes


@dataclass(frozen=True, slots=True)
class SessionResult:
    """Either `replies` (recipient id → the reply it got) or a session-level `failure`.

    `at_rcpt` names the recipients whose reply came at RCPT (not after DATA): a `552` there
    means "too many recipients", a temporary condition.
    """

    host: str
    address: str
    replies: dict[int, Reply]
    failure: Reply | None = None
    tls: str | None = None
    at_rcpt: frozenset[int] = frozenset()


#: A plain ASCII address (dot-atom local part, a host name): its SMTP path is `<address>`, the
#: same as aiosmtplib's `quote_address` gives (tests/test_transport_paths.py checks it), which
#: runs the email package's address parser on every MAIL and RCPT: 7% of delivery's loop.
PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


async def _mail(smtp: aiosmtplib.SMTP, sender: str) -> aiosmtplib.SMTPResponse:
    """MAIL FROM, as `smtp.mail` sends it; a plain address (or `<>`) without its parser. The
    session has had its EHLO (`_start_session`), which `smtp.mail` would otherwise send."""
    if sender and not PLAIN_ADDRESS.fullmatch(sender):
        return await smtp.mail(sender)
    response = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">")
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
    return response


async def _rcpt(smtp: aiosmtplib.SMTP, recipient: str) -> aiosmtplib.SMTPResponse:
    """RCPT TO, as `smtp.rcpt` sends it; a plain address without its parser."""
    if not PLAIN_ADDRESS.fullmatch(recipient):
        return await smtp.rcpt(recipient)
    response = await smtp.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
    if response.code not in (
        aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward
    ):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
    return response


class _SessionFailed(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def tls_context(mode: TlsMode, ca_file: str | None) -> ssl.SSLContext:
    """Opportunistic TLS encrypts without checking the certificate (RFC 7435); `verify` checks
    the chain and the MX name."""
    if mode in ("verify", "implicit"):
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(slots=True)
class _Session:
    """An open, greeted (and, per policy, encrypted and authenticated) SMTP session."""

    smtp: aiosmtplib.SMTP
    tls: str | None
    messages: int = 0  # transactions it has carried


@dataclass(frozen=True, slots=True)
class _Key:
    """What a cached session may be reused for: the same host, address, port and policy."""

    host: str
    address: str
    port: int
    policy: SessionPolicy


class _StaleSession(Exception):
    """A cached session was gone before it carried anything of this message."""


class ConnectionCache:
    """Open sessions kept for further messages to the same host (Postfix's connection cache).

    A session goes back into the cache only after a transaction that ended cleanly — never after
    a timeout, a lost connection or a reply that ended the session — and only until it has
    carried `reuse_limit` messages. It is closed (QUIT) when nobody took it for `idle_timeout`
    seconds, when `max_idle` sessions are already waiting, or at `close()`. A session is used by
    one attempt at a time: the engine's per-destination limits count attempts, and a cached
    session waits only while no attempt holds it.
    """

    def __init__(self, *, reuse_limit: int, idle_timeout: float, max_idle: int) -> None:
        self._reuse_limit = reuse_limit
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        #: Each key's waiting sessions, with the loop time each was checked in.
        self._idle: dict[_Key, list[tuple[_Session, float]]] = {}
        self._count = 0
        self._closing: set[asyncio.Task[None]] = set()
        # One sweep closes the sessions idle too long, run every quarter of the idle timeout
        # while any waits (so one closes up to a quarter late): a timer per check-in, armed and
        # cancelled for every message delivered, cost more than the sweep.
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        """Sessions waiting in the cache now."""
        return self._count

    def checkout(self, key: _Key) -> _Session | None:
        """A cached session for `key` (it is the caller's now), or None."""
        waiting = self._idle.get(key)
        while waiting:
            session, _ = waiting.pop()
            self._count -= 1
            if session.smtp.is_connected:
                return session
            session.smtp.close()
        self._idle.pop(key, None)
        return None

    def checkin(self, key: _Key, session: _Session) -> bool:
        """Keep `session` for the next message to `key`; False if it must be closed instead."""
        if (
            session.messages >= self._reuse_limit
            or self._count >= self._max_idle
            or not session.smtp.is_connected
        ):
            return False
        loop = asyncio.get_running_loop()
        self._idle.setdefault(key, []).append((session, loop.time()))
        self._count += 1
        if self._sweep is None:
            self._sweep = loop.call_later(self._idle_timeout / 4, self._expire)
        return True

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        since = loop.time() - self._idle_timeout
        for key in list(self._idle):
            kept = []
            for session, at in self._idle[key]:
                if at > since:
                    kept.append((session, at))
                else:
                    self._count -= 1
                    self._quit(session)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        self._sweep = loop.call_later(self._idle_timeout / 4, self._expire) if self._count else None

    def _quit(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(_quit(session.smtp), name="smtp quit")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Say QUIT on every cached session and forget them (the engine's stop)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for waiting in self._idle.values():
            for session, _ in waiting:
                self._quit(session)
        self._idle.clear()
        self._count = 0
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit(timeout=_QUIT_TIMEOUT)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


async def send(
    envelope: Envelope,
    host: str,
    address: str,
    port: int,
    policy: SessionPolicy,
    cache: ConnectionCache | None = None,
) -> SessionResult:
    """Run the transaction(s) for `envelope` against `address` (which is `host`'s).

    With a `cache`, a session left open by an earlier message to the same host is used first,
    and this one is left open for the next message when it ended cleanly.
    """
    key = _Key(host, address, port, policy)
    where = f"{host}[{address}]:{port}"
    if cache is not None and (session := cache.checkout(key)) is not None:
        try:
            return await _run(session, envelope, key, where, cache)
        except _StaleSession:
            pass  # the server had closed it while it waited: a new session, as if none were kept
    opened = await _open(key, where)
    if isinstance(opened, SessionResult):
        return opened
    return await _run(opened, envelope, key, where, cache)


async def _open(key: _Key, where: str) -> _Session | SessionResult:
    """Connect, greet, STARTTLS and AUTH per policy; a failure result when that fails."""
    policy = key.policy
    implicit = policy.tls == "implicit"
    smtp = aiosmtplib.SMTP(
        hostname=key.address,
        port=key.port,
        local_hostname=policy.local_hostname,
        source_address=(policy.source_address, 0) if policy.source_address else None,
        timeout=policy.timeouts.command,
        use_tls=implicit,
        start_tls=False,
        tls_context=tls_context(policy.tls, policy.tls_ca_file) if implicit else None,
    )
    try:
        await smtp.connect(timeout=policy.timeouts.connect)
    except aiosmtplib.SMTPConnectResponseError as exc:
        return _failed_at(key, make_reply(exc.code, exc.message))
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        return _failed_at(key, Reply(451, "4.4.1", f"connect to {where} failed: {exc}"))
    tls: str | None = _tls_version(smtp) if implicit else None
    try:
        tls = await _start_session(smtp, key.host, where, policy) or tls
    except BaseException as exc:
        smtp.close()
        if isinstance(exc, Exception) and (reply := _session_failure(exc, where)) is not None:
            return _failed_at(key, reply, tls)
        raise
    return _Session(smtp, tls)


async def _run(
    session: _Session, envelope: Envelope, key: _Key, where: str, cache: ConnectionCache | None
) -> SessionResult:
    """The transactions of one message on an open session; then keep it or close it."""
    smtp = session.smtp
    is_kept = False
    try:
        replies, at_rcpt, is_clean = await _transactions(
            smtp, envelope, key.policy.timeouts, is_reused=session.messages > 0
        )
        session.messages += 1
        if cache is not None and not is_clean:
            # A transaction was left open (no recipient accepted, or DATA refused): RSET first.
            try:
                await smtp.rset()
                is_clean = True
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                pass
        is_kept = cache is not None and is_clean and cache.checkin(key, session)
        if not is_kept:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                pass
        return SessionResult(
            key.host, key.address, replies, tls=session.tls, at_rcpt=frozenset(at_rcpt)
        )
    except Exception as exc:
        if (reply := _session_failure(exc, where)) is None:
            raise
        return _failed_at(key, reply, session.tls)
    finally:
        if not is_kept:
            smtp.close()


def _session_failure(exc: Exception, where: str) -> Reply | None:
    """The reply standing for every recipient when the session failed; None: not ours."""
    if isinstance(exc, _SessionFailed):
        return exc.reply
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return make_reply(exc.code, exc.message)
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPException | OSError):
        # A timeout or a lost connection: the connection is dropped, never reused.
        return Reply(451, "4.4.2", f"{where} lost the connection: {exc}")
    return None


def _failed_at(key: _Key, reply: Reply, tls: str | None = None) -> SessionResult:
    return SessionResult(host=key.host, address=key.address, replies={}, failure=reply, tls=tls)


async def _start_session(
    smtp: aiosmtplib.SMTP, host: str, where: str, policy: SessionPolicy
) -> str | None:
    """EHLO, STARTTLS per policy, AUTH when configured; the TLS version in use, if any."""
    await smtp.ehlo()
    tls: str | None = None
    if policy.tls != "implicit":
        if smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(
                    server_hostname=host,
                    tls_context=tls_context(policy.tls, policy.tls_ca_file),
                    timeout=policy.timeouts.command,
                )
            except aiosmtplib.SMTPResponseException as exc:
                if policy.tls != "opportunistic":
                    raise _SessionFailed(
                        Reply(451, "4.7.5", f"{where} refused STARTTLS: {exc.code} {exc.message}")
                    ) from None
                # Opportunistic: the server declined; the session goes on in plaintext.
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                raise _SessionFailed(
                    Reply(451, "4.7.5", f"TLS handshake with {where} failed: {exc}")
                ) from None
            else:
                tls = _tls_version(smtp)
                await smtp.ehlo()
        elif policy.tls in ("required", "verify"):
            raise _SessionFailed(
                Reply(451, "4.7.4", f"TLS is required, but {where} does not offer STARTTLS")
            )
    if policy.username:
        try:
            await smtp.login(policy.username, policy.password or "")
        except aiosmtplib.SMTPResponseException as exc:
            # A refused login is our configuration's problem, not the message's: defer.
            reply = make_reply(exc.code, exc.message)
            raise _SessionFailed(
                Reply(454, "4.7.0", f"authentication to {where} failed: {reply.code} "
                      f"{reply.enhanced or ''} {reply.text}".replace("  ", " "))
            ) from None
        except aiosmtplib.SMTPException as exc:
            raise _SessionFailed(Reply(454, "4.7.0", f"AUTH with {where}: {exc}")) from None
    return tls


@dataclass(frozen=True, slots=True)
class _Exchange:
    """The replies of one transaction: MAIL's, each RCPT's, and the outcome of the message —
    DATA's refusal or the reply after the final dot — when any recipient was accepted."""

    mail: aiosmtplib.SMTPResponse
    rcpts: list[aiosmtplib.SMTPResponse]
    final: aiosmtplib.SMTPResponse | None


def _accepts(response: aiosmtplib.SMTPResponse) -> bool:
    return response.code in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward)


async def _transactions(
    smtp: aiosmtplib.SMTP, envelope: Envelope, timeouts: Timeouts, *, is_reused: bool = False
) -> tuple[dict[int, Reply], set[int], bool]:
    """Each recipient's reply, those answered at RCPT, and whether no transaction is left open.

    On a reused session, a first MAIL that finds the connection gone (or a `421`: the server
    is closing it) raises `_StaleSession`: nothing of the message was sent yet.
    """
    replies: dict[int, Reply] = {}
    at_rcpt: set[int] = set()
    pending: Sequence[tuple[int, str]] = envelope.recipients
    is_clean = True
    pipelined = smtp.supports_extension("pipelining") and all(
        PLAIN_ADDRESS.fullmatch(address)
        for address in (envelope.mail_from or "a@a", *(email for _, email in pending))
    )
    while pending:
        try:
            exchange = await (_pipelined if pipelined else _one_by_one)(
                smtp, envelope.mail_from, pending, envelope.content, timeouts
            )
        except _GoneAtMail as gone:
            if is_reused and not replies:
                raise _StaleSession() from gone.cause
            raise gone.cause from None
        mail = exchange.mail
        if mail.code != aiosmtplib.SMTPStatus.completed:
            if is_reused and not replies and mail.code == 421:
                raise _StaleSession()
            if replies:  # a later transaction: its recipients get the refusal
                for rid, _ in pending:
                    replies[rid] = make_reply(mail.code, mail.message)
                return replies, at_rcpt, is_clean
            raise _SessionFailed(make_reply(mail.code, mail.message))
        accepted: list[int] = []
        too_many: list[tuple[int, str]] = []
        for (rid, email), resp in zip(pending, exchange.rcpts, strict=True):
            replies[rid] = make_reply(resp.code, resp.message)
            if _accepts(resp):
                at_rcpt.discard(rid)
                accepted.append(rid)
            else:
                at_rcpt.add(rid)
                if resp.code == 552:
                    too_many.append((rid, email))
        is_clean = False
        if accepted and exchange.final is not None:
            final = make_reply(exchange.final.code, exchange.final.message)
            # Refused at DATA or after the final dot: which one is not told, so RSET.
            is_clean = exchange.final.code == aiosmtplib.SMTPStatus.completed
            # The reply after the final dot is every accepted recipient's outcome.
            for rid in accepted:
                replies[rid] = final
        if not accepted or not too_many:
            break  # no progress: what is left keeps its 552 (deferred: see outcome.classify)
        pending = too_many
    return replies, at_rcpt, is_clean


async def _one_by_one(
    smtp: aiosmtplib.SMTP, sender: str, recipients: Sequence[tuple[int, str]], content: bytes,
    timeouts: Timeouts,
) -> _Exchange:
    """One transaction, each command waiting for its reply; DATA only if a recipient was
    accepted. Refusals are replies; a lost connection or a timeout raises (`_GoneAtMail` when
    MAIL met it)."""
    try:
        mail = await _mail(smtp, sender)
    except aiosmtplib.SMTPSenderRefused as exc:
        return _Exchange(aiosmtplib.SMTPResponse(exc.code, exc.message), [], None)
    except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:
        raise _GoneAtMail(exc) from exc
    rcpts = []
    for _, email in recipients:
        try:
            rcpts.append(await _rcpt(smtp, email))
        except aiosmtplib.SMTPRecipientRefused as exc:
            rcpts.append(aiosmtplib.SMTPResponse(exc.code, exc.message))
    if not any(_accepts(r) for r in rcpts):
        return _Exchange(mail, rcpts, None)
    try:
        final = await smtp.data(content, timeout=timeouts.data)
    except aiosmtplib.SMTPDataError as exc:
        final = aiosmtplib.SMTPResponse(exc.code, exc.message)
    return _Exchange(mail, rcpts, final)


class _GoneAtMail(Exception):
    """The connection was lost (or timed out) before MAIL's reply: nothing of the message has
    been accepted, so a session that waited in the cache may simply have gone stale."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _pipelined(
    smtp: aiosmtplib.SMTP, sender: str, recipients: Sequence[tuple[int, str]], content: bytes,
    timeouts: Timeouts,
) -> _Exchange:
    """One transaction with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write,
    then the message after DATA's `354`. Plain addresses only (`PLAIN_ADDRESS`): their paths
    are written as `_mail` and `_rcpt` write them.

    aiosmtplib reads one reply per command it sent and drops what comes before it asks, so
    while the commands are out the transport's protocol is `_Replies`, which reads every reply
    in order, and aiosmtplib's protocol gets the transport back for what follows (RSET, QUIT).
    """
    transport = smtp.transport
    if transport is None or transport.is_closing():
        raise _GoneAtMail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
    previous = transport.get_protocol()
    replies = _Replies(previous)
    transport.set_protocol(replies)
    write = cast(asyncio.WriteTransport, transport).write
    at_mail = True  # nothing has been answered yet: a lost connection may be a stale session
    try:
        # One deadline, moved on for the reply after the final dot, on the shared timer.
        async with Deadline(timeouts.command) as deadline:
            commands = [b"MAIL FROM:<" + sender.encode("ascii") + b">"]
            commands.extend(b"RCPT TO:<" + email.encode("ascii") + b">" for _, email in recipients)
            commands.append(b"DATA")
            waiting = [replies.expect() for _ in commands]
            write(b"\r\n".join(commands) + b"\r\n")
            mail = await waiting[0]
            at_mail = False
            rcpts = [await w for w in waiting[1:-1]]
            data = await waiting[-1]
            if data.code != aiosmtplib.SMTPStatus.start_input:
                return _Exchange(mail, rcpts, data)
            final = replies.expect()
            deadline.move_to(asyncio.get_running_loop().time() + timeouts.data)
            if mail.code != aiosmtplib.SMTPStatus.completed or not any(map(_accepts, rcpts)):
                # DATA should have been refused with no recipient (RFC 2920 §3.1): end it empty.
                write(b".\r\n")
                await final
                return _Exchange(mail, rcpts, None)
            # Intake stored the content with CRLF line endings (normalised once, DESIGN), which
            # aiosmtplib's data() would normalise again; only its dot-stuffing is needed.
            body = content
            if body.startswith(b".") or b"\n." in body:
                body = PERIOD_REGEX.sub(b"..", body)
            if not body.endswith(b"\r\n"):
                body += b"\r\n"
            write(body + b".\r\n")
            return _Exchange(mail, rcpts, await final)
    except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:  # TimeoutError is an OSError
        if at_mail:
            raise _GoneAtMail(exc) from exc
        raise
    finally:
        if not transport.is_closing() and transport.get_protocol() is replies:
            transport.set_protocol(previous)
        replies.forget()


class _Replies(asyncio.Protocol):
    """SMTP replies, in order, to commands written together; the transport's protocol only while
    a pipelined transaction runs. A lost connection is passed on to the protocol it stands in
    for, so that the aiosmtplib session knows it is closed."""

    def __init__(self, previous: asyncio.BaseProtocol) -> None:
        self._previous = previous
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._waiting: deque[asyncio.Future[aiosmtplib.SMTPResponse]] = deque()
        self._lines: list[bytes] = []
        self._size = 0  # of the reply being read, in bytes

    def expect(self) -> asyncio.Future[aiosmtplib.SMTPResponse]:
        future: asyncio.Future[aiosmtplib.SMTPResponse] = self._loop.create_future()
        self._waiting.append(future)
        return future

    def forget(self) -> None:
        """The transaction is over: nobody awaits what is still expected."""
        for future in self._waiting:
            if not future.done():
                future.cancel()
        self._waiting.clear()

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if not self._line(line):
                return
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))

    def _line(self, line: bytes) -> bool:
        """Take one reply line; False once the replies can no longer be read."""
        try:
            code = int(line[:3])
        except ValueError:
            text = line.decode("utf-8", "replace").strip()
            self._fail(
                aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
            )
            return False
        self._lines.append(line[4:].strip(b" \t\r\n"))
        self._size += len(line)
        if self._size > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return False
        if line[3:4] == b"-":
            return True
        message = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
        self._lines, self._size = [], 0
        if not self._waiting:  # a reply nobody asked for: the session is out of step
            self._fail(aiosmtplib.SMTPResponseException(-1, f"Unexpected reply: {code}"))
            return False
        future = self._waiting.popleft()
        if not future.done():
            future.set_result(aiosmtplib.SMTPResponse(code, message))
        return True

    def _fail(self, exc: Exception) -> None:
        for future in self._waiting:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a later reply may never be awaited
        self._waiting.clear()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._previous.connection_lost(exc)



def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    return None if ssl_object is None else str(ssl_object.version())
