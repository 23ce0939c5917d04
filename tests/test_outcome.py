"""Pure decisions: reply classification and the retry schedule, as tables of named cases."""

from __future__ import annotations

import pytest

from relay.outcome import classify, decide, make_reply, next_attempt, not_attempted
from store import RecipientStatus, Reply

SCHEDULE = [30.0, 300.0, 1800.0, 7200.0, 18000.0]


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        pytest.param(250, "2.0.0 Ok", RecipientStatus.DELIVERED, id="2xx delivered"),
        pytest.param(451, "4.3.0 Try later", RecipientStatus.DEFERRED, id="4xx deferred"),
        pytest.param(550, "5.1.1 No such user", RecipientStatus.BOUNCED, id="5xx bounced"),
        pytest.param(550, "4.7.1 Greylisted", RecipientStatus.DEFERRED, id="5xx with 4.x.x"),
        pytest.param(421, "Closing", RecipientStatus.DEFERRED, id="4xx without enhanced"),
        pytest.param(999, "what", RecipientStatus.DEFERRED, id="nonsense defers"),
    ],
)
def test_classify(code: int, text: str, status: RecipientStatus):
    assert classify(make_reply(code, text)) is status


def test_make_reply_splits_the_enhanced_code():
    assert make_reply(550, "5.1.1  No such\n user") == Reply(550, "5.1.1", "No such user")
    assert make_reply(250, "Ok") == Reply(250, None, "Ok")


@pytest.mark.parametrize(
    ("attempts", "due"),
    [(1, 1030.0), (2, 1300.0), (5, 19000.0), (6, None), (0, None)],
)
def test_retry_schedule(attempts: int, due: float | None):
    assert next_attempt(attempts, SCHEDULE, now=1000.0) == due


def test_sixth_failed_attempt_bounces():
    reply = Reply(451, "4.4.1", "connection refused")
    assert decide(1, 4, reply, SCHEDULE, 0.0).status is RecipientStatus.DEFERRED
    last = decide(1, 5, reply, SCHEDULE, 0.0)
    assert last.status is RecipientStatus.BOUNCED
    assert last.data["reason"] == "retries exhausted"
    assert last.due_at is None


@pytest.mark.parametrize(
    ("code", "text", "at_rcpt", "status"),
    [
        pytest.param(552, "5.5.3 Too many recipients", True, RecipientStatus.DEFERRED,
                     id="552 to RCPT defers"),
        pytest.param(552, "5.3.4 Message too big", False, RecipientStatus.BOUNCED,
                     id="552 after DATA bounces"),
    ],
)
def test_classify_552(code: int, text: str, at_rcpt: bool, status: RecipientStatus):
    assert classify(make_reply(code, text), at_rcpt) is status


@pytest.mark.parametrize(
    ("text", "suppress"),
    [
        ("5.1.1 No such user", True),
        ("5.1.10 Null MX", True),
        ("5.2.1 Mailbox disabled", True),
        ("5.7.1 Spam", False),
        ("5.3.4 Too big", False),
        ("5.6.0 Bad content", False),
        ("No enhanced code", False),
    ],
)
def test_only_recipient_caused_bounces_suppress(text: str, suppress: bool):
    assert decide(1, 0, make_reply(550, text), SCHEDULE, 0.0).suppress is suppress


def test_deferral_past_max_age_bounces():
    reply = Reply(451, "4.4.1", "connection refused")
    assert decide(1, 0, reply, SCHEDULE, 100.0, expires_at=200.0).status is RecipientStatus.DEFERRED
    late = decide(1, 0, reply, SCHEDULE, 200.0, expires_at=200.0)
    assert late.status is RecipientStatus.BOUNCED and late.data["reason"] == "message expired"
    assert not late.suppress


def test_a_unit_postroom_cannot_try_fails_for_good():
    outcome = not_attempted(7, "the stored message body is gone")
    assert outcome.status is RecipientStatus.FAILED and outcome.status.is_final
    assert outcome.due_at is None and not outcome.suppress
    assert outcome.reply == Reply(554, "5.3.0", "the stored message body is gone")
    assert outcome.data == {"reason": "the stored message body is gone"}
