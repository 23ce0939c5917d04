"""Numbered schema migrations (`migrations/NNNN_name.sql`), applied in order at start.

`schema_version` holds one row per applied migration. Each migration runs in its own transaction
on the write connection, so a failed one leaves the previous version intact.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with Postroom, by version."""
    found = []
    for entry in resources.files("store").joinpath("migrations").iterdir():
        if m := _FILE.match(entry.name):
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda mig: mig.version)


def current_version(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def apply_migrations(conn: sqlite3.Connection) -> list[Migration]:
    """Apply what is missing; return what was applied. `conn` is in autocommit mode."""
    applied = []
    version = current_version(conn)
    known = migrations()
    if known and version > known[-1].version:
        raise sqlite3.DatabaseError(
            f"the spool's schema (version {version}) is newer than this Postroom "
            f"(version {known[-1].version}); upgrade Postroom"
        )
    for mig in known:
        if mig.version <= version:
            continue
        # executescript commits first; the migration itself runs as one transaction.
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n"
                + mig.sql
                + f"\nINSERT INTO schema_version VALUES ({mig.version}, '{mig.name}', "
                "datetime('now'));\nCOMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(mig)
    return applied
