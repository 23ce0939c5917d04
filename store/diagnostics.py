"""Read-outs of the spool's own health, and the one hook that reproduces a full disk.

Owns what an operator or a fault test asks the database about itself: the pragmas that make an
acknowledgement durable (WAL and `synchronous=FULL` on the writer, `query_only` on the readers),
`PRAGMA integrity_check`, and `PRAGMA max_page_count` on the write connection — a test and
diagnostic hook that caps the file at its current size, so SQLite answers SQLITE_FULL exactly as a
full disk would, without filling one.
"""

from __future__ import annotations

import sqlite3

import aiosqlite

from store.records import StoragePragmas

_SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}
# SQLite's own ceiling for max_page_count: setting it lifts any cap.
NO_PAGE_LIMIT = 4294967294


def writer_pragmas(conn: sqlite3.Connection) -> tuple[str, str]:
    """(journal_mode, synchronous) of the write connection, as lower-case names."""
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    level = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    return mode, _SYNCHRONOUS.get(level, str(level))


async def reader_is_query_only(conn: aiosqlite.Connection) -> bool:
    async with conn.execute("PRAGMA query_only") as cur:
        row = await cur.fetchone()
    return row is not None and bool(row[0])


def pragmas(writer: tuple[str, str], readers_query_only: list[bool]) -> StoragePragmas:
    mode, synchronous = writer
    return StoragePragmas(
        journal_mode=mode, synchronous=synchronous, readers_query_only=tuple(readers_query_only)
    )


async def integrity_check(conn: aiosqlite.Connection) -> list[str]:
    """`PRAGMA integrity_check`: ["ok"] for a sound database, else the problems it names."""
    async with conn.execute("PRAGMA integrity_check") as cur:
        return [str(row[0]) for row in await cur.fetchall()]


def limit_pages(conn: sqlite3.Connection, extra_pages: int | None) -> int:
    """Cap the file at its current size plus `extra_pages` (None: no cap); return the cap."""
    if extra_pages is None:
        limit = NO_PAGE_LIMIT
    else:
        limit = int(conn.execute("PRAGMA page_count").fetchone()[0]) + max(0, int(extra_pages))
    return int(conn.execute(f"PRAGMA max_page_count={limit}").fetchone()[0])
