"""Connections to the spool database, each with the pragmas its role needs.

The write connection runs WAL with `synchronous=FULL`: a committed transaction survives power loss,
which is what makes a `250`/`202` honest (SQLite's pragma documentation). Readers are read-only
(`query_only`) and never change the writer's pragmas.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite


def connect_writer(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """The one write connection; used only from the writer's thread after this call."""
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
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


async def connect_reader(path: Path, busy_timeout: float) -> aiosqlite.Connection:
    """A read-only connection for queries that never write."""
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA query_only=ON")
    await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn
