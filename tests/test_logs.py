"""Log lines: text or JSON, journald priorities instead of timestamps under systemd."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from config import Settings
from relay import logs
from relay.logs import JsonFormatter, TextFormatter, is_journal


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
