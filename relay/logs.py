"""Log output: one line per record on stderr, as text or JSON, journald-aware, never a secret.

Owns the root handler `postroom serve` installs, its two formats (`log.format`), the level
(`server.log_level`), both changeable live on SIGHUP, and the loggers that must never go below
their floor whatever the root level: aiosmtpd's `mail.log` logs every command line at INFO and
message bodies and AUTH continuations at DEBUG (STYLE.md gotcha 10), aiosqlite logs rows at DEBUG.
Under systemd (`$JOURNAL_STREAM` names our stderr) the journal stamps the time itself, so lines
carry no timestamp but a `<N>` syslog priority prefix instead, which journald turns into the
entry's priority (`journalctl -p warning`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

from config import Settings

# Loggers that would print bodies, AUTH data or rows below these levels.
# httpx and httpcore log every request URL at INFO, and webhook URLs may carry credentials.
FLOORS = {
    "mail.log": logging.WARNING,
    "aiosqlite": logging.INFO,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
}

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}

_handler: logging.Handler | None = None


class TextFormatter(logging.Formatter):
    """`2026-11-23 18:05:00,123 INFO relay.delivery: msg_…: to=<…> …`, or for the journal
    `<6>relay.delivery: msg_…: to=<…> …`."""

    def __init__(self, *, journal: bool) -> None:
        fmt = "%(name)s: %(message)s"
        super().__init__(fmt if journal else "%(asctime)s %(levelname)s " + fmt)
        self.journal = journal
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _prefix(record, text) if self.journal else text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default stamp (local time, `,` and milliseconds), its date and time made once a
        second: one delivery logs one line, and `strftime` was a tenth of each."""
        second = int(record.created)
        if second != self._second:  # formatters run under their handler's lock
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601 UTC), level, logger, message and, if any, exc."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        text = json.dumps(data, ensure_ascii=False)
        return _prefix(record, text) if self.journal else text


class LoopHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `StreamHandler` that writes the lines an event loop logs together, not one by one.

    A record below WARNING logged on a running loop's thread is kept until that loop has run the
    callbacks already due (one `call_soon`), then written with the others of that pass in one
    write: a message accepted or delivered logs a line, and writing each one alone was a write
    call per line, a seventh of the service loop's time under HTTP load. Warnings and errors,
    and every record logged off a loop, are written at once, after what is kept, so the order
    stays the order of logging. What is kept is written at the latest when the loop gets to it,
    when `_MAX_KEPT` lines wait, or at exit (`logging.shutdown` flushes every handler): only a
    process killed outright (SIGKILL) can lose lines, those of its last loop pass.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._kept: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock here.
        try:
            text = self.format(record)
            if record.levelno < logging.WARNING and len(self._kept) < _MAX_KEPT:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    pass
                else:
                    if not self._kept:
                        loop.call_soon(self.flush)
                    self._kept.append(text)
                    return
            self._write_kept(text)
            super().flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._kept:
                self._write_kept()
            super().flush()

    def _write_kept(self, last: str | None = None) -> None:
        lines = self._kept
        if last is not None:
            lines.append(last)
        if lines:
            self._kept = []
            self.stream.write("\n".join(lines) + "\n")


#: At most this many lines wait for their loop pass to end (a 10,000-message batch is accepted
#: in one pass); the next line is written with them at once.
_MAX_KEPT = 1000


def _prefix(record: logging.LogRecord, text: str) -> str:
    priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
    # A traceback spans lines: journald reads each line as an entry, each needs its prefix.
    return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def flush() -> None:
    """Write what the installed handler keeps now: before the process writes to its own stdout
    or stderr by other means (the start-up banner), so a terminal shows both in the order they
    happened."""
    if _handler is not None:
        _handler.flush()


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal's socket (systemd.exec(5), $JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def formatter_for(settings: Settings, journal: bool) -> logging.Formatter:
    if settings.log.format == "json":
        return JsonFormatter(journal=journal)
    return TextFormatter(journal=journal)


def configure(settings: Settings, stream: TextIO | None = None) -> None:
    """Install the one handler on the root logger (replacing ours if there was one)."""
    global _handler
    stream = sys.stderr if stream is None else stream
    # Neither format shows the caller, thread or process: not gathering them for every record
    # is a fifth of a log line's cost (the logging HOWTO's "Optimization"). Three lines a
    # relayed message (client=, from=/to=, the delivery's status=) are that much cheaper.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    handler = LoopHandler(stream)
    handler.setFormatter(formatter_for(settings, is_journal(stream)))
    root.addHandler(handler)
    _handler = handler
    apply(settings)


def apply(settings: Settings) -> None:
    """Set the level and format of what `configure` installed (also on reload).

    Without `configure` (Postroom embedded, as in tests) logging belongs to the host program.
    """
    if not isinstance(_handler, logging.StreamHandler):
        return
    _handler.setFormatter(formatter_for(settings, is_journal(_handler.stream)))
    logging.getLogger().setLevel(settings.server.log_level)
    for name, floor in FLOORS.items():
        logging.getLogger(name).setLevel(max(floor, logging.getLogger().level))
