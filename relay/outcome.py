"""Pure decisions about an attempt's result: what a reply means and when to try again.

Owns the classification of SMTP replies (2xx delivered, 4xx deferred, 5xx bounced; an enhanced
status code of class 4 defers whatever the basic code says, and so does `552` to RCPT), the retry
schedule with `delivery.max_age`, which bounces put the address on the suppression list, and the
`failed` outcome of a unit Postroom cannot try. No I/O, no clock of its own: callers pass `now`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from store import Outcome, RecipientStatus, Reply, format_time

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def make_reply(code: int, text: str) -> Reply:
    """A Reply with its enhanced status code (RFC 3463) split off the text, when it has one."""
    text = " ".join(text.split())
    if m := _ENHANCED.match(text):
        return Reply(code=code, enhanced=m.group(0), text=text[m.end() :].strip())
    return Reply(code=code, enhanced=None, text=text)


# Bounces caused by the recipient address itself (RFC 3463): bad mailbox, null MX, disabled
# mailbox. Policy and content refusals (5.7.x, 5.3.4, 5.6.x) say nothing about the address.
_RECIPIENT_CAUSED = frozenset({"5.1.1", "5.1.10", "5.2.1"})


def classify(reply: Reply, at_rcpt: bool = False) -> RecipientStatus:
    """DELIVERED, DEFERRED or BOUNCED for a reply to RCPT (`at_rcpt`) or to the end of DATA."""
    if 200 <= reply.code < 300:
        return RecipientStatus.DELIVERED
    if at_rcpt and reply.code == 552:
        # RFC 5321 §4.5.3.1.10: 552 to RCPT is "too many recipients"; clients treat it as 452.
        return RecipientStatus.DEFERRED
    if reply.enhanced is not None and reply.enhanced.startswith("4."):
        return RecipientStatus.DEFERRED
    if 400 <= reply.code < 500:
        return RecipientStatus.DEFERRED
    if 500 <= reply.code < 600:
        return RecipientStatus.BOUNCED
    # Anything else is a protocol violation by the peer: try again later.
    return RecipientStatus.DEFERRED


def next_attempt(attempts_done: int, schedule: Sequence[float], now: float) -> float | None:
    """When to try again after `attempts_done` failed attempts; None when the schedule is spent.

    With the default schedule (30 s, 5 min, 30 min, 2 h, 5 h) the 6th failed attempt bounces.
    """
    if attempts_done < 1 or attempts_done > len(schedule):
        return None
    return now + schedule[attempts_done - 1]


def is_recipient_caused(reply: Reply) -> bool:
    """A bounce that says the address itself is bad: it goes on the suppression list."""
    return reply.code >= 500 and reply.enhanced in _RECIPIENT_CAUSED


def decide(
    recipient_id: int,
    attempts_before: int,
    reply: Reply,
    schedule: Sequence[float],
    now: float,
    details: Mapping[str, object] | None = None,
    *,
    at_rcpt: bool = False,
    expires_at: float | None = None,
) -> Outcome:
    """The outcome to record for one recipient given the reply it got on this attempt.

    `details` (the host tried, its address, TLS) go into the event's data. A deferral after
    `expires_at` (the message's age reached `delivery.max_age`), or with the retry schedule
    spent, bounces instead.
    """
    data = dict(details or {})
    status = classify(reply, at_rcpt)
    due = None
    if status is RecipientStatus.DEFERRED:
        due = next_attempt(attempts_before + 1, schedule, now)
        if due is None:
            status = RecipientStatus.BOUNCED
            data["reason"] = "retries exhausted"
        elif expires_at is not None and now >= expires_at:
            status, due = RecipientStatus.BOUNCED, None
            data["reason"] = "message expired"
        else:
            data["next_attempt_at"] = format_time(due)
    elif status is RecipientStatus.BOUNCED:
        data["reason"] = "rejected"
    suppress = status is RecipientStatus.BOUNCED and is_recipient_caused(reply)
    return Outcome(
        recipient_id=recipient_id, status=status, reply=reply, due_at=due, data=data,
        suppress=suppress,
    )


def not_attempted(recipient_id: int, reason: str) -> Outcome:
    """The outcome when Postroom itself cannot try the recipient at all (its message body is
    gone, or the message cannot be signed): `failed`, final, never retried nor suppressed.

    No host was asked, so the reply is Postroom's own (`5.3.0`) and `reason` says why.
    """
    return Outcome(
        recipient_id=recipient_id, status=RecipientStatus.FAILED,
        reply=Reply(554, "5.3.0", reason), due_at=None, data={"reason": reason},
    )
