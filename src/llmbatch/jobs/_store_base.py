"""The job store's foundation: opening a job's SQLite file (creating and migrating it, or
read-only to watch it), its one write transaction, and what turns SQLite's damage errors into
`DamagedJob`. `JobStore` (`_store.py`) is built on it, its chunks' SQL in `_store_chunks.py`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._exceptions import DamagedJob, StateError
from ._records import (
    CachedResult,
    ChunkRow,
    ExportRow,
    PendingRow,
    Result,
    ResultRef,
)
from ._schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "READ_TIMEOUT",
    "SENDABLE",
    "StoreBase",
    "as_chunk_row",
    "as_export_row",
    "as_pending",
    "damaged",
    "marks",
    "result_columns",
    "row_result",
    "translating",
    "write_tx",
]

#: Pending rows that are to be sent: not those repeating an earlier row of the job, which wait
#: for its answer (`JobStore.hold_repeats`). Planning and the direct API take only these.
SENDABLE = "state='pending' AND repeat_of IS NULL"

#: Seconds a read-only connection waits on a lock (a WAL being recovered) before giving up.
READ_TIMEOUT = 2.0


def result_columns(result: Result) -> tuple[bytes | None, int | None, int | None, int | None]:
    if isinstance(result, ResultRef):
        return None, result.file, result.offset, result.length
    return result, None, None, None


def row_result(
    blob: bytes | None, rfile: int | None, roff: int | None, rlen: int | None, cached: int = 0, cid: str | None = None
) -> Result | None:
    """A row's result from its columns: a reference into a result file, the answer of the
    response cache it was answered from (`cached`: its record is `blob`), or its line."""
    if rfile is not None:
        return ResultRef(rfile, roff or 0, rlen or 0)
    if cached and blob is not None:
        return CachedResult(cid, blob)
    return blob


# Records made from rows by the hundred thousand: tuple.__new__ builds them without a Python-level
# call per row (a NamedTuple's own constructor is one).
as_pending = functools.partial(tuple.__new__, PendingRow)
as_chunk_row = functools.partial(tuple.__new__, ChunkRow)
as_export_row = functools.partial(tuple.__new__, ExportRow)


def damaged(path: Path, exc: BaseException) -> DamagedJob:
    """The error for a job whose store SQLite cannot read: it names the job, the file and the fix."""
    job = path.parent.name
    return DamagedJob(
        f"job {job}: its store {path} is damaged ({exc}); restore the file from a backup, or remove the "
        f"job with `llmbatch jobs rm {job}`"
    )


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file is not a sound database (not: a constraint, a lock, a misuse)."""
    if type(exc) is sqlite3.DatabaseError:  # "file is not a database", "database disk image is malformed"
        return True
    message = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("malformed" in message or "not a database" in message)


def translating(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` with SQLite's damage errors turned into DamagedJob (generators while iterating too)."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: StoreBase, *args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                if _is_damage(exc):
                    raise damaged(self.path, exc) from exc
                raise

        return generator

    @functools.wraps(method)
    def call(self: StoreBase, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if _is_damage(exc):
                raise damaged(self.path, exc) from exc
            raise

    return call


def marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


@contextmanager
def write_tx(db: sqlite3.Connection, lock: contextlib.AbstractContextManager[Any]) -> Iterator[sqlite3.Connection]:
    """One short write transaction (BEGIN IMMEDIATE ... COMMIT) on `db`, one thread at a time:
    other processes on the same file wait for it at most their busy timeout. (The job store and
    the response cache both use it.)"""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class StoreBase:
    """A job's SQLite file opened (created, migrated) or opened to watch, with the helpers every
    part of `JobStore` writes through."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """Opens (creating and migrating) the job's store; `read_only` opens it for watching only
        (see `_open_read_only`)."""
        self.path = path
        self._lock = threading.RLock()
        if read_only:
            self._db = self._open_read_only(path)
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def _open_read_only(path: Path) -> sqlite3.Connection:
        """A connection that can neither write nor migrate the store, for a process watching a job
        that another may be running (`llmbatch dashboard`).

        `mode=ro`, not `immutable=1`: immutable tells SQLite the file never changes, so it skips
        the locks and the WAL and reads pages half-written by a running job. A WAL reader never
        blocks the writer; the short busy timeout only covers a WAL being recovered. The schema
        must be this release's: an older store is migrated by a command that may write
        (`llmbatch status JOB`), a newer one is not ours to read.
        """
        uri = path.resolve().as_uri() + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=READ_TIMEOUT)
        try:
            db.execute("PRAGMA query_only=ON")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                job = path.parent.name
                raise StateError(
                    f"job {job}: its store has schema {version}, this llmbatch reads {SCHEMA_VERSION}: "
                    + (
                        "upgrade llmbatch to read it"
                        if version > SCHEMA_VERSION
                        else f"`llmbatch status {job}` upgrades it (or it is still being created)"
                    )
                )
        except sqlite3.Error as exc:
            db.close()
            if _is_damage(exc):
                raise damaged(path, exc) from exc
            raise
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self) -> None:
        """Brings the schema to `SCHEMA_VERSION`, one transaction for all the steps it needs.

        By the version, not the file: a process killed between creating the file and the
        schema's transaction leaves an empty file (version 0) behind, which is migrated.
        """
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: this job was written by a newer llmbatch (job store schema {version}; this "
                f"one knows up to {SCHEMA_VERSION}): upgrade llmbatch to run it"
            )
        if version == SCHEMA_VERSION:
            return
        with self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])  # another process may have done it
            for step in MIGRATIONS[version:]:
                step(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_tx(self._db, self._lock)

    def _event(self, db: sqlite3.Connection, kind: str, message: str, chunk_id: int | None = None) -> None:
        db.execute(
            "INSERT INTO events (at, kind, chunk_id, message) VALUES (?, ?, ?, ?)",
            (time.time(), kind, chunk_id, message),
        )

    def _one(self, query: str, params: Sequence[object] = ()) -> Any:
        return self._db.execute(query, params).fetchone()[0]
