"""The server's metadata store: all of its SQL, in one place.

SQLite in WAL mode, autocommit with explicit `BEGIN IMMEDIATE` for writes. Every batch status
change is one guarded statement (`UPDATE ... WHERE id=? AND status IN (...) RETURNING`) that
fails loudly when no row matches, recorded in the append-only `batch_events` table.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import StateError

__all__ = ["BatchRow", "FileRow", "Store", "TERMINAL", "ACTIVE", "TIMESTAMP_OF"]

log = logging.getLogger("llmbatch.server")

#: Statuses a batch never leaves.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Statuses in which the worker still owes the batch work.
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
#: The timestamp column set when a batch enters each status.
TIMESTAMP_OF = {
    "validating": "created_at",
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the surrounding transaction; statements one by one do not.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _m1(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER
        );
        CREATE INDEX files_owner ON files(owner, seq);
        CREATE INDEX files_expiry ON files(expires_at) WHERE expires_at IS NOT NULL;
        CREATE TABLE batches (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            status TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            model TEXT,
            metadata TEXT,
            output_expires_after INTEGER,
            output_file_id TEXT,
            error_file_id TEXT,
            errors TEXT,
            created_at INTEGER NOT NULL,
            in_progress_at INTEGER,
            expires_at INTEGER,
            finalizing_at INTEGER,
            completed_at INTEGER,
            failed_at INTEGER,
            expired_at INTEGER,
            cancelling_at INTEGER,
            cancelled_at INTEGER,
            total INTEGER NOT NULL DEFAULT 0,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX batches_owner ON batches(owner, seq);
        CREATE INDEX batches_status ON batches(status, seq);
        CREATE INDEX batches_input ON batches(input_file_id);
        CREATE TABLE batch_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            batch_id TEXT NOT NULL,
            at REAL NOT NULL,
            from_status TEXT,
            to_status TEXT NOT NULL
        );
        """,
    )


#: Schema migrations, applied in order; each is recorded in `schema_migrations`.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m1]


@dataclass(slots=True)
class FileRow:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None

    def to_api(self) -> dict[str, Any]:
        """OpenAI's FileObject."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass(slots=True)
class BatchRow:
    id: str
    owner: str
    status: str
    endpoint: str
    input_file_id: str
    completion_window: str
    model: str | None
    metadata: dict[str, str] | None
    output_expires_after: int | None
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    total: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    def to_api(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


_BATCH_FIELDS = tuple(BatchRow.__slots__)  # type: ignore[attr-defined]
_BATCH_COLUMNS = ", ".join(_BATCH_FIELDS)
_FILE_COLUMNS = ", ".join(FileRow.__slots__)  # type: ignore[attr-defined]


def _batch(row: Sequence[Any]) -> BatchRow:
    values = dict(zip(_BATCH_FIELDS, row))
    for key in ("metadata", "errors"):
        if values[key] is not None:
            values[key] = orjson.loads(values[key])
    return BatchRow(**values)


def _file(row: Sequence[Any]) -> FileRow:
    return FileRow(*row)


class Store:
    """The server's metadata: files and batches. Safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # On SQLITE_FULL (a full disk) SQLite may have rolled back already, and a failed
                # COMMIT leaves the transaction open: end it if it is still there, and let the
                # original error through (not "cannot rollback - no transaction is active").
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
            done = {v for (v,) in db.execute("SELECT version FROM schema_migrations")}
            for version, migration in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    migration(db)
                    db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))

    # -- files ---------------------------------------------------------------------------

    def insert_file(self, f: FileRow) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f.id, f.owner, f.filename, f.purpose, f.bytes, f.created_at, f.expires_at),
            )

    def get_file(self, file_id: str, owner: str | None = None) -> FileRow | None:
        """The file, or None when it does not exist or belongs to another owner."""
        with self._lock:
            row = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE id=?", (file_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return _file(row)

    def list_files(
        self, owner: str, *, after: str | None, limit: int, order: str, purpose: str | None
    ) -> tuple[list[FileRow], bool] | None:
        """A page of files and whether more follow; None when `after` names no file of owner's."""
        return self._page("files", _FILE_COLUMNS, _file, owner, after, limit, order, "purpose", purpose)

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM files WHERE id=?", (file_id,)).rowcount == 1

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an unfinished batch reading this file, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM batches WHERE input_file_id=? AND status IN (?, ?, ?, ?) LIMIT 1",
                (file_id, *sorted(ACTIVE)),
            ).fetchone()
        return row[0] if row else None

    def expired_files(self, now: int) -> list[str]:
        """Files past their expires_at that no unfinished batch reads."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND id NOT IN "
                "(SELECT input_file_id FROM batches WHERE status IN (?, ?, ?, ?))",
                (now, *sorted(ACTIVE)),
            ).fetchall()
        return [r[0] for r in rows]

    def all_file_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM files")}

    # -- batches -------------------------------------------------------------------------

    def insert_batch(self, b: BatchRow) -> None:
        values = [getattr(b, k) for k in _BATCH_FIELDS]
        for i, key in enumerate(_BATCH_FIELDS):
            if key in ("metadata", "errors") and values[i] is not None:
                values[i] = orjson.dumps(values[i]).decode()
        with self._tx() as db:
            db.execute(f"INSERT INTO batches ({_BATCH_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
            db.execute(
                "INSERT INTO batch_events (batch_id, at, from_status, to_status) VALUES (?, ?, NULL, ?)",
                (b.id, time.time(), b.status),
            )
        log.info("batch %s: created (%s)", b.id, b.status)

    def get_batch(self, batch_id: str, owner: str | None = None) -> BatchRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return _batch(row)

    def list_batches(
        self, owner: str, *, after: str | None, limit: int, status: str | None = None
    ) -> tuple[list[BatchRow], bool] | None:
        """A page of batches, newest first (only those in `status`, if given); None when `after`
        names no batch of owner's."""
        return self._page("batches", _BATCH_COLUMNS, _batch, owner, after, limit, "desc", "status", status)

    def batches_in(self, statuses: Sequence[str]) -> list[BatchRow]:
        """All batches in these statuses, oldest first."""
        marks = ", ".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY seq", tuple(statuses)
            ).fetchall()
        return [_batch(r) for r in rows]

    def count_by_status(self, owner: str) -> dict[str, int]:
        """`owner`'s batches by status."""
        with self._lock:
            sql = "SELECT status, COUNT(*) FROM batches WHERE owner=? GROUP BY status"
            return dict(self._db.execute(sql, (owner,)).fetchall())

    def transition_counts(self, owner: str) -> dict[tuple[str | None, str], int]:
        """How many times `owner`'s batches moved from one status to another (None: created)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.from_status, e.to_status, COUNT(*) FROM batch_events e JOIN batches b ON b.id = e.batch_id "
                "WHERE b.owner=? GROUP BY e.from_status, e.to_status",
                (owner,),
            ).fetchall()
        return {(frm, to): n for frm, to, n in rows}

    def usage_totals(self, owner: str) -> dict[str, int]:
        """Rows completed and failed, and tokens in and out, over all of `owner`'s batches."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(completed), 0), COALESCE(SUM(failed), 0), COALESCE(SUM(input_tokens), 0), "
                "COALESCE(SUM(output_tokens), 0) FROM batches WHERE owner=?",
                (owner,),
            ).fetchone()
        return dict(zip(("completed", "failed", "input_tokens", "output_tokens"), row))

    def rows_pending(self) -> int:
        """Rows of in_progress batches (every owner's) not answered yet: the engine's backlog."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(total - completed - failed), 0) FROM batches WHERE status='in_progress'"
            ).fetchone()
        return int(row[0])

    def transition(
        self,
        batch_id: str,
        to: str,
        from_: Sequence[str],
        *,
        new_files: Sequence[FileRow] = (),
        **columns: Any,
    ) -> BatchRow:
        """Moves a batch from one of `from_` to `to`, stamping the status's timestamp column.

        `columns` are set in the same statement; `new_files` are inserted in the same
        transaction, so output files and the status that announces them appear together.
        Raises StateError when the batch is not in one of `from_`.
        """
        now = int(time.time())
        sets = {"status": to, TIMESTAMP_OF[to]: now, **columns}
        for key in ("metadata", "errors"):
            if sets.get(key) is not None:
                sets[key] = orjson.dumps(sets[key]).decode()
        assignments = ", ".join(f"{k}=?" for k in sets)
        marks = ", ".join("?" * len(from_))
        with self._tx() as db:
            current = db.execute("SELECT status FROM batches WHERE id=?", (batch_id,)).fetchone()
            row = db.execute(
                f"UPDATE batches SET {assignments} WHERE id=? AND status IN ({marks}) RETURNING {_BATCH_COLUMNS}",
                (*sets.values(), batch_id, *from_),
            ).fetchone()
            if row is None:
                raise StateError(
                    f"batch {batch_id} cannot move to {to}: it is "
                    f"{current[0] if current else 'missing'}, not one of {', '.join(from_)}"
                )
            for f in new_files:
                db.execute(
                    f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (f.id, f.owner, f.filename, f.purpose, f.bytes, f.created_at, f.expires_at),
                )
            db.execute(
                "INSERT INTO batch_events (batch_id, at, from_status, to_status) VALUES (?, ?, ?, ?)",
                (batch_id, time.time(), current[0], to),
            )
        batch = _batch(row)
        log.info(
            "batch %s: %s -> %s (%d/%d done, %d failed)",
            batch_id,
            current[0],
            to,
            batch.completed,
            batch.total,
            batch.failed,
        )
        return batch

    def set_progress(self, batch_id: str, **columns: int) -> None:
        """Records counts and usage of a running batch (no status change)."""
        assignments = ", ".join(f"{k}=?" for k in columns)
        with self._tx() as db:
            db.execute(f"UPDATE batches SET {assignments} WHERE id=?", (*columns.values(), batch_id))

    def events(self, batch_id: str) -> list[tuple[float, str | None, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT at, from_status, to_status FROM batch_events WHERE batch_id=? ORDER BY seq", (batch_id,)
            ).fetchall()

    # -- shared --------------------------------------------------------------------------

    def _page(
        self,
        table: str,
        columns: str,
        make: Callable[[Sequence[Any]], Any],
        owner: str,
        after: str | None,
        limit: int,
        order: str,
        filter_col: str | None,
        filter_val: str | None,
    ) -> tuple[list[Any], bool] | None:
        where = ["owner=?"]
        args: list[Any] = [owner]
        if filter_col and filter_val is not None:
            where.append(f"{filter_col}=?")
            args.append(filter_val)
        with self._lock:
            if after is not None:
                cursor = self._db.execute(f"SELECT seq FROM {table} WHERE id=? AND owner=?", (after, owner)).fetchone()
                if cursor is None:
                    return None
                where.append("seq < ?" if order == "desc" else "seq > ?")
                args.append(cursor[0])
            direction = "DESC" if order == "desc" else "ASC"
            rows = self._db.execute(
                f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} ORDER BY seq {direction} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        return [make(r) for r in rows[:limit]], len(rows) > limit
