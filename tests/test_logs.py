"""Log lines: text or JSON, journald priorities instead of timestamps under systemd."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path

import pytest

from config import Settings
from relay import logs
from relay.logs import JsonFormatter, TextFormatter, is_journal
from store import NewSuppression
from tests.support import RawSmtp


def record(level: int = logging.INFO, message: str = "msg_1: to=<%s> status=%s",
           args: tuple[object, ...] = ("a@example.test", "delivered")) -> logging.LogRecord:
    return logging.LogRecord("relay.delivery", level, __file__, 1, message, args, None)


def test_json_lines_parse_and_carry_level_logger_message():
    line = JsonFormatter(journal=False).format(record())
    data = json.loads(line)
    assert data["level"] == "INFO" and data["logger"] == "relay.delivery"
    assert data["message"] == "msg_1: to=<a@example.test> status=delivered"
    assert data["time"].endswith("Z")


@pytest.mark.parametrize(
    ("level", "prefix"), [(logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>")]
)
def test_journal_lines_have_a_priority_and_no_timestamp(level: int, prefix: str):
    line = TextFormatter(journal=True).format(record(level))
    assert line == f"{prefix}relay.delivery: msg_1: to=<a@example.test> status=delivered"
    assert json.loads(JsonFormatter(journal=True).format(record(level))[3:])["message"]


def test_journal_is_detected_from_journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with (tmp_path / "stream").open("w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not is_journal(stream)
    assert not is_journal(io.StringIO())


def test_configure_writes_json_and_keeps_chatty_loggers_at_their_floor():
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    logs.configure(Settings(server={"log_level": "DEBUG"}, log={"format": "json"}), stream)
    try:
        logging.getLogger("relay.test").debug("hello %s", "there")
        logging.getLogger("mail.log").info("250 would be every command line")
        [line] = stream.getvalue().splitlines()
        assert json.loads(line)["message"] == "hello there"
        logs.apply(Settings(server={"log_level": "WARNING"}))  # what a reload does
        logging.getLogger("relay.test").info("not shown")
        logging.getLogger("relay.test").warning("shown as text")
        assert stream.getvalue().splitlines()[-1].endswith("WARNING relay.test: shown as text")
    finally:
        root.removeHandler(logs._handler)  # type: ignore[arg-type]
        logs._handler = None
        root.setLevel(level)


# -- one line per recipient transition, whatever door (a real Postroom) ----------------------------


def lines_of(caplog: pytest.LogCaptureFixture, message_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(message_id + ":")]


class _Writes(io.StringIO):
    """A stream that counts the writes made to it."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_a_loop_logs_are_written_together_in_order_and_none_is_lost():
    root = logging.getLogger()
    level = root.level
    stream = _Writes()
    logs.configure(Settings(server={"log_level": "INFO"}), stream)
    log = logging.getLogger("relay.test")
    try:
        for n in range(3):
            log.info("accepted %d", n)
        log.warning("a warning goes out at once, after the lines before it")
        log.info("accepted 3")
        log.info("accepted 4")
        assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
            "accepted 0", "accepted 1", "accepted 2",
            "a warning goes out at once, after the lines before it",
        ]
        assert stream.writes == 1  # the three lines and the warning: one write
        await asyncio.sleep(0)  # the loop's pass is over: what it logged is written
        assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()[4:]] == [
            "accepted 3", "accepted 4",
        ]
        assert stream.writes == 2
        log.info("kept until the handler is flushed, as logging.shutdown does at exit")
        logs._handler.flush()  # type: ignore[union-attr]
        assert stream.getvalue().splitlines()[-1].endswith("as logging.shutdown does at exit")
    finally:
        root.removeHandler(logs._handler)  # type: ignore[arg-type]
        logs._handler = None
        root.setLevel(level)


def test_lines_logged_off_a_loop_are_written_at_once():
    root = logging.getLogger()
    level = root.level
    stream = _Writes()
    logs.configure(Settings(server={"log_level": "INFO"}), stream)
    try:
        logging.getLogger("relay.test").info("from a thread with no loop")
        assert stream.getvalue().endswith("relay.test: from a thread with no loop\n")
    finally:
        root.removeHandler(logs._handler)  # type: ignore[arg-type]
        logs._handler = None
        root.setLevel(level)


async def test_acceptance_and_cancel_log_one_line_per_recipient(
    start, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    postroom = await start(smtp={"trusted_networks": ["127.0.0.0/8"]})
    await postroom.spool.add_suppressions([NewSuppression("gone@example.test")])
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        r = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": ["user@example.test", "gone@example.test"],
            "subject": "hi", "text": "Body-Marker-91c2",
        })
        assert r.status_code == 202, r.text
        api_id = r.json()["id"]
        r = await http.post("/v1/messages", json={
            "from": "app@acme.test", "to": "later@example.test", "subject": "later",
            "text": "x", "scheduled_at": "2030-01-31T09:00:00Z",
        })
        scheduled_id = r.json()["id"]
        assert (await http.delete(f"/v1/messages/{scheduled_id}")).status_code == 200
    async with await RawSmtp.open(postroom.smtp_port) as client:
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<cron@acme.test>")
        await client.command("RCPT TO:<user@example.test>")
        await client.command("DATA")
        reply = await client.command(b"Subject: s\r\n\r\nx\r\n.")
        smtp_id = reply.rsplit(" ", 1)[1]

    api_lines = lines_of(caplog, api_id)
    assert f"{api_id}: from=<app@acme.test> to=<user@example.test> source=api status=queued" \
        in api_lines
    assert f"{api_id}: from=<app@acme.test> to=<gone@example.test> source=api status=suppressed" \
        in api_lines
    assert lines_of(caplog, scheduled_id)[:2] == [
        f"{scheduled_id}: from=<app@acme.test> to=<later@example.test> source=api "
        "status=scheduled",
        f"{scheduled_id}: to=<later@example.test> status=cancelled",
    ]
    # SMTP: the session's line and the recipient's line, each once.
    smtp_lines = lines_of(caplog, smtp_id)
    assert smtp_lines.count(
        f"{smtp_id}: from=<cron@acme.test> to=<user@example.test> source=smtp status=queued"
    ) == 1
    assert [line for line in smtp_lines if "client=127.0.0.1 auth=-" in line] != []
    assert len([line for line in smtp_lines if "from=<" in line]) == 1
    assert key not in caplog.text and "Body-Marker-91c2" not in caplog.text
