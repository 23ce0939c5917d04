"""A read-only look at the spool file, for `postroom doctor`.

Owns `inspect()`: whether the spool opens, its schema version against the migrations this Postroom
ships, SQLite's `integrity_check` (through `backup.check`), whether the configured encryption key
opens it (the same key check `Spool.open` enforces), and the sending domains with their DKIM keys.
Unlike `Spool.open` it changes nothing — no migration, no key check written — so it is safe to run
beside `serve` or against a spool a newer or older Postroom left behind.
"""

from __future__ import annotations

import dataclasses
import sqlite3

from config import Settings
from store.backup import check
from store.crypto import DKIM, KeyMismatch, Sealer, key_problem
from store.errors import StoreError
from store.migrate import migrations
from store.records import DomainKeys, SpoolHealth
from store.sql import Q


def inspect(settings: Settings) -> SpoolHealth:
    """Look at the spool without changing it; StoreError when it is missing or will not open."""
    path = settings.spool_path
    timeout = settings.storage.busy_timeout
    problems = check(path, timeout)  # raises StoreError when there is no spool
    known = migrations()
    latest = known[-1].version if known else 0
    sealer = Sealer.from_settings(settings)
    try:
        conn = sqlite3.connect(path, timeout=timeout)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            version = 0
            if conn.execute(Q["has_schema_version"]).fetchone() is not None:
                version = int(conn.execute(Q["schema_version_current"]).fetchone()[0])
            stored = None
            if version >= latest:
                row = conn.execute(Q["meta_get"], {"name": "key_check"}).fetchone()
                stored = None if row is None else bytes(row[0])
            problem = None if stored is None else key_problem(stored, sealer)
            domains: tuple[DomainKeys, ...] = ()
            if version == latest and problem is None:
                rows = conn.execute(Q["list_domains"]).fetchall()
                try:
                    domains = tuple(_opened(DomainKeys.from_row(r), sealer) for r in rows)
                except KeyMismatch as exc:
                    problem = str(exc)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    return SpoolHealth(
        schema_version=version,
        latest_version=latest,
        problems=tuple(problems),
        is_encrypted=stored is not None,
        key_problem=problem,
        domains=domains,
    )


def _opened(keys: DomainKeys, sealer: Sealer) -> DomainKeys:
    ed = keys.ed25519_key
    return dataclasses.replace(
        keys,
        rsa_key=sealer.open(keys.rsa_key, DKIM),
        ed25519_key=None if ed is None else sealer.open(ed, DKIM),
    )
