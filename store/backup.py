"""Online backups and integrity checks of the spool file.

Owns `backup()`: SQLite's backup API copies the whole database in one step from a connection of
its own, inside one read transaction — a consistent snapshot, while the serving process's writer
goes on committing to the WAL (readers never block the writer in WAL mode). The copy is written
beside the target, checked with `PRAGMA integrity_check`, switched to a self-contained rollback
journal and only then renamed into place, so a target path never holds a half-written backup.
Like the spool, a backup is readable by its owner alone (0600).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from store.db import create_private
from store.errors import StoreError


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int  # bytes
    messages: int


def backup(source: Path, target: Path, busy_timeout: float) -> BackupResult:
    """Copy the spool at `source` to a new file `target` (StoreError if it exists)."""
    if not source.exists():
        raise StoreError(f"no spool at {source}")
    if target.exists():
        raise StoreError(f"{target} exists: choose a new file for the backup")
    partial = target.with_name(target.name + ".partial")
    try:
        partial.unlink(missing_ok=True)
        create_private(partial)  # it holds what the spool holds, DKIM keys too: owner only
        src = sqlite3.connect(source, timeout=busy_timeout)
        try:
            src.execute("PRAGMA query_only=ON")
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one snapshot
                # One self-contained file: no -wal to forget when it is copied back.
                dst.execute("PRAGMA journal_mode=DELETE")
                problems = _problems(dst)
                messages = dst.execute("SELECT count(*) FROM messages").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
        if problems:
            raise StoreError(f"the backup failed its integrity check: {problems[0]}")
        os.replace(partial, target)
    except sqlite3.Error as exc:
        raise StoreError(f"backup failed ({source} to {target}): {exc}") from None
    except OSError as exc:
        raise StoreError(f"backup failed: cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return BackupResult(path=target, size=target.stat().st_size, messages=int(messages))


def check(path: Path, busy_timeout: float) -> list[str]:
    """`PRAGMA integrity_check` of a spool file: the problems found (empty: it is sound)."""
    if not path.exists():
        raise StoreError(f"no spool at {path}")
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout)
        try:
            conn.execute("PRAGMA query_only=ON")
            return _problems(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot check {path}: {exc}") from None


def _problems(conn: sqlite3.Connection) -> list[str]:
    rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else rows
