"""The group-commit writer: one thread owns the write connection and commits jobs in batches.

Callers submit a job (a function of the connection) and await its result. The writer takes every
job queued while the previous batch was committing, runs them in one `BEGIN IMMEDIATE`
transaction — each inside its own SAVEPOINT, so a failing job is rolled back alone and fails only
its own caller; neighbouring jobs that share a `joint` run as one call in one savepoint, and one
by one again if that call fails — commits once (one fsync for the whole batch) and only then
resolves the callers' futures. The longer a commit takes, the more jobs the next one carries:
durability stays cheap on slow disks. Running the batch on one thread (as datasette does) costs
one thread hop per batch rather than one per statement. WAL checkpoints run on a thread of their
own (store/checkpoint.py), so that no commit waits for one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from store.checkpoint import Checkpointer
from store.db import JOURNAL_SIZE_LIMIT
from store.errors import SpoolClosed, StorageFull, StoreError
from store.observer import NullObserver, SpoolObserver

logger = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
#: A job may name a `joint` (a plain function, the same object for every job of its kind): the
#: writer then runs neighbouring jobs that share it as one call, `joint(conn, jobs)`, which
#: returns each job's result, or the exception its caller should get, in order. Intake's single
#: messages use it: ten messages in one group commit are ten jobs, but one set of statements.
Joint = Callable[[sqlite3.Connection, list[Any]], list[Any]]

_SQLITE_FULL = 13


@dataclass(slots=True)
class _Pending:
    job: Job[Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    bulk: bool = False


# Where SQLite keeps the statement journal of a transaction (`PRAGMA temp_store`). Each job runs
# in a savepoint, and SQLite copies every existing page a savepoint changes into that journal: a
# temporary file once past 64 KiB, which one accepted message or one delivery result passes
# (about 20 pages). In memory, a released savepoint's copies are dropped at once: a group commit
# of single messages spent 110-120 us a job with the file, 70 in memory. But a job that frees or
# rewrites many stored bodies (a retention sweep, a purge, re-encryption) would hold a copy of
# each in memory (200 MB of bodies emptied in one savepoint: 194 MB more RSS), so a transaction
# with such a job (`bulk`) keeps its journal in a file.
_IN_MEMORY = "MEMORY"
_IN_FILE = "FILE"


class Writer:
    """Runs write jobs on the write connection's own thread, committing them in groups."""

    def __init__(self, conn: sqlite3.Connection, max_batch: int) -> None:
        self._conn = conn
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self.is_healthy = True  # False after a failed commit, until one succeeds
        #: Told about every group commit, on this writer's thread (store/observer.py).
        self.observer: SpoolObserver = NullObserver()
        self._checkpointer = _start_checkpointer(conn)
        self._journal = ""  # the temp_store last set, so that it is set only when it changes
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def run(self, job: Job[T], *, bulk: bool = False) -> T:
        """Run `job` in the next group transaction; return its result once committed.

        `bulk`: the job may free or rewrite many stored bodies (see `_IN_FILE`). Cancelling the
        await does not stop the commit: a caller that gave up may still have its job committed
        (at-least-once, as RFC 1047 describes for SMTP).
        """
        return await self.submit(job, bulk=bulk)

    def submit(self, job: Job[T], *, bulk: bool = False) -> asyncio.Future[T]:
        """Queue `job` now, on the calling loop's thread; its future settles after the commit.

        For a caller that has more to prepare: the writer starts on this job while the caller
        works on the next (`run` is this, awaited)."""
        if self._closed:
            raise SpoolClosed()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(job, future, loop, bulk))
        return future

    async def close(self) -> None:
        """Commit what is queued, then stop the thread and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)
        if self._checkpointer is not None:
            self._checkpointer.stop()  # first: the last connection to close checkpoints all
        self._conn.close()

    def _commit(self, batch: list[_Pending]) -> None:
        conn = self._conn
        results: list[tuple[_Pending, Any, BaseException | None]] = []
        started = time.perf_counter()
        changes_before = conn.total_changes
        try:
            journal = _IN_FILE if any(pending.bulk for pending in batch) else _IN_MEMORY
            if journal != self._journal:  # outside a transaction: SQLite reads it at BEGIN
                conn.execute(f"PRAGMA temp_store={journal}")
                self._journal = journal
            conn.execute("BEGIN IMMEDIATE")
            start = 0
            while start < len(batch):
                joint = getattr(batch[start].job, "joint", None)
                end = start + 1
                while joint is not None and end < len(batch):
                    if getattr(batch[end].job, "joint", None) is not joint:
                        break
                    end += 1
                group = batch[start:end]
                if (
                    joint is None or len(group) == 1
                    or not self._run_joint(conn, joint, group, results)
                ):
                    for pending in group:
                        self._run_one(conn, pending, results)
                start = end
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # SQLITE_FULL may have ended the transaction by itself: roll back only if it is open.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.is_healthy = False
            error = StorageFull() if _is_full(exc) else StoreError(f"commit failed: {exc}")
            logger.error("spool commit of %d job(s) failed: %s", len(batch), exc)
            for pending in batch:
                _resolve(pending, None, error)
            self._report(lambda: self.observer.commit_failed(len(batch)))
            return
        if conn.total_changes != changes_before:
            # Only a commit that wrote something proves the spool can commit again: the
            # engine's empty claims keep committing on a full disk.
            self.is_healthy = True
            if self._checkpointer is not None:
                self._checkpointer.committed()
        elapsed = time.perf_counter() - started
        self._report(lambda: self.observer.committed(len(batch), elapsed))
        for pending, result, job_error in results:
            _resolve(pending, result, job_error)

    def _run_one(
        self,
        conn: sqlite3.Connection,
        pending: _Pending,
        results: list[tuple[_Pending, Any, BaseException | None]],
    ) -> None:
        conn.execute("SAVEPOINT job")
        try:
            result = pending.job(conn)
        except sqlite3.Error as exc:
            if _is_fatal(exc):
                raise
            self._rollback_job(conn)
            results.append((pending, None, exc))
        except Exception as exc:  # noqa: BLE001 - the job fails alone, its caller hears
            self._rollback_job(conn)
            results.append((pending, None, exc))
        else:
            conn.execute("RELEASE job")
            results.append((pending, result, None))

    def _run_joint(
        self,
        conn: sqlite3.Connection,
        joint: Joint,
        group: list[_Pending],
        results: list[tuple[_Pending, Any, BaseException | None]],
    ) -> bool:
        """Run neighbouring jobs that share a `joint` as one job; False (nothing written) if it
        raised, so that they run one by one, each failing alone as ever."""
        conn.execute("SAVEPOINT job")
        try:
            outcomes = joint(conn, [pending.job for pending in group])
        except sqlite3.Error as exc:
            if _is_fatal(exc):
                raise
            self._rollback_job(conn)
            return False
        except Exception:  # noqa: BLE001 - run again one by one: the failing job fails alone
            self._rollback_job(conn)
            return False
        conn.execute("RELEASE job")
        for pending, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results.append((pending, None, outcome))
            else:
                results.append((pending, outcome, None))
        return True

    @staticmethod
    def _report(call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:  # watching must never stop the writer
            logger.exception("spool observer failed")

    @staticmethod
    def _rollback_job(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")


def _start_checkpointer(conn: sqlite3.Connection) -> Checkpointer | None:
    """A checkpointer for the writer's database, and the automatic checkpoint off; None (and
    SQLite's own checkpoints, inside commits) when its connection cannot be opened."""
    path = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not path:  # an in-memory database has no WAL
        return None
    try:
        checkpointer = Checkpointer(Path(path), JOURNAL_SIZE_LIMIT)
    except (sqlite3.Error, OSError) as exc:
        logger.warning("spool checkpoints stay inside commits: %s", exc)
        return None
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return checkpointer


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(exc)


def _is_fatal(exc: sqlite3.Error) -> bool:
    """Errors that doom the whole transaction, not only the job that met them."""
    return _is_full(exc) or (isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc))


def _resolve(pending: _Pending, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if pending.future.done():  # the caller gave up waiting
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    try:
        pending.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed
        logger.debug("writer result dropped: event loop closed")
