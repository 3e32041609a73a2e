"""A job's durable state: one SQLite file per job directory, and all of its SQL.

Rows are the job's input rows in input order (`idx`), each pointing back at its file, line and
byte range, so request bodies are never copied. Chunks are the planned remote batches. Every
chunk transition is one guarded UPDATE that fails loudly when the chunk is not where the
caller thinks it is; intent (`uploading`, `creating`) is recorded before each remote call.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from .._exceptions import StateError

__all__ = ["JobStore", "Chunk", "Result", "ResultRef", "ROW_STATES", "CHUNK_STATES"]

#: pending: waiting for a chunk · queued: in a chunk not yet collected · succeeded / failed:
#: final · invalid: failed validation (final, never sent).
ROW_STATES = ("pending", "queued", "succeeded", "failed", "invalid")
#: planned -> uploading -> uploaded -> creating -> submitted -> collected (or abandoned).
CHUNK_STATES = ("planned", "uploading", "uploaded", "creating", "submitted", "collected", "abandoned")

_SCHEMA = """
CREATE TABLE job (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL,
    estimate TEXT
);
CREATE TABLE rows (
    idx INTEGER PRIMARY KEY,
    file_no INTEGER NOT NULL,
    line INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    custom_id TEXT,
    remote_id TEXT,
    rewrite INTEGER NOT NULL DEFAULT 0,
    endpoint TEXT,
    model TEXT,
    est_input INTEGER NOT NULL DEFAULT 0,
    est_output INTEGER NOT NULL DEFAULT 0,
    uncapped INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    chunk_id INTEGER,
    request BLOB,
    result BLOB,
    result_file INTEGER,
    result_offset INTEGER,
    result_length INTEGER,
    error TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX rows_custom_id ON rows(custom_id) WHERE custom_id IS NOT NULL AND state != 'invalid';
-- Only pending rows: results landing on queued rows then touch no index.
CREATE INDEX rows_pending ON rows(endpoint, model, idx) WHERE state='pending';
-- Rows get a chunk when planned: pending ones, which have none, stay out of the index.
CREATE INDEX rows_chunk ON rows(chunk_id) WHERE chunk_id IS NOT NULL;
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    tag TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    est_input INTEGER NOT NULL,
    est_output INTEGER NOT NULL,
    est_cost REAL NOT NULL,
    state TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    remote_status TEXT,
    remote_completed INTEGER NOT NULL DEFAULT 0,
    remote_failed INTEGER NOT NULL DEFAULT 0,
    submit_errors INTEGER NOT NULL DEFAULT 0,
    intent_at INTEGER,
    created_at INTEGER NOT NULL,
    submitted_at INTEGER,
    finished_at INTEGER
);
CREATE TABLE result_files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    chunk_id INTEGER,
    message TEXT NOT NULL
)
"""


class ResultRef(NamedTuple):
    """Where a row's result line lies: in a downloaded result file (`result_files`), by byte range."""

    file: int
    offset: int
    length: int


#: A row's result: its line's bytes, or where the line lies in a downloaded file.
Result = bytes | ResultRef


def _result_columns(result: Result) -> tuple[bytes | None, int | None, int | None, int | None]:
    if isinstance(result, ResultRef):
        return None, result.file, result.offset, result.length
    return result, None, None, None


@dataclass(slots=True)
class Chunk:
    id: int
    tag: str
    endpoint: str
    model: str
    rows: int
    bytes: int
    est_input: int
    est_output: int
    est_cost: float
    state: str
    file_id: str | None
    batch_id: str | None
    remote_status: str | None
    remote_completed: int
    remote_failed: int
    submit_errors: int
    intent_at: int | None
    created_at: int
    submitted_at: int | None
    finished_at: int | None


_CHUNK_COLUMNS = ", ".join(Chunk.__slots__)  # type: ignore[attr-defined]


class JobStore:
    """The SQLite file of one job."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # By the tables, not the file: a process killed between creating the file and the
        # schema's transaction leaves an empty file behind.
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='job'").fetchone() is None:
            with self.tx() as db:
                if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='job'").fetchone() is None:
                    for statement in _SCHEMA.split(";"):
                        db.execute(statement)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def event(self, kind: str, message: str, chunk_id: int | None = None, db: sqlite3.Connection | None = None) -> None:
        (db or self.db).execute(
            "INSERT INTO events (at, kind, chunk_id, message) VALUES (?, ?, ?, ?)",
            (time.time(), kind, chunk_id, message),
        )

    # -- the job -------------------------------------------------------------------------

    def job(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id, created_at, inputs, settings, status, estimate FROM job").fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "created_at": row[1],
            "inputs": orjson.loads(row[2]),
            "settings": orjson.loads(row[3]),
            "status": row[4],
            "estimate": orjson.loads(row[5]) if row[5] else None,
        }

    def create_job(self, job_id: str, inputs: list[dict[str, Any]], settings: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO job VALUES (?, ?, ?, ?, 'ingesting', NULL)",
                (job_id, int(time.time()), orjson.dumps(inputs), orjson.dumps(settings)),
            )
            self.event("job", f"created job {job_id}", db=db)

    def set_job(self, **columns: Any) -> None:
        for key in ("settings", "estimate"):
            if key in columns and columns[key] is not None:
                columns[key] = orjson.dumps(columns[key])
        with self.tx() as db:
            db.execute(f"UPDATE job SET {', '.join(f'{k}=?' for k in columns)}", tuple(columns.values()))
            if "status" in columns:
                self.event("job", f"job status {columns['status']}", db=db)

    # -- rows ----------------------------------------------------------------------------

    def insert_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """(idx, file_no, line, offset, length, custom_id, endpoint, model, est_input, est_output, state, error)."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO rows (idx, file_no, line, offset, length, custom_id, endpoint, model, est_input, "
                "est_output, state, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def request(self, idx: int) -> bytes:
        """The input line of a row made through the Python API (stored, not in a file)."""
        row = self.db.execute("SELECT request FROM rows WHERE idx=?", (idx,)).fetchone()
        if row is None or row[0] is None:
            raise StateError(f"row {idx} has no stored request")
        return bytes(row[0])

    def next_idx(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM rows").fetchone()[0])

    def add_requests(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Rows made by the Python API: (idx, custom_id, remote_id, rewrite, endpoint, model, est_input,
        est_output, uncapped, request line); their file is -1 and their request is stored."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO rows (idx, file_no, line, offset, length, custom_id, remote_id, rewrite, endpoint, model, "
                "est_input, est_output, uncapped, state, request) "
                "VALUES (?1, -1, ?1, 0, LENGTH(?10), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10)",
                rows,
            )

    def outcomes(self, custom_ids: Sequence[str]) -> list[tuple[str, str, Result | None, str | None]]:
        """(custom_id, state, result, error) of the rows with these ids that are final."""
        found: list[tuple[str, str, Result | None, str | None]] = []
        for i in range(0, len(custom_ids), 500):
            part = custom_ids[i : i + 500]
            for cid, state, blob, rfile, roff, rlen, error in self.db.execute(
                "SELECT custom_id, state, result, result_file, result_offset, result_length, error FROM rows "
                f"WHERE state IN ('succeeded', 'failed', 'invalid') AND custom_id IN ({','.join('?' * len(part))})",
                part,
            ):
                found.append((cid, state, ResultRef(rfile, roff, rlen) if rfile is not None else blob, error))
        return found

    def models(self) -> list[str]:
        """Every model the job's valid rows name."""
        return [m for (m,) in self.db.execute("SELECT DISTINCT model FROM rows WHERE model IS NOT NULL")]

    def known_ids(self, custom_ids: Sequence[str]) -> set[str]:
        """Which of these custom_ids the job already has rows for."""
        found: set[str] = set()
        for i in range(0, len(custom_ids), 500):
            part = custom_ids[i : i + 500]
            query = f"SELECT custom_id FROM rows WHERE custom_id IN ({','.join('?' * len(part))})"
            found.update(cid for (cid,) in self.db.execute(query, part))
        return found

    def estimate_by_model(self, long_prompt: int) -> list[tuple[str, int, int, int, int, int, int, int]]:
        """(model, rows, input tokens, output tokens, rows without an output cap, and the rows,
        input and output tokens of those with more than `long_prompt` input tokens) of the valid rows."""
        return self.db.execute(
            "SELECT model, COUNT(*), SUM(est_input), SUM(est_output), SUM(uncapped), SUM(est_input > ?1), "
            "SUM(CASE WHEN est_input > ?1 THEN est_input ELSE 0 END), "
            "SUM(CASE WHEN est_input > ?1 THEN est_output ELSE 0 END) FROM rows "
            "WHERE state != 'invalid' GROUP BY model ORDER BY model",
            (long_prompt,),
        ).fetchall()

    def row_of_custom_id(self, custom_id: str) -> tuple[int, int, int] | None:
        """(idx, file_no, line) of a valid row with this custom_id."""
        return self.db.execute(
            "SELECT idx, file_no, line FROM rows WHERE custom_id=? AND state != 'invalid'", (custom_id,)
        ).fetchone()

    def counts(self) -> dict[str, int]:
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM rows GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in ROW_STATES}

    def totals(self) -> dict[str, float]:
        """Actual usage and cost of answered rows so far."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(input_tokens),0), COALESCE(SUM(output_tokens),0), COALESCE(SUM(cached_tokens),0),"
            " COALESCE(SUM(reasoning_tokens),0), COALESCE(SUM(cost),0) FROM rows"
        ).fetchone()
        return dict(zip(("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cost"), row))

    def pending_groups(self) -> list[tuple[str, str]]:
        """(endpoint, model) pairs that have pending rows, in order of their first row."""
        return self.db.execute(
            "SELECT endpoint, model FROM rows WHERE state='pending' GROUP BY endpoint, model ORDER BY MIN(idx)"
        ).fetchall()

    def pending_rows(
        self, endpoint: str, model: str, after: int = -1, limit: int = -1
    ) -> list[tuple[int, int, int, int, int, int]]:
        """(idx, file_no, offset, length, est_input, est_output) of pending rows past `after`, in
        input order, at most `limit` of them (-1: all)."""
        return self.db.execute(
            "SELECT idx, file_no, offset, length, est_input, est_output FROM rows "
            "WHERE state='pending' AND endpoint=? AND model=? AND idx > ? ORDER BY idx LIMIT ?",
            (endpoint, model, after, limit),
        ).fetchall()

    def chunk_rows(self, chunk_id: int) -> list[tuple[int, int, int, int, str, str | None, int, str]]:
        """(idx, file_no, offset, length, custom_id, remote_id, rewrite, model) of a chunk's rows, in input order.

        remote_id: the id sent to the provider when the row's own does not fit its rules;
        rewrite: 1 when the line must be rewritten before sending (its model is set by the job).
        """
        return self.db.execute(
            "SELECT idx, file_no, offset, length, custom_id, remote_id, rewrite, model FROM rows "
            "WHERE chunk_id=? AND state='queued' ORDER BY idx",
            (chunk_id,),
        ).fetchall()

    def export_rows(self) -> Iterator[tuple[int, int, int, str | None, str, Result | None, str | None]]:
        """(idx, file_no, line, custom_id, state, result, error) of every row, in input order."""
        for idx, file_no, line, cid, state, blob, rfile, roff, rlen, error in self.db.execute(
            "SELECT idx, file_no, line, custom_id, state, result, result_file, result_offset, result_length, error "
            "FROM rows ORDER BY idx"
        ):
            yield idx, file_no, line, cid, state, (ResultRef(rfile, roff, rlen) if rfile is not None else blob), error

    # -- chunks --------------------------------------------------------------------------

    def plan_chunk(
        self,
        tag: str,
        endpoint: str,
        model: str,
        idxs: Sequence[int],
        nbytes: int,
        est_in: int,
        est_out: int,
        cost: float,
    ) -> int:
        """Records a chunk and queues its rows, in one transaction (the plan survives a crash)."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO chunks (tag, endpoint, model, rows, bytes, est_input, est_output, est_cost, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'planned', ?)",
                (tag, endpoint, model, len(idxs), nbytes, est_in, est_out, cost, int(time.time())),
            )
            chunk_id = int(cur.lastrowid or 0)
            # The chunk is every pending row of its endpoint and model between its first and last
            # row (the planner takes them in order), so one range UPDATE queues them all.
            queued = db.execute(
                "UPDATE rows SET state='queued', chunk_id=?, attempts=attempts+1 "
                "WHERE state='pending' AND endpoint=? AND model=? AND idx BETWEEN ? AND ?",
                (chunk_id, endpoint, model, idxs[0], idxs[-1]),
            ).rowcount
            if queued != len(idxs):
                raise StateError(f"chunk {tag}: expected to queue {len(idxs)} rows, queued {queued}")
            self.event("plan", f"chunk {tag}: {len(idxs)} rows of {model} ({nbytes} bytes)", chunk_id, db)
        return chunk_id

    def dissolve_planned(self) -> int:
        """Returns the rows of chunks never sent back to pending (for a re-plan under new limits).

        Only `planned` chunks: nothing remote carries their tags. They are kept as `abandoned`.
        """
        with self.tx() as db:
            db.execute(
                "UPDATE rows SET state='pending', chunk_id=NULL, attempts=MAX(attempts-1, 0) "
                "WHERE state='queued' AND chunk_id IN (SELECT id FROM chunks WHERE state='planned')"
            )
            n = db.execute("UPDATE chunks SET state='abandoned' WHERE state='planned'").rowcount
            if n:
                self.event("replan", f"{n} unsent chunks dissolved to re-plan under new limits", db=db)
        return n

    def chunks(self, states: Sequence[str] | None = None) -> list[Chunk]:
        if states is None:
            rows = self.db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks ORDER BY id").fetchall()
        else:
            marks = ", ".join("?" * len(states))
            rows = self.db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE state IN ({marks}) ORDER BY id", tuple(states)
            ).fetchall()
        return [Chunk(*r) for r in rows]

    def batches_by_state(self, states: Sequence[str] | None = None) -> dict[str, int]:
        """How many chunks are in each state; a submitted chunk counts under its remote status
        (`in_progress`, `finalizing`, ...) once the provider has reported one."""
        batches: dict[str, int] = {}
        for ch in self.chunks(states):
            key = ch.remote_status if ch.state == "submitted" and ch.remote_status else ch.state
            batches[key] = batches.get(key, 0) + 1
        return batches

    def move_chunk(self, chunk_id: int, to: str, from_: Sequence[str], message: str = "", **columns: Any) -> None:
        """Guarded chunk transition; raises StateError when the chunk is not in `from_`."""
        sets = {"state": to, **columns}
        marks = ", ".join("?" * len(from_))
        with self.tx() as db:
            changed = db.execute(
                f"UPDATE chunks SET {', '.join(f'{k}=?' for k in sets)} WHERE id=? AND state IN ({marks})",
                (*sets.values(), chunk_id, *from_),
            ).rowcount
            if changed != 1:
                raise StateError(f"chunk {chunk_id} cannot move to {to}: not in {', '.join(from_)}")
            self.event(to, message or f"chunk {chunk_id} -> {to}", chunk_id, db)

    def update_chunk(self, chunk_id: int, **columns: Any) -> None:
        """Records remote progress (no state change)."""
        with self.tx() as db:
            db.execute(
                f"UPDATE chunks SET {', '.join(f'{k}=?' for k in columns)} WHERE id=?", (*columns.values(), chunk_id)
            )

    def _finish_rows(
        self,
        db: sqlite3.Connection,
        succeeded: list[tuple[Result, int, int, int, int, float, int]],
        retry: list[tuple[str, int]],
        failed: list[tuple[Result, str, int]],
        refund: Sequence[tuple[str, int]] = (),
    ) -> None:
        db.executemany(
            "UPDATE rows SET state='succeeded', result=?, result_file=?, result_offset=?, result_length=?, "
            "input_tokens=?, output_tokens=?, cached_tokens=?, reasoning_tokens=?, cost=?, error=NULL "
            "WHERE idx=? AND state='queued'",
            [(*_result_columns(r[0]), *r[1:]) for r in succeeded],
        )
        db.executemany("UPDATE rows SET state='pending', chunk_id=NULL, error=? WHERE idx=? AND state='queued'", retry)
        db.executemany(
            "UPDATE rows SET state='pending', chunk_id=NULL, error=?, attempts=MAX(attempts-1, 0) "
            "WHERE idx=? AND state='queued'",
            refund,
        )
        db.executemany(
            "UPDATE rows SET state='failed', result=?, result_file=?, result_offset=?, result_length=?, error=? "
            "WHERE idx=? AND state='queued'",
            [(*_result_columns(r[0]), *r[1:]) for r in failed],
        )

    def result_file(self, path: str) -> int:
        """The id of a downloaded result file (a path under the job directory), registered once."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO result_files (path) VALUES (?)", (path,))
            return int(db.execute("SELECT id FROM result_files WHERE path=?", (path,)).fetchone()[0])

    def result_files(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT id, path FROM result_files"))

    def collect(
        self,
        chunk_id: int,
        succeeded: list[tuple[Result, int, int, int, int, float, int]],
        retry: list[tuple[str, int]],
        failed: list[tuple[Result, str, int]],
        remote_status: str,
        *,
        refund: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Applies a finished chunk's results and marks it collected, in one transaction.

        succeeded: (result, input, output, cached, reasoning tokens, cost, idx);
        retry: (last error, idx) back to pending; failed: (result, error, idx), final. A result
        is its line's bytes, or a `ResultRef` to the line in a downloaded file (fsynced first).
        refund: (last error, idx) back to pending with the attempt given back (the user cancelled).
        """
        with self.tx() as db:
            self._finish_rows(db, succeeded, retry, failed, refund)
            changed = db.execute(
                "UPDATE chunks SET state='collected', remote_status=?, finished_at=? WHERE id=? AND state='submitted'",
                (remote_status, int(time.time()), chunk_id),
            ).rowcount
            if changed != 1:
                raise StateError(f"chunk {chunk_id} was not submitted; its results were not applied")
            self.event(
                "collected",
                f"chunk {chunk_id}: {len(succeeded)} succeeded, {len(retry) + len(refund)} to retry, "
                f"{len(failed)} failed",
                chunk_id,
                db,
            )

    def pending_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM rows WHERE state='pending'").fetchone()[0])

    def start_direct(self) -> list[tuple[int, int, int, int, str, str, str, int, int]]:
        """Queues every pending row for the direct API (chunk_id NULL), returning
        (idx, file_no, offset, length, custom_id, endpoint, model, est_input, est_output)."""
        with self.tx() as db:
            rows = db.execute(
                "SELECT idx, file_no, offset, length, custom_id, endpoint, model, est_input, est_output FROM rows "
                "WHERE state='pending' ORDER BY idx"
            ).fetchall()
            db.execute("UPDATE rows SET state='queued', chunk_id=NULL, attempts=attempts+1 WHERE state='pending'")
            self.event("direct", f"{len(rows)} rows sent to the direct API", db=db)
        return rows

    def finish_direct(
        self,
        succeeded: list[tuple[Result, int, int, int, int, float, int]],
        retry: list[tuple[str, int]],
        failed: list[tuple[Result, str, int]],
    ) -> None:
        with self.tx() as db:
            self._finish_rows(db, succeeded, retry, failed)

    def requeue_interrupted_direct(self) -> int:
        """Rows that were with the direct API when the process died go back to pending."""
        with self.tx() as db:
            return db.execute("UPDATE rows SET state='pending' WHERE state='queued' AND chunk_id IS NULL").rowcount

    def in_flight_cost(self) -> float:
        """Estimated cost of chunks submitted (or about to be) and not yet collected."""
        return float(
            self.db.execute(
                "SELECT COALESCE(SUM(est_cost), 0) FROM chunks "
                "WHERE state IN ('uploading', 'uploaded', 'creating', 'submitted')"
            ).fetchone()[0]
        )

    def estimated_cost(self) -> float:
        """Estimated cost of every chunk planned so far (at batch prices)."""
        return float(self.db.execute("SELECT COALESCE(SUM(est_cost), 0) FROM chunks").fetchone()[0])

    def in_flight_tokens(self, model: str) -> int:
        """Estimated prompt tokens of this model's chunks in flight (the provider's enqueued-token queue)."""
        return int(
            self.db.execute(
                "SELECT COALESCE(SUM(est_input), 0) FROM chunks WHERE model=? AND state IN ('creating','submitted')",
                (model,),
            ).fetchone()[0]
        )

    def events(self, limit: int = 50) -> list[tuple[float, str, int | None, str]]:
        return self.db.execute(
            "SELECT at, kind, chunk_id, message FROM events ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()[::-1]
