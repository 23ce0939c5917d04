"""Pure decisions about an attempt's result: what a reply means and when to try again.

Owns the classification of SMTP replies (2xx delivered, 4xx deferred, 5xx bounced; an enhanced
status code of class 4 defers whatever the basic code says) and the retry schedule. No I/O, no
clock of its own: callers pass `now`.
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


def classify(reply: Reply) -> RecipientStatus:
    """DELIVERED, DEFERRED or BOUNCED for a reply to RCPT or to the end of DATA."""
    if 200 <= reply.code < 300:
        return RecipientStatus.DELIVERED
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


def decide(
    recipient_id: int,
    attempts_before: int,
    reply: Reply,
    schedule: Sequence[float],
    now: float,
    details: Mapping[str, object] | None = None,
) -> Outcome:
    """The outcome to record for one recipient given the reply it got on this attempt.

    `details` (the host tried, its address, TLS) go into the event's data.
    """
    data = dict(details or {})
    status = classify(reply)
    due = None
    if status is RecipientStatus.DEFERRED:
        due = next_attempt(attempts_before + 1, schedule, now)
        if due is None:
            status = RecipientStatus.BOUNCED
            data["reason"] = "retries exhausted"
        else:
            data["next_attempt_at"] = format_time(due)
    return Outcome(recipient_id=recipient_id, status=status, reply=reply, due_at=due, data=data)
