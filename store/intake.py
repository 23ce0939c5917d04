"""Intake: the one operation both front doors call to accept a message (Postfix's cleanup).

Owns every rule that must hold for each message whatever door it came through: line endings
normalised to CRLF once (so the bytes signed later are the bytes sent), size and recipient limits,
the sender domains a key is restricted to (envelope sender, From: and Sender: alike), the
message stored once with its tags, metadata and schedule, one delivery unit per recipient, an
`email.queued` (or `email.scheduled`) event per recipient and the idempotency key's row — all in
one writer job, so the caller's `250`/`202` follows the commit that holds them. A batch is a few
large writer jobs, each message refused alone (a refusal comes before its first write).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import idna

from store import idempotency
from store.crypto import BODY, Sealer
from store.errors import IdempotencyConflict, PolicyRejected, StoreError
from store.events import append_events
from store.headers import HeaderFields, read_fields
from store.ids import new_id
from store.records import (
    Accepted,
    EventType,
    NewEvent,
    RecipientStatus,
    Submission,
    SuppressionReason,
    Tag,
    derive_message_status,
    format_time,
)
from store.sql import Q
from store.writer import Writer

logger = logging.getLogger(__name__)

#: Messages per writer job in a batch: large enough to make commits cheap, small enough that
#: other writers (delivery results, single sends) get a turn between the jobs.
BATCH_JOB_SIZE = 1000

# A message without an empty line has no body; its header cannot sensibly be longer than this.
_HEADERLESS_SCAN = 1024 * 1024
#: The header fields intake reads: the author (sender domains, the listing) and the subject.
_FIELDS = ("From", "Sender", "Subject")
_INTAKE_EVENTS = {
    RecipientStatus.QUEUED: EventType.EMAIL_QUEUED,
    RecipientStatus.SCHEDULED: EventType.EMAIL_SCHEDULED,
    RecipientStatus.SUPPRESSED: EventType.EMAIL_SUPPRESSED,
}


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_message_size: int
    max_recipients: int
    idempotency_ttl: float = 86400.0
    #: Encrypts the stored body when `storage.encryption_key` is set (store/crypto.py).
    sealer: Sealer = field(default_factory=Sealer)
    #: Refuse mail whose From: domain was not added as a sending domain (`policy` settings).
    require_configured_domain: bool = False
    #: `retention.store_content`: false drops the body of a message final at intake at once.
    store_content: bool = True


# IDNA encoding costs tens of microseconds and the same few domains come again and again (a
# batch of 10,000 to one domain): remember the last few thousand.
@functools.lru_cache(maxsize=4096)
def normalise_domain(domain: str) -> str:
    """A domain as stored and compared: ASCII (IDNA 2008, UTS 46), lower case, no trailing dot.

    Raises ValueError for a name that is not a valid domain.
    """
    name = domain.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"{domain!r} is not a valid domain: {exc}") from None


def _sender_domain(address: str) -> str:
    domain = address.rpartition("@")[2]
    try:
        return normalise_domain(domain)
    except ValueError:
        return domain.lower()


def _header_addresses(headers: HeaderFields, name: str) -> list[str]:
    """The addr-specs of every `name:` field (a repeated field counts each time); [] if none.

    An address that does not parse comes back as it was written, so that it names no allowed
    domain instead of being skipped.
    """
    found: list[str] = []
    for value in headers.get_all(name) or ():
        try:
            addresses = tuple(getattr(value, "addresses", ()))
        except Exception:  # noqa: BLE001 - an unparsable field names no allowed domain
            found.append(str(value))
            continue
        found.extend(a.addr_spec for a in addresses)
    return found


def check_sender(submission: Submission, headers: HeaderFields) -> None:
    """A key restricted to sender domains may use only those: MAIL FROM, From: and Sender:.

    Every From: and Sender: field counts, not only the first: a second field is what a receiver
    may display (RFC 5322 §3.6 allows one of each, and a forger sends two).
    """
    principal = submission.principal
    if principal is None or not principal.sender_domains:
        return
    domains = []
    if submission.mail_from:
        domains.append((_sender_domain(submission.mail_from), "from"))
    authors = _header_addresses(headers, "From")
    if not authors:
        raise PolicyRejected(
            "sender_not_allowed", "this API key requires a From: address in its domains", "from"
        )
    domains.extend((_sender_domain(a), "from") for a in authors)
    domains.extend((_sender_domain(a), "sender") for a in _header_addresses(headers, "Sender"))
    for domain, field_name in domains:
        if not principal.may_send_from(domain):
            raise PolicyRejected(
                "sender_not_allowed",
                f"this API key may not send from {domain}; allowed: "
                + ", ".join(principal.sender_domains),
                field_name,
            )


def from_domains(headers: HeaderFields) -> list[str]:
    """The domains of the From: addresses (ASCII, lower case), in order."""
    try:
        addresses = tuple(getattr(headers["From"], "addresses", ()))
    except Exception:  # noqa: BLE001 - an unparsable From: names no domain
        addresses = ()
    return [_sender_domain(a.addr_spec) for a in addresses if "@" in a.addr_spec]


def check_configured_domain(conn: sqlite3.Connection, domains: Sequence[str]) -> None:
    """Only sending domains added with `domains add` may appear in From: (policy.*)."""
    if not domains:
        raise PolicyRejected(
            "domain_not_configured", "the message has no From: address with a domain", "from"
        )
    for domain in dict.fromkeys(domains):
        if conn.execute(Q["domain_configured"], {"name": domain}).fetchone() is None:
            raise PolicyRejected(
                "domain_not_configured",
                f"{domain} is not a configured sending domain (add it with `postroom domains add`)",
                "from",
            )


def attribute_data(tags: Sequence[Tag], metadata: Mapping[str, str]) -> dict[str, object]:
    """The tags and metadata every event of a message carries."""
    return {"tags": [t.to_json() for t in tags], "metadata": dict(metadata)}


def normalise_line_endings(content: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF (a bare CR breaks DKIM: dkimpy and SMTP disagree on it).

    Counting first costs no memory, and content that is CRLF throughout (the usual case) is not
    copied; otherwise three `replace` passes peak near 3x the size, where a regex substitution
    over a 50 MB message of short lines peaked near 5x.
    """
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf and content.count(b"\n") == crlf:
        return content
    return content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def header_block(content: bytes) -> bytes:
    """The header of CRLF-normalised content: parsing the whole message for two header fields
    decoded and copied all of it several times (about 8x its size)."""
    end = content.find(b"\r\n\r\n")
    return content[: end + 2] if end >= 0 else content[:_HEADERLESS_SCAN]


def domain_of(address: str) -> str:
    """The destination of an address: its domain in lower case, without a trailing dot."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise PolicyRejected("invalid_recipient", f"{address!r} is not an email address", "to")
    return domain.rstrip(".").lower()


def _header(headers: HeaderFields, name: str) -> str:
    try:
        return headers.text(name)[:998]
    except Exception:  # noqa: BLE001 - a malformed header is shown as absent, never fatal
        return ""


def prepare(submission: Submission, limits: IntakeLimits) -> tuple[bytes, list[tuple[str, str]]]:
    """Check a submission against policy; return its normalised bytes and (address, domain)s."""
    if not submission.recipients:
        raise PolicyRejected("validation_error", "at least one recipient is required", "to")
    if len(submission.recipients) > limits.max_recipients:
        raise PolicyRejected(
            "too_many_recipients",
            f"at most {limits.max_recipients} recipients per message",
            "to",
        )
    content = normalise_line_endings(submission.content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if len(content) > limits.max_message_size:
        raise PolicyRejected(
            "message_too_large",
            f"the message is larger than {limits.max_message_size} bytes",
            "content",
        )
    seen: set[str] = set()
    units = []
    for address in submission.recipients:
        key = address.lower()
        if key in seen:  # one unit per distinct recipient
            continue
        seen.add(key)
        units.append((address, domain_of(address)))
    return content, units


def _job(submission: Submission, limits: IntakeLimits) -> _AcceptJob:
    content, units = prepare(submission, limits)
    headers = read_fields(header_block(content), _FIELDS)
    check_sender(submission, headers)
    return _AcceptJob(
        id=new_id("msg"),
        submission=submission,
        content=content,
        body=limits.sealer.seal(content, BODY),
        units=units,
        from_header=_header(headers, "From"),
        subject=_header(headers, "Subject"),
        idempotency_ttl=limits.idempotency_ttl,
        # The sending-domain policy keeps clients from sending as domains the operator never
        # added; a bounce is the MTA's own mail from MAILER-DAEMON@server.hostname, which must
        # go out whether that host name was added or not (RFC 5321 §4.5.5, §6.1: a non-delivery
        # report is owed to the sender), as Postfix's bounce(8) never passes through policy.
        from_domains=(
            tuple(from_domains(headers))
            if limits.require_configured_domain and not submission.is_system
            else None
        ),
        store_content=limits.store_content,
    )


def _log_accepted(job: _AcceptJob, stored: _Stored) -> None:
    """One line per recipient, after the commit (Postfix style: queue id first)."""
    sub = job.submission
    for (email, _), status in zip(job.units, stored.statuses, strict=True):
        logger.info(
            "%s: from=<%s> to=<%s> source=%s status=%s",
            stored.accepted.id, sub.mail_from, email, sub.source.value, status.value,
        )


async def accept(writer: Writer, submission: Submission, limits: IntakeLimits) -> Accepted:
    """Check, store and commit one message; return only after the commit (then ack it)."""
    job = _job(submission, limits)
    stored = await writer.run(job)
    _log_accepted(job, stored)
    return stored.accepted


async def accept_many(
    writer: Writer, submissions: Sequence[Submission], limits: IntakeLimits
) -> list[Accepted | StoreError]:
    """Check and store many messages, each accepted or refused on its own, in request order.

    The accepted ones are committed in a few large writer jobs (not one commit per message);
    every result is returned only after the commit that holds it.
    """
    results: list[Accepted | StoreError | None] = [None] * len(submissions)
    chunks: list[list[tuple[int, _AcceptJob]]] = []
    commits: list[asyncio.Future[list[_Stored | StoreError]]] = []
    for start in range(0, len(submissions), BATCH_JOB_SIZE):
        if commits:  # let the loop's other work in between: a chunk takes milliseconds
            await asyncio.sleep(0)
        chunk = []
        for index in range(start, min(start + BATCH_JOB_SIZE, len(submissions))):
            try:
                chunk.append((index, _job(submissions[index], limits)))
            except PolicyRejected as exc:
                results[index] = exc
        if not chunk:
            continue
        # Queued at once, not when a task would start: the writer stores this chunk while the
        # next one is prepared here.
        try:
            commits.append(writer.submit(_BatchJob(tuple(job for _, job in chunk))))
        except StoreError as exc:
            commits.append(_failed(exc))
        chunks.append(chunk)
    # Futures already, so gather wraps none of them in a task (not even a single send's one).
    outcomes = await asyncio.gather(*commits, return_exceptions=True)
    for chunk, outcome in zip(chunks, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, StoreError):
                raise outcome
            for index, _ in chunk:
                results[index] = outcome
            continue
        for (index, job), result in zip(chunk, outcome, strict=True):
            if isinstance(result, _Stored):
                _log_accepted(job, result)
                results[index] = result.accepted
            else:
                results[index] = result
    return [r if r is not None else StoreError() for r in results]


def _failed(error: StoreError) -> asyncio.Future[list[_Stored | StoreError]]:
    future: asyncio.Future[list[_Stored | StoreError]] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _reason(value: str) -> SuppressionReason:
    try:
        return SuppressionReason(value)
    except ValueError:  # an unknown (older) reason blocks everything, like a manual entry
        return SuppressionReason.MANUAL


@dataclass(frozen=True, slots=True)
class _Stored:
    """What an accept job stored: the answer, and each unit's status (for the log lines)."""

    accepted: Accepted
    statuses: tuple[RecipientStatus, ...]


def _store_together(
    conn: sqlite3.Connection, jobs: Sequence[_AcceptJob | _BatchJob]
) -> list[object]:
    """Neighbouring accept jobs of one group commit, stored as one (the writer's `joint`): a
    `_BatchJob`'s result is its list, an `_AcceptJob`'s its `_Stored` or its refusal."""
    flat = [one for job in jobs for one in (job.jobs if isinstance(job, _BatchJob) else (job,))]
    stored = _store(conn, flat)
    out: list[object] = []
    at = 0
    for job in jobs:
        if isinstance(job, _BatchJob):
            out.append(stored[at : at + len(job.jobs)])
            at += len(job.jobs)
        else:
            out.append(stored[at])
            at += 1
    return out


@dataclass(frozen=True, slots=True)
class _BatchJob:
    """Many accept jobs in one writer job, each message refused alone (see `_store`)."""

    jobs: tuple[_AcceptJob, ...]

    def __call__(self, conn: sqlite3.Connection) -> list[_Stored | StoreError]:
        return _store(conn, self.jobs)

    joint = staticmethod(_store_together)


@dataclass(frozen=True, slots=True)
class _AcceptJob:
    """A message ready to store: the writer job for one message (`_store` of one)."""

    id: str
    submission: Submission
    content: bytes
    body: bytes  # as stored: sealed when encryption at rest is on
    units: list[tuple[str, str]]
    from_header: str
    subject: str
    idempotency_ttl: float
    #: Set when the sending-domain policy applies: the From: domains to check.
    from_domains: tuple[str, ...] | None = None
    store_content: bool = True

    def __call__(self, conn: sqlite3.Connection) -> _Stored:
        [result] = _store(conn, (self,))
        if isinstance(result, StoreError):
            raise result
        return result

    joint = staticmethod(_store_together)


def _store(conn: sqlite3.Connection, jobs: Sequence[_AcceptJob]) -> list[_Stored | StoreError]:
    """Store messages, their units and their events; each message refused alone.

    No savepoint per message: a message is refused (PolicyRejected, IdempotencyConflict) only
    before its first write. Every check and read comes first, then its idempotency key (whose
    insert either writes its row or refuses); the messages that pass are then written together,
    a few statements for all of them (a savepoint per message made SQLite copy ~20 pages a
    message into a statement journal, and each statement per message cost the writer ~10 us).
    """
    now = time.time()
    results: list[_Stored | StoreError] = []
    kept: list[tuple[_AcceptJob, _Stored]] = []
    everyone = {email.lower() for job in jobs for email, _ in job.units}
    # Suppressed addresses are recorded, never delivered (DESIGN: intake owns this policy).
    # An unsubscribe blocks marketing mail only; bounces, complaints and manual entries block
    # everything.
    reasons = {
        r[0]: _reason(r[1])
        for r in conn.execute(
            Q["suppressions_among"], {"emails": json.dumps(sorted(everyone)), "now": now}
        )
    }
    for job in jobs:
        try:
            stored = _admit(conn, job, reasons, now)
        except (PolicyRejected, IdempotencyConflict) as exc:
            results.append(exc)
            continue
        results.append(stored)
        kept.append((job, stored))
    if kept:
        _write(conn, kept, now)
    return results


def _admit(
    conn: sqlite3.Connection,
    job: _AcceptJob,
    reasons: Mapping[str, SuppressionReason],
    now: float,
) -> _Stored:
    """A message's checks, statuses and idempotency key: the only writes before it may refuse."""
    sub = job.submission
    if job.from_domains is not None:
        check_configured_domain(conn, job.from_domains)
    scheduled = sub.scheduled_at is not None and sub.scheduled_at > now
    pending = RecipientStatus.SCHEDULED if scheduled else RecipientStatus.QUEUED
    statuses = []
    for email, _ in job.units:
        reason = reasons.get(email.lower())
        blocked = reason is not None and reason.blocks(sub.message_type)
        statuses.append(RecipientStatus.SUPPRESSED if blocked else pending)
    accepted = Accepted(id=job.id, created_at=now, status=derive_message_status(statuses))
    if sub.idempotency is not None:
        idempotency.record(
            conn, idempotency.scope_of(sub.principal), sub.idempotency, accepted,
            job.idempotency_ttl,
        )
    return _Stored(accepted, tuple(statuses))


def _write(
    conn: sqlite3.Connection, kept: Sequence[tuple[_AcceptJob, _Stored]], now: float
) -> None:
    """The admitted messages, their units and their events: one statement each kind.

    Each message's `seq` is given here, one past the largest (what SQLite itself picks for an
    INTEGER PRIMARY KEY), so that its units and events can name it without a statement each.
    """
    seq = conn.execute(Q["last_message_seq"]).fetchone()[0]
    messages: list[dict[str, object]] = []
    units: list[dict[str, object]] = []
    events: list[NewEvent] = []
    emptied: list[int] = []
    for job, stored in kept:
        seq += 1
        sub = job.submission
        scheduled = sub.scheduled_at is not None and sub.scheduled_at > now
        due_at = sub.scheduled_at if scheduled and sub.scheduled_at is not None else now
        attributes = attribute_data(sub.tags, sub.metadata)
        if scheduled:
            attributes["scheduled_at"] = format_time(due_at)
        if sub.principal is not None and sub.principal.is_test:
            attributes["test"] = True
        messages.append(
            {
                "seq": seq,
                "id": job.id,
                "now": now,
                "source": sub.source.value,
                "api_key_id": sub.principal.key_id if sub.principal else None,
                "mail_from": sub.mail_from,
                "from_header": job.from_header,
                "subject": job.subject,
                "size": len(job.content),
                "body": job.body,
                "tags": json.dumps(attributes["tags"]),
                "metadata": json.dumps(attributes["metadata"]),
                "message_type": sub.message_type.value,
                "scheduled_at": sub.scheduled_at,
            }
        )
        for (email, domain), status in zip(job.units, stored.statuses, strict=True):
            units.append(
                {
                    "message_seq": seq,
                    "email": email,
                    "domain": domain,
                    "status": status.value,
                    "priority": sub.priority.rank,
                    "due_at": None if status.is_final else due_at,
                    "now": now,
                }
            )
            events.append(
                NewEvent(
                    type=_INTAKE_EVENTS[status],
                    message_seq=seq,
                    recipient=email,
                    data={"message_id": job.id, "recipient": email, **attributes},
                )
            )
        if not job.store_content and all(s.is_final for s in stored.statuses):
            # Every recipient suppressed: final already, so `store_content = false` drops the
            # body in this transaction, as record_outcomes does for the last outcome.
            emptied.append(seq)
    conn.executemany(Q["insert_message"], messages)
    conn.executemany(Q["insert_recipient"], units)
    append_events(conn, events, now)
    for message_seq in emptied:
        conn.execute(Q["remove_content_if_finished"], {"seq": message_seq, "now": now})
