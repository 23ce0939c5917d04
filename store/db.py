"""Connections to the spool database, each with the pragmas its role needs.

The write connection runs WAL with `synchronous=FULL`: a committed transaction survives power loss,
which is what makes a `250`/`202` honest (SQLite's pragma documentation). Readers are read-only
(`query_only`) and never change the writer's pragmas.

The spool holds DKIM private keys (in the clear unless encryption at rest is on), so its file is
created for its owner alone (0600); SQLite gives the `-wal` and `-shm` files the same mode.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiosqlite

from store.errors import SpoolUnavailable

#: Spool and backup files: readable and writable by their owner only.
FILE_MODE = 0o600


@contextmanager
def opening(path: Path) -> Iterator[None]:
    """Turn what goes wrong while opening or creating the spool at `path` into SpoolUnavailable."""
    try:
        yield
    except sqlite3.Error as exc:  # "file is not a database", "unable to open database file", …
        raise SpoolUnavailable(path, str(exc)) from None
    except OSError as exc:  # its directory cannot be created
        raise SpoolUnavailable(path, f"{exc.strerror or exc} ({exc.filename or path})") from None


def create_private(path: Path) -> None:
    """Create `path` empty with FILE_MODE unless it exists (SQLite takes an empty file as new)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


#: Bytes of WAL file kept after a checkpoint (store/checkpoint.py runs them for the service).
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


def connect_writer(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """The one write connection; used only from the writer's thread after this call."""
    create_private(path)
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    conn.row_factory = sqlite3.Row
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot enable WAL on {path} (journal_mode={mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    # Bound the WAL file after checkpoints so a burst does not leave a huge file behind.
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    return conn


def connect_point_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for small indexed reads on the event loop's own thread.

    It never waits for a lock (`busy_timeout` 0): a read that meets one is retried on a threaded
    reader instead (`Spool._point_read`), so the loop is never held by the database.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only=ON")
    conn.execute("PRAGMA busy_timeout=0")
    return conn


async def connect_reader(path: Path, busy_timeout: float) -> aiosqlite.Connection:
    """A read-only connection for queries that never write."""
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA query_only=ON")
    await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn
