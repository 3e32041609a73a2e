"""A job's durable state: one SQLite file per job directory, and all of its SQL.

Rows are the job's input rows in input order (`idx`), each pointing back at its file, line and
byte range, so request bodies are never copied. Chunks are the planned remote batches. Every
chunk transition is one guarded UPDATE that fails loudly when the chunk is not where the
caller thinks it is; intent (`uploading`, `creating`) is recorded before each remote call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import DamagedJob, StateError
from ._records import (
    IN_FLIGHT,
    ROW_STATES,
    CachedResult,
    CheckedRow,
    Chunk,
    ChunkRow,
    DirectRow,
    ExportRow,
    Failure,
    InputRow,
    ModelEstimate,
    Outcome,
    PendingRow,
    RequestRow,
    Result,
    ResultFile,
    ResultRef,
    Success,
)
from ._schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["JobStore", "READ_TIMEOUT", "SCHEMA_VERSION"]

#: Seconds a read-only connection waits on a lock (a WAL being recovered) before giving up.
READ_TIMEOUT = 2.0


_CHUNK_COLUMNS = ", ".join(Chunk.__slots__)  # type: ignore[attr-defined]
_INSERT_ROW = (
    "INSERT INTO rows (idx, file_no, line, offset, length, custom_id, remote_id, rewrite, endpoint, model, "
    "est_input, est_output, uncapped, state, error, wire_length, request_key, sampled) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _result_columns(result: Result) -> tuple[bytes | None, int | None, int | None, int | None]:
    if isinstance(result, ResultRef):
        return None, result.file, result.offset, result.length
    return result, None, None, None


def _result(
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
_as_pending = functools.partial(tuple.__new__, PendingRow)
_as_chunk_row = functools.partial(tuple.__new__, ChunkRow)
_as_export_row = functools.partial(tuple.__new__, ExportRow)


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


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` with SQLite's damage errors turned into DamagedJob (generators while iterating too)."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: JobStore, *args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                if _is_damage(exc):
                    raise damaged(self.path, exc) from exc
                raise

        return generator

    @functools.wraps(method)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if _is_damage(exc):
                raise damaged(self.path, exc) from exc
            raise

    return call


def _marks(values: Sequence[object]) -> str:
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


class JobStore:
    """The SQLite file of one job; the only place that knows its SQL."""

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

    # -- the job -------------------------------------------------------------------------

    def job(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT id, created_at, inputs, settings, status, estimate FROM job").fetchone()
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
        with self._tx() as db:
            db.execute(
                "INSERT INTO job VALUES (?, ?, ?, ?, 'ingesting', NULL)",
                (job_id, int(time.time()), orjson.dumps(inputs), orjson.dumps(settings)),
            )
            self._event(db, "job", f"created job {job_id}")

    def set_job(self, **columns: Any) -> None:
        for key in ("settings", "estimate"):
            if key in columns and columns[key] is not None:
                columns[key] = orjson.dumps(columns[key])
        with self._tx() as db:
            db.execute(f"UPDATE job SET {', '.join(f'{k}=?' for k in columns)}", tuple(columns.values()))
            if "status" in columns:
                self._event(db, "job", f"job status {columns['status']}")

    def sent_anything(self) -> bool:
        """Whether the job ever sent a request out: a chunk past planning (an upload may exist)
        or a row answered (directly, or by a batch). A job that never did can be removed or
        replaced without losing anything but the reading of its inputs."""
        return bool(
            self._one(
                "SELECT EXISTS(SELECT 1 FROM chunks WHERE state != 'planned') "
                "OR EXISTS(SELECT 1 FROM rows WHERE state IN ('succeeded', 'failed'))"
            )
        )

    def last_activity(self) -> float:
        """When the job last did anything (its newest event; every step records one)."""
        return float(self._one("SELECT COALESCE(MAX(at), 0) FROM events"))

    # -- rows ----------------------------------------------------------------------------

    def clear_rows(self) -> None:
        """Forgets every row (an interrupted ingest starts over)."""
        with self._tx() as db:
            db.execute("DELETE FROM rows")

    def insert_checked(self, rows: Sequence[InputRow], input_names: Sequence[str]) -> list[tuple[int, int, str]]:
        """Writes checked input rows in one transaction. A custom_id an earlier row already used
        makes the later row invalid.

        Returns (file_no, line, message) of each row found invalid here (the repeats).
        """
        flat = rows
        repeats: list[tuple[int, int, str]] = []
        with self._tx() as db:
            try:
                db.executemany(_INSERT_ROW, flat)
                return repeats
            except sqlite3.IntegrityError:
                pass
            # The whole range again, row by row, to find which rows repeat an id.
            db.execute("DELETE FROM rows WHERE idx >= ?", (flat[0][0],))
            for values in flat:
                try:
                    db.execute(_INSERT_ROW, values)
                except sqlite3.IntegrityError:
                    cid = values[5]
                    first = db.execute(
                        "SELECT file_no, line FROM rows WHERE custom_id=? AND state != 'invalid'", (cid,)
                    ).fetchone()
                    where = f"{input_names[first[0]]}:{first[1]}" if first else "an earlier row"
                    message = f"duplicate_custom_id: custom_id {cid!r} was already used on {where}"
                    db.execute(_INSERT_ROW, (*values[:5], *CheckedRow.invalid(cid, message, values[8], values[9])))
                    repeats.append((values[1], values[2], message))
        return repeats

    def first_invalid(self, limit: int) -> list[tuple[int, int, str | None]]:
        """(file_no, line, error) of the first `limit` invalid rows, in input order."""
        return self._db.execute(
            "SELECT file_no, line, error FROM rows WHERE state='invalid' ORDER BY idx LIMIT ?", (limit,)
        ).fetchall()

    def invalid_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM rows WHERE state='invalid'"))

    def request(self, idx: int) -> bytes:
        """The input line of a row made through the Python API (stored, not in a file)."""
        row = self._db.execute("SELECT request FROM rows WHERE idx=?", (idx,)).fetchone()
        if row is None or row[0] is None:
            raise StateError(f"row {idx} has no stored request")
        return bytes(row[0])

    def next_idx(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(idx) + 1, 0) FROM rows"))

    def add_requests(self, rows: Iterable[RequestRow]) -> None:
        """Rows made by the Python API: their file is -1 and their request is stored."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO rows (idx, file_no, line, offset, length, custom_id, remote_id, rewrite, endpoint, model, "
                "est_input, est_output, uncapped, state, request, wire_length, request_key, sampled) "
                "VALUES (?1, -1, ?1, 0, LENGTH(?10), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11, ?12, ?13)",
                [
                    (r.idx, c.custom_id, c.remote_id, c.rewrite, c.endpoint, c.model, c.est_input, c.est_output,
                     c.uncapped, r.request, c.wire_length, c.request_key, c.sampled)
                    for r in rows
                    for c in (r.row,)
                ],
            )  # fmt: skip

    def outcomes(self, custom_ids: Sequence[str]) -> list[tuple[str, str, Result | None, str | None]]:
        """(custom_id, state, result, error) of the rows with these ids that are final."""
        found: list[tuple[str, str, Result | None, str | None]] = []
        for i in range(0, len(custom_ids), 500):
            part = custom_ids[i : i + 500]
            for cid, state, blob, rfile, roff, rlen, error, cached in self._db.execute(
                "SELECT custom_id, state, result, result_file, result_offset, result_length, error, from_cache "
                f"FROM rows WHERE state IN ('succeeded', 'failed', 'invalid') AND custom_id IN ({_marks(part)}) "
                "AND NOT (from_cache = 1 AND result IS NULL)",  # a cached answer not copied in yet
                part,
            ):
                found.append((cid, state, _result(blob, rfile, roff, rlen, cached, cid), error))
        return found

    def unfinished_ids(self) -> set[str]:
        """The custom_ids of rows not final yet (pending or queued)."""
        return {cid for (cid,) in self._db.execute("SELECT custom_id FROM rows WHERE state IN ('pending', 'queued')")}

    def models(self, lane: int | None = None) -> list[str]:
        """Every model the job's valid rows name (those with the provider of `lane` only, when given)."""
        if lane is None:
            return [m for (m,) in self._db.execute("SELECT DISTINCT model FROM rows WHERE model IS NOT NULL")]
        query = "SELECT DISTINCT model FROM rows WHERE model IS NOT NULL AND lane=?"
        return [m for (m,) in self._db.execute(query, (lane,))]

    def known_ids(self, custom_ids: Sequence[str]) -> set[str]:
        """Which of these custom_ids the job already has rows for."""
        found: set[str] = set()
        for i in range(0, len(custom_ids), 500):
            part = custom_ids[i : i + 500]
            query = f"SELECT custom_id FROM rows WHERE custom_id IN ({_marks(part)})"
            found.update(cid for (cid,) in self._db.execute(query, part))
        return found

    def estimate_by_model(self, long_prompt: int) -> list[ModelEstimate]:
        """Estimated tokens of the valid rows to send, by model (rows answered from the cache are
        not sent); "long" rows have more than `long_prompt` input tokens."""
        return [
            ModelEstimate._make(r)
            for r in self._db.execute(
                "SELECT model, COUNT(*), SUM(est_input), SUM(est_output), SUM(uncapped), SUM(est_input > ?1), "
                "SUM(CASE WHEN est_input > ?1 THEN est_input ELSE 0 END), "
                "SUM(CASE WHEN est_input > ?1 THEN est_output ELSE 0 END) FROM rows "
                "WHERE state != 'invalid' AND from_cache = 0 GROUP BY model ORDER BY model",
                (long_prompt,),
            )
        ]

    def estimated_tokens(self) -> tuple[int, int]:
        """Estimated (input, output) tokens of every valid row to send (not answered from the cache)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(est_input),0), COALESCE(SUM(est_output),0) FROM rows "
            "WHERE state!='invalid' AND from_cache=0"
        ).fetchone()
        return int(row[0]), int(row[1])

    def pending_estimates(self) -> list[tuple[str, int, int]]:
        """(model, estimated input, output tokens) of each pending row."""
        return self._db.execute("SELECT model, est_input, est_output FROM rows WHERE state='pending'").fetchall()

    def row_of_custom_id(self, custom_id: str) -> tuple[int, int, int] | None:
        """(idx, file_no, line) of a valid row with this custom_id."""
        return self._db.execute(
            "SELECT idx, file_no, line FROM rows WHERE custom_id=? AND state != 'invalid'", (custom_id,)
        ).fetchone()

    def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM rows GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in ROW_STATES}

    def totals(self) -> dict[str, float]:
        """Actual usage and cost so far: of answered rows, and of results that matched no row
        (generated and billed all the same)."""
        keys = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cost")
        rows = self._db.execute(f"SELECT {', '.join(f'COALESCE(SUM({k}),0)' for k in keys)} FROM rows").fetchone()
        unmatched = self._db.execute(
            f"SELECT {', '.join(f'COALESCE(SUM(unmatched_{k}),0)' for k in keys)} FROM chunks"
        ).fetchone()
        return {k: a + b for k, a, b in zip(keys, rows, unmatched)}

    # -- the response cache (`_cache.py`) ---------------------------------------------------

    def answered_rows(self, after: int, limit: int) -> list[Success]:
        """Rows past `after` that the job's own provider answered (not the cache, not a fallback)
        and that have a request key, in input order, at most `limit`, with their usage and cost."""
        return [
            Success(_result(blob, rfile, roff, rlen), inp, out, cached, reasoning, cost, idx)
            for blob, rfile, roff, rlen, inp, out, cached, reasoning, cost, idx in self._db.execute(
                "SELECT result, result_file, result_offset, result_length, input_tokens, output_tokens, "
                "cached_tokens, reasoning_tokens, cost, idx FROM rows WHERE state='succeeded' AND from_cache=0 "
                "AND lane=0 AND request_key IS NOT NULL AND idx > ? ORDER BY idx LIMIT ?",
                (after, limit),
            )
        ]

    def cache_keys(self, idxs: Sequence[int]) -> dict[int, tuple[bytes | None, int, str, str]]:
        """idx -> (request key, sampled, endpoint, model) of these rows."""
        found: dict[int, tuple[bytes | None, int, str, str]] = {}
        for i in range(0, len(idxs), 500):
            part = idxs[i : i + 500]
            query = f"SELECT idx, request_key, sampled, endpoint, model FROM rows WHERE idx IN ({_marks(part)})"
            found.update((r[0], r[1:]) for r in self._db.execute(query, part))
        return found

    def from_cache(self) -> tuple[int, float]:
        """(rows answered from the cache, what their answers cost when first paid for)."""
        n, saved = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(saved_cost), 0) FROM rows WHERE from_cache=1"
        ).fetchone()
        return int(n), float(saved)

    def pending_groups(self) -> list[tuple[str, str]]:
        """(endpoint, model) pairs that have pending rows, in order of their first row."""
        return [(e, m) for e, m, _n in self.pending_group_counts()]

    def pending_group_counts(self) -> list[tuple[str, str, int]]:
        """(endpoint, model, pending rows) of each pair that has pending rows, in order of their first row."""
        return self._db.execute(
            "SELECT endpoint, model, COUNT(*) FROM rows WHERE state='pending' GROUP BY endpoint, model "
            "ORDER BY MIN(idx)"
        ).fetchall()

    def pending_rows(self, endpoint: str, model: str, after: int = -1, limit: int = -1) -> list[PendingRow]:
        """Pending rows of an endpoint and model past `after`, in input order, at most `limit` of them (-1: all)."""
        cur = self._db.execute(
            "SELECT idx, COALESCE(wire_length, length + 1), est_input, est_output FROM rows "
            "WHERE state='pending' AND endpoint=? AND model=? AND idx > ? ORDER BY idx LIMIT ?",
            (endpoint, model, after, limit),
        )
        return list(map(_as_pending, cur))

    def chunk_rows(self, chunk_id: int) -> list[ChunkRow]:
        """The rows of a chunk still waiting for their results, in input order."""
        cur = self._db.execute(
            "SELECT idx, file_no, offset, length, custom_id, remote_id, rewrite, model, attempts FROM rows "
            "WHERE chunk_id=? AND state='queued' ORDER BY idx",
            (chunk_id,),
        )
        return list(map(_as_chunk_row, cur))

    def export_rows(self) -> Iterator[ExportRow]:
        """Every row, in input order, with its result or error."""
        for idx, file_no, line, cid, state, blob, rfile, roff, rlen, error, lane, model, cached in self._db.execute(
            "SELECT idx, file_no, line, custom_id, state, result, result_file, result_offset, result_length, error, "
            "lane, model, from_cache FROM rows ORDER BY idx"
        ):
            result = _result(blob, rfile, roff, rlen, cached, cid)
            yield _as_export_row((idx, file_no, line, cid, state, result, error, lane, model))

    # -- failover across providers (`_failover.py`) ---------------------------------------

    def active_lane(self) -> int:
        """The provider the job is on: the lane of its rows not final yet (one lane at a time
        has any), else the furthest lane a row reached."""
        lane = self._one("SELECT MIN(lane) FROM rows WHERE state IN ('pending', 'queued')")
        return int(lane if lane is not None else self._one("SELECT COALESCE(MAX(lane), 0) FROM rows"))

    def failover_lane(self, below: int) -> int | None:
        """The lowest lane under `below` with rows that failed for a reason the next provider
        may not have (None: none)."""
        lane = self._one("SELECT MIN(lane) FROM rows WHERE state='failed' AND failover=1 AND lane < ?", (below,))
        return None if lane is None else int(lane)

    def failover_rows(self, lane: int, after: int, limit: int) -> list[DirectRow]:
        """Rows of `lane` that failed and may go to the next provider, past `after`, in input order."""
        return [
            DirectRow._make(r)
            for r in self._db.execute(
                "SELECT idx, file_no, offset, length, custom_id, remote_id, rewrite, endpoint, model, attempts "
                "FROM rows WHERE state='failed' AND failover=1 AND lane=? AND idx > ? ORDER BY idx LIMIT ?",
                (lane, after, limit),
            )
        ]

    def fail_over(
        self, lane: int, model: str, moved: Sequence[tuple[str | None, int | None, int]], kept: Sequence[int]
    ) -> None:
        """Sends failed rows to lane `lane` as pending rows of `model`, each with (the id the
        provider is sent, its size as sent, idx), their attempts and results cleared; the rows
        `kept` (the next provider refuses them) stay failed for good. One transaction."""
        with self._tx() as db:
            n = db.executemany(
                "UPDATE rows SET state='pending', lane=?, model=?, rewrite=1, remote_id=?, wire_length=?, attempts=0, "
                "failover=0, chunk_id=NULL, result=NULL, result_file=NULL, result_offset=NULL, result_length=NULL, "
                "error=NULL WHERE idx=? AND state='failed' AND failover=1 AND lane=?",
                [(lane, model, rid, wire, idx, lane - 1) for rid, wire, idx in moved],
            ).rowcount
            if n != len(moved):
                raise StateError(f"expected to move {len(moved)} failed rows to fallback {lane}, moved {n}")
            db.executemany("UPDATE rows SET failover=0 WHERE idx=?", [(i,) for i in kept])
            self._event(db, "failover", f"{n} failed rows to fallback {lane} ({model}), {len(kept)} refused by it")

    def lane_counts(self) -> list[tuple[int, str | None, str, int]]:
        """(lane, model, state, rows) of the valid rows, by the provider they are with."""
        return self._db.execute(
            "SELECT lane, model, state, COUNT(*) FROM rows WHERE state != 'invalid' GROUP BY lane, model, state "
            "ORDER BY lane, model, state"
        ).fetchall()

    # -- chunks --------------------------------------------------------------------------

    def chunk_count(self) -> int:
        """Chunks ever planned (abandoned ones too)."""
        return int(self._one("SELECT COUNT(*) FROM chunks"))

    def last_chunk_no(self, prefix: str) -> int:
        """The highest number of the tags `<prefix><number>` the store knows (abandoned chunks and
        batches adopted from the provider too), 0 when none: a new tag takes the next one, so tags
        are never reused, even where the store lost chunks that the provider still has."""
        return int(
            self._one(
                "SELECT COALESCE(MAX(CAST(SUBSTR(tag, ?) AS INTEGER)), 0) FROM chunks WHERE SUBSTR(tag, 1, ?) = ?",
                (len(prefix) + 1, len(prefix), prefix),
            )
        )

    def tag_batches(self) -> dict[str, str | None]:
        """Every chunk tag the store knows, with the remote batch it records for it (None: none)."""
        return dict(self._db.execute("SELECT tag, batch_id FROM chunks"))

    def adopt_batch(
        self, tag: str, batch_id: str, remote_status: str, file_id: str | None, submitted_at: int, ids: Sequence[str]
    ) -> int:
        """Records a remote batch the store had lost (a damaged or rolled-back store) as the
        submitted chunk `tag`, in one transaction; returns how many rows it took.

        `ids`: the ids its lines were sent under (a row's `remote_id`, else its `custom_id`).
        The batch takes those of its rows that are pending; rows already final or queued in
        another chunk are left where they are (results only ever land on a chunk's queued rows,
        so nothing counts twice). The chunk row with this tag is reused where there is one (a
        planned chunk dissolved first, an uploaded one the rollback left); its rows that the
        batch does not hold go back to pending. With no row to take, the chunk is recorded as
        `abandoned` with the batch's id: the tag stays taken, and the batch is known.
        """
        with self._tx() as db:
            idxs: list[int] = []
            for i in range(0, len(ids), 500):
                part = list(ids[i : i + 500])
                idxs.extend(
                    idx
                    for (idx,) in db.execute(
                        "SELECT idx FROM rows WHERE state != 'invalid' AND COALESCE(remote_id, custom_id) "
                        f"IN ({_marks(part)})",
                        part,
                    )
                )
            existing = db.execute("SELECT id, state, batch_id FROM chunks WHERE tag=?", (tag,)).fetchone()
            if existing is not None and existing[1] in ("submitted", "collected"):
                raise StateError(f"chunk {tag} already has batch {existing[2]}; not adopting {batch_id}")
            if existing is not None:
                chunk_id = int(existing[0])
                keep = set(idxs)
                stray = [
                    (idx,)
                    for (idx,) in db.execute("SELECT idx FROM rows WHERE chunk_id=? AND state='queued'", (chunk_id,))
                    if idx not in keep
                ]
                db.executemany(
                    "UPDATE rows SET state='pending', chunk_id=NULL, attempts=MAX(attempts-1, 0) WHERE idx=?", stray
                )
            else:
                first = (
                    db.execute(
                        f"SELECT endpoint, model FROM rows WHERE idx IN ({_marks(idxs[:1])})", idxs[:1]
                    ).fetchone()
                    if idxs
                    else None
                )
                cur = db.execute(
                    "INSERT INTO chunks (tag, endpoint, model, rows, bytes, est_input, est_output, est_cost, state, "
                    "created_at) VALUES (?, ?, ?, 0, 0, 0, 0, 0, 'abandoned', ?)",
                    (tag, first[0] if first else "", first[1] if first else "", submitted_at),
                )
                chunk_id = int(cur.lastrowid or 0)
            for i in range(0, len(idxs), 500):
                part = idxs[i : i + 500]
                db.execute(
                    "UPDATE rows SET state='queued', chunk_id=?, attempts=attempts+1 "
                    f"WHERE state='pending' AND idx IN ({_marks(part)})",
                    (chunk_id, *part),
                )
            n, *sums = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(COALESCE(wire_length, length + 1)), 0), COALESCE(SUM(est_input), 0), "
                "COALESCE(SUM(est_output), 0) "
                "FROM rows WHERE chunk_id=? AND state='queued'",
                (chunk_id,),
            ).fetchone()
            db.execute(
                "UPDATE chunks SET state=?, rows=?, bytes=?, est_input=?, est_output=?, batch_id=?, remote_status=?, "
                "file_id=COALESCE(?, file_id), submitted_at=? WHERE id=?",
                ("submitted" if n else "abandoned", n, *sums, batch_id, remote_status, file_id, submitted_at, chunk_id),
            )
            self._event(
                db, "adopted", f"chunk {tag}: adopted batch {batch_id}, found at the provider ({n} rows)", chunk_id
            )
        return n

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
        lane: int = 0,
    ) -> int:
        """Records a chunk and queues its rows, in one transaction (the plan survives a crash)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO chunks (tag, endpoint, model, rows, bytes, est_input, est_output, est_cost, state, "
                "created_at, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'planned', ?, ?)",
                (tag, endpoint, model, len(idxs), nbytes, est_in, est_out, cost, int(time.time()), lane),
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
            self._event(db, "plan", f"chunk {tag}: {len(idxs)} rows of {model} ({nbytes} bytes)", chunk_id)
        return chunk_id

    def dissolve_planned(self) -> int:
        """Returns the rows of chunks never sent back to pending (for a re-plan under new limits).

        Only `planned` chunks: nothing remote carries their tags. They are kept as `abandoned`.
        """
        with self._tx() as db:
            db.execute(
                "UPDATE rows SET state='pending', chunk_id=NULL, attempts=MAX(attempts-1, 0) "
                "WHERE state='queued' AND chunk_id IN (SELECT id FROM chunks WHERE state='planned')"
            )
            n = db.execute("UPDATE chunks SET state='abandoned' WHERE state='planned'").rowcount
            if n:
                self._event(db, "replan", f"{n} unsent chunks dissolved to re-plan under new limits")
        return n

    def replan_chunk(self, chunk_id: int, from_: Sequence[str], message: str, failed: Sequence[Failure] = ()) -> int:
        """Dissolves one chunk that no batch holds or can come to hold, in one transaction: rows
        in `failed` (which no batch can take) fail for good, the others go back to pending with
        their attempt given back, and the chunk is kept as `abandoned` (its tag stays taken).
        Returns how many rows went back; raises StateError when the chunk is not in `from_`.

        The caller vouches that nothing remote holds the chunk: its create was refused, or never
        sent (`create_tried`).
        """
        with self._tx() as db:
            changed = db.execute(
                f"UPDATE chunks SET state='abandoned' WHERE id=? AND state IN ({_marks(from_)})", (chunk_id, *from_)
            ).rowcount
            if changed != 1:
                raise StateError(f"chunk {chunk_id} cannot be re-planned: not in {', '.join(from_)}")
            self._apply(db, Outcome(0, failed=list(failed)))
            n = db.execute(
                "UPDATE rows SET state='pending', chunk_id=NULL, attempts=MAX(attempts-1, 0) "
                "WHERE chunk_id=? AND state='queued'",
                (chunk_id,),
            ).rowcount
            self._event(db, "replan", message, chunk_id)
        return n

    def create_tried(self, chunk_id: int) -> bool:
        """Whether a create was ever asked for this chunk (it entered `creating`): then a batch may
        hold it even where no lookup found one, and it is never re-planned but for a refusal."""
        return bool(self._one("SELECT EXISTS(SELECT 1 FROM events WHERE chunk_id=? AND kind='creating')", (chunk_id,)))

    def chunks(self, states: Sequence[str] | None = None) -> list[Chunk]:
        if states is None:
            rows = self._db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks ORDER BY id").fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE state IN ({_marks(states)}) ORDER BY id", tuple(states)
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
        with self._tx() as db:
            changed = db.execute(
                f"UPDATE chunks SET {', '.join(f'{k}=?' for k in sets)} WHERE id=? AND state IN ({_marks(from_)})",
                (*sets.values(), chunk_id, *from_),
            ).rowcount
            if changed != 1:
                raise StateError(f"chunk {chunk_id} cannot move to {to}: not in {', '.join(from_)}")
            self._event(db, to, message or f"chunk {chunk_id} -> {to}", chunk_id)

    def chunk_of_tag(self, tag: str) -> Chunk | None:
        row = self._db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE tag=?", (tag,)).fetchone()
        return Chunk(*row) if row is not None else None

    def queued_estimates(self, chunk_id: int) -> list[tuple[int, int]]:
        """(estimated input, output tokens) of each row of a chunk still waiting for its result."""
        return self._db.execute(
            "SELECT est_input, est_output FROM rows WHERE chunk_id=? AND state='queued'", (chunk_id,)
        ).fetchall()

    def update_chunk(self, chunk_id: int, **columns: Any) -> None:
        """Records remote progress (no state change)."""
        with self._tx() as db:
            db.execute(
                f"UPDATE chunks SET {', '.join(f'{k}=?' for k in columns)} WHERE id=?", (*columns.values(), chunk_id)
            )

    def _apply(self, db: sqlite3.Connection, outcome: Outcome) -> None:
        db.executemany(
            "UPDATE rows SET state='succeeded', result=?, result_file=?, result_offset=?, result_length=?, "
            "input_tokens=?, output_tokens=?, cached_tokens=?, reasoning_tokens=?, cost=?, error=NULL "
            "WHERE idx=? AND state='queued'",
            [(*_result_columns(r.result), *r[1:]) for r in outcome.succeeded],
        )
        db.executemany(
            "UPDATE rows SET state='pending', chunk_id=NULL, error=? WHERE idx=? AND state='queued'", outcome.retry
        )
        db.executemany(
            "UPDATE rows SET state='pending', chunk_id=NULL, error=?, attempts=MAX(attempts-1, 0) "
            "WHERE idx=? AND state='queued'",
            outcome.refund,
        )
        db.executemany(
            "UPDATE rows SET state='failed', result=?, result_file=?, result_offset=?, result_length=?, error=?, "
            "failover=? WHERE idx=? AND state='queued'",
            [(*_result_columns(r.result), r.error, int(r.failover), r.idx) for r in outcome.failed],
        )

    def result_file(self, path: str, size: int, sha256: str, file_id: str, chunk_id: int) -> int:
        """The id of a downloaded result file (a path under the job directory), registered with
        what it was when downloaded; downloaded again (a run killed before applying it), it
        keeps its id and gets its new size and hash."""
        with self._tx() as db:
            return int(
                db.execute(
                    "INSERT INTO result_files (path, size, sha256, file_id, chunk_id) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET size=excluded.size, sha256=excluded.sha256, "
                    "file_id=excluded.file_id, chunk_id=excluded.chunk_id RETURNING id",
                    (path, size, sha256, file_id, chunk_id),
                ).fetchone()[0]
            )

    def result_files(self) -> dict[int, str]:
        return dict(self._db.execute("SELECT id, path FROM result_files"))

    def referenced_result_files(self) -> list[ResultFile]:
        """The result files rows point into, each with how far into it they point."""
        return [
            ResultFile._make(r)
            for r in self._db.execute(
                "SELECT f.id, f.path, f.size, f.sha256, f.file_id, "
                "COALESCE(f.chunk_id, (SELECT chunk_id FROM rows WHERE result_file=f.id AND chunk_id IS NOT NULL "
                "LIMIT 1)), r.extent, r.n FROM result_files f JOIN "
                "(SELECT result_file, MAX(result_offset + result_length) AS extent, COUNT(*) AS n FROM rows "
                "WHERE result_file IS NOT NULL GROUP BY result_file) r ON r.result_file = f.id ORDER BY f.id"
            )
        ]

    def refs_into(self, file: int) -> list[tuple[int, str | None, str | None]]:
        """(idx, custom_id, remote_id) of the rows whose results are lines of result file `file`."""
        return self._db.execute(
            "SELECT idx, custom_id, remote_id FROM rows WHERE result_file=? ORDER BY idx", (file,)
        ).fetchall()

    def repoint(self, file: int, size: int, sha256: str, lines: Sequence[tuple[int, int, int]]) -> None:
        """Records a result file downloaded again, whose lines moved: its new size and hash and
        each row's (offset, length, idx) in it, in one transaction."""
        with self._tx() as db:
            db.execute("UPDATE result_files SET size=?, sha256=? WHERE id=?", (size, sha256, file))
            db.executemany(
                "UPDATE rows SET result_offset=?, result_length=? WHERE idx=? AND result_file=?",
                [(*line, file) for line in lines],
            )
            self._event(db, "redownloaded", f"result file {file}: downloaded again, {len(lines)} rows re-pointed")

    def collect(self, chunk_id: int, outcome: Outcome, remote_status: str) -> None:
        """Applies a finished chunk's results and marks it collected, in one transaction.

        A result is its line's bytes, or a `ResultRef` to the line in a downloaded file (which
        the caller fsynced first).
        """
        u = outcome.unmatched
        with self._tx() as db:
            self._apply(db, outcome)
            changed = db.execute(
                "UPDATE chunks SET state='collected', remote_status=?, finished_at=?, unmatched_input_tokens=?, "
                "unmatched_output_tokens=?, unmatched_cached_tokens=?, unmatched_reasoning_tokens=?, unmatched_cost=? "
                "WHERE id=? AND state='submitted'",
                (remote_status, int(time.time()), u.input_tokens, u.output_tokens, u.cached_tokens,
                 u.reasoning_tokens, u.cost, chunk_id),
            ).rowcount  # fmt: skip
            if changed != 1:
                raise StateError(f"chunk {chunk_id} was not submitted; its results were not applied")
            self._event(db, "collected", f"chunk {chunk_id}: {outcome.describe()}", chunk_id)

    def pending_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM rows WHERE state='pending'"))

    def start_direct(self, groups: Sequence[tuple[str, str]] | None = None) -> list[DirectRow]:
        """Queues the pending rows for the direct API (chunk_id NULL) and returns them: every one,
        or those of the (endpoint, model) `groups`."""
        where = "state='pending'"
        params: list[str] = []
        if groups is not None:
            where += f" AND (endpoint, model) IN (VALUES {', '.join('(?, ?)' for _ in groups) or '(NULL, NULL)'})"
            params = [v for g in groups for v in g]
        with self._tx() as db:
            rows = db.execute(
                "SELECT idx, file_no, offset, length, custom_id, remote_id, rewrite, endpoint, model, attempts + 1 "
                f"FROM rows WHERE {where} ORDER BY idx",
                params,
            ).fetchall()
            db.execute(f"UPDATE rows SET state='queued', chunk_id=NULL, attempts=attempts+1 WHERE {where}", params)
            self._event(db, "direct", f"{len(rows)} rows sent to the direct API")
        return [DirectRow._make(r) for r in rows]

    def finish_direct(self, outcome: Outcome) -> None:
        with self._tx() as db:
            self._apply(db, outcome)

    def requeue_interrupted_direct(self) -> int:
        """Rows that were with the direct API when the process died go back to pending."""
        with self._tx() as db:
            return db.execute("UPDATE rows SET state='pending' WHERE state='queued' AND chunk_id IS NULL").rowcount

    def in_flight_cost(self) -> float:
        """Estimated cost of chunks submitted (or about to be) and not yet collected."""
        query = f"SELECT COALESCE(SUM(est_cost), 0) FROM chunks WHERE state IN ({_marks(IN_FLIGHT)})"
        return float(self._one(query, IN_FLIGHT))

    def estimated_cost(self) -> float:
        """Estimated cost of every chunk planned so far (at batch prices); a chunk re-planned
        (abandoned) is not counted, its rows are in the chunks planned after it."""
        return float(self._one("SELECT COALESCE(SUM(est_cost), 0) FROM chunks WHERE state != 'abandoned'"))

    def in_flight_tokens(self, model: str) -> int:
        """Estimated prompt tokens of this model's chunks in flight (the provider's enqueued-token queue)."""
        return int(
            self._one(
                "SELECT COALESCE(SUM(est_input), 0) FROM chunks WHERE model=? AND state IN ('creating','submitted')",
                (model,),
            )
        )

    def events(self, limit: int = 50) -> list[tuple[float, str, int | None, str]]:
        return self._db.execute(
            "SELECT at, kind, chunk_id, message FROM events ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()[::-1]

    # -- watching a job (read-only) ------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """One consistent view of the job for several reads: a read transaction. In WAL mode it
        never blocks the writer, but while it is open the writer's checkpoints cannot reset the
        WAL, so keep it to the reads (never across rendering a page)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    def finished_by_chunk(self) -> list[tuple[float, int, int, float]]:
        """(when, succeeded, failed, cost) of the rows each chunk finished, oldest first: what the
        job did over time, for a chart. `when` is the chunk's last event in the job's log (its
        collection); its unmatched results' cost counts with it. Rows finished outside any chunk
        (direct calls) count at the last `direct` event, invalid rows at the job's creation."""
        when = dict(
            self._db.execute("SELECT chunk_id, MAX(at) FROM events WHERE chunk_id IS NOT NULL GROUP BY chunk_id")
        )
        unmatched = dict(self._db.execute("SELECT id, unmatched_cost FROM chunks WHERE unmatched_cost > 0"))
        direct_at = self._one("SELECT MAX(at) FROM events WHERE kind='direct'")
        created_at = self._one("SELECT MIN(at) FROM events")
        steps: list[tuple[float, int, int, float]] = []
        for chunk_id, invalid, ok, bad, cost in self._db.execute(
            "SELECT chunk_id, state='invalid', SUM(state='succeeded'), SUM(state!='succeeded'), COALESCE(SUM(cost), 0) "
            "FROM rows WHERE state IN ('succeeded', 'failed', 'invalid') GROUP BY chunk_id, state='invalid'"
        ):
            at = created_at if invalid else when.get(chunk_id) if chunk_id is not None else direct_at
            steps.append((float(at or created_at or 0), int(ok), int(bad), float(cost) + unmatched.pop(chunk_id, 0.0)))
        steps += [(float(when.get(c) or created_at or 0), 0, 0, float(cost)) for c, cost in unmatched.items()]
        return sorted(steps)

    def failures(self, after: int = -1, limit: int = 50) -> list[tuple[int, int, int, str | None, str, str | None]]:
        """(idx, file_no, line, custom_id, state, error) of the failed and invalid rows past row
        `after`, in input order, at most `limit` of them."""
        return self._db.execute(
            "SELECT idx, file_no, line, custom_id, state, error FROM rows "
            "WHERE state IN ('failed', 'invalid') AND idx > ? ORDER BY idx LIMIT ?",
            (after, limit),
        ).fetchall()

    def last_event_at(self, kind: str | None = None, message: str | None = None) -> float | None:
        """When the job's log last recorded an event (of `kind`, with `message`, where given)."""
        query = "SELECT MAX(at) FROM events WHERE (?1 IS NULL OR kind=?1) AND (?2 IS NULL OR message=?2)"
        return self._one(query, (kind, message))  # type: ignore[no-any-return]


# Every public method reports a damaged file as DamagedJob, naming the job and what to do.
for _name, _method in list(vars(JobStore).items()):
    if _name == "__init__" or (not _name.startswith("_") and inspect.isfunction(_method)):
        setattr(JobStore, _name, _translating(_method))
del _name, _method
