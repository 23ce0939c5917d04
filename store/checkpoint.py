"""WAL checkpoints on a thread and connection of their own, so that no commit waits for one.

SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past 1,000 pages: that
commit's callers wait while the WAL's pages are copied into the database file and both files
are synced before anyone hears "committed" (a 10,000-item batch's commit took 0.13-0.16 s with
it, 0.05-0.06 s without). The writer turns the automatic checkpoint off for its connection and
wakes a `Checkpointer` after each commit that wrote something. A PASSIVE checkpoint waits for
no reader and no writer, the WAL still holds every committed transaction until it is copied,
and a crash at any point leaves the database to SQLite's own recovery, as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

#: Checkpoints run at most this often (seconds) while commits keep coming: each syncs the WAL
#: and the database file, and one checkpoint per commit would double a busy spool's syncs.
INTERVAL = 0.25


class Checkpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` after commits, on its own thread."""

    def __init__(self, path: Path, journal_size_limit: int) -> None:
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=0
        )
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(f"PRAGMA journal_size_limit={journal_size_limit}")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failing: str | None = None  # the error last logged, until a checkpoint succeeds
        self._thread = threading.Thread(target=self._run, name="spool-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A commit wrote to the WAL: checkpoint soon (called on the writer's thread)."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the checkpoint under way, then close; the writer's close checkpoints last."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                self._checkpoint()
                if self._stopping.wait(INTERVAL):
                    return
        finally:
            self._conn.close()

    def _checkpoint(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # A full disk, say: the WAL keeps every commit, and the next commit wakes this
            # thread to try again. Logged once per kind of failure, not on every try.
            if str(exc) != self._failing:
                self._failing = str(exc)
                logger.warning("spool checkpoint failed (the WAL keeps every commit): %s", exc)
            return
        if self._failing is not None:
            self._failing = None
            logger.info("spool checkpoints work again")
