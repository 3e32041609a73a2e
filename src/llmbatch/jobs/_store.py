"""A job's durable state: one SQLite file per job directory, and all of its SQL.

Rows are the job's input rows in input order (`idx`), each pointing back at its file, line and
byte range, so request bodies are never copied. Chunks are the planned remote batches. Every
chunk transition is one guarded UPDATE that fails loudly when the chunk is not where the
caller thinks it is; intent (`uploading`, `creating`) is recorded before each remote call.
"""

from __future__ import annotations

import inspect
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from .._exceptions import StateError
from ._records import (
    ROW_STATES,
    CheckedRow,
    ChunkRow,
    DirectRow,
    ExportRow,
    InputRow,
    ModelEstimate,
    PendingRow,
    RequestRow,
    Result,
    Success,
)
from ._store_base import SENDABLE, as_chunk_row, as_export_row, as_pending, marks, row_result, translating
from ._store_chunks import ChunkStore

__all__ = ["JobStore"]

_INSERT_ROW = (
    "INSERT INTO rows (idx, file_no, line, offset, length, custom_id, remote_id, rewrite, endpoint, model, "
    "est_input, est_output, uncapped, state, error, wire_length, request_key, sampled) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class JobStore(ChunkStore):
    """The SQLite file of one job; the only place that knows its SQL (its chunks' in
    `_store_chunks.py`, opening it in `_store_base.py`)."""

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
                f"FROM rows WHERE state IN ('succeeded', 'failed', 'invalid') AND custom_id IN ({marks(part)}) "
                "AND NOT (from_cache = 1 AND result IS NULL)",  # a cached answer not copied in yet
                part,
            ):
                found.append((cid, state, row_result(blob, rfile, roff, rlen, cached, cid), error))
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
            query = f"SELECT custom_id FROM rows WHERE custom_id IN ({marks(part)})"
            found.update(cid for (cid,) in self._db.execute(query, part))
        return found

    def estimate_by_model(self, long_prompt: int) -> list[ModelEstimate]:
        """Estimated tokens of the valid rows to send, by model (rows answered from the cache, and
        rows repeating an earlier one, are not sent); "long" rows have more than `long_prompt` input tokens."""
        return [
            ModelEstimate._make(r)
            for r in self._db.execute(
                "SELECT model, COUNT(*), SUM(est_input), SUM(est_output), SUM(uncapped), SUM(est_input > ?1), "
                "SUM(CASE WHEN est_input > ?1 THEN est_input ELSE 0 END), "
                "SUM(CASE WHEN est_input > ?1 THEN est_output ELSE 0 END) FROM rows "
                "WHERE state != 'invalid' AND from_cache = 0 AND repeat_of IS NULL GROUP BY model ORDER BY model",
                (long_prompt,),
            )
        ]

    def estimated_tokens(self) -> tuple[int, int]:
        """Estimated (input, output) tokens of every valid row to send (not answered from the cache)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(est_input),0), COALESCE(SUM(est_output),0) FROM rows "
            "WHERE state!='invalid' AND from_cache=0 AND repeat_of IS NULL"
        ).fetchone()
        return int(row[0]), int(row[1])

    def pending_estimates(self) -> list[tuple[str, int, int]]:
        """(model, estimated input, output tokens) of each pending row to send (`SENDABLE`)."""
        return self._db.execute(f"SELECT model, est_input, est_output FROM rows WHERE {SENDABLE}").fetchall()

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
            Success(row_result(blob, rfile, roff, rlen), inp, out, cached, reasoning, cost, idx)
            for blob, rfile, roff, rlen, inp, out, cached, reasoning, cost, idx in self._db.execute(
                "SELECT result, result_file, result_offset, result_length, input_tokens, output_tokens, "
                "cached_tokens, reasoning_tokens, cost, idx FROM rows WHERE state='succeeded' AND from_cache=0 "
                "AND lane=0 AND request_key IS NOT NULL AND idx > ? ORDER BY idx LIMIT ?",
                (after, limit),
            )
        ]

    def hold_repeats(self) -> int:
        """Holds back the pending rows that repeat an earlier row of the job still to be answered
        (the same request key, not sampled, with the job's own provider): only the first is sent,
        and each repeat points at it (`repeat_of`) until its answer can be taken from the cache
        (`_cache.answer_repeats`). Sampled rows are never held: asking twice is how a job samples twice.
        Returns how many rows are held now."""
        with self._tx() as db:
            db.execute(
                "UPDATE rows SET repeat_of = f.first FROM (SELECT request_key, MIN(idx) AS first FROM rows "
                "WHERE state IN ('pending', 'queued') AND lane = 0 AND sampled = 0 AND request_key IS NOT NULL "
                "AND repeat_of IS NULL GROUP BY request_key HAVING COUNT(*) > 1) AS f "
                "WHERE rows.request_key = f.request_key AND rows.idx > f.first AND rows.state = 'pending' "
                "AND rows.lane = 0 AND rows.sampled = 0 AND rows.repeat_of IS NULL"
            )
        return self.held_repeats()

    def held_repeats(self) -> int:
        """Pending rows held back because they repeat an earlier row (`hold_repeats`)."""
        return int(self._one("SELECT COUNT(*) FROM rows WHERE repeat_of IS NOT NULL AND state = 'pending'"))

    def repeats_ready(self) -> bool:
        """Whether a held repeat's first row is final (its answer may be in the cache now)."""
        return (
            self._db.execute(
                "SELECT 1 FROM rows r JOIN rows f ON f.idx = r.repeat_of WHERE r.repeat_of IS NOT NULL "
                "AND r.state = 'pending' AND f.state IN ('succeeded', 'failed', 'invalid') LIMIT 1"
            ).fetchone()
            is not None
        )

    def release_repeats(self, *, every: bool = False) -> int:
        """Sends the held repeats whose first row is final and whose answer the cache did not
        give them (it failed, or its answer could not be kept): they are rows to send again. With
        `every`, all held repeats (a run without the cache). Returns how many."""
        first_final = (
            ""
            if every
            else (" AND repeat_of IN (SELECT idx FROM rows WHERE state IN ('succeeded', 'failed', 'invalid'))")
        )
        with self._tx() as db:
            return db.execute(f"UPDATE rows SET repeat_of = NULL WHERE repeat_of IS NOT NULL{first_final}").rowcount

    def cache_keys(self, idxs: Sequence[int]) -> dict[int, tuple[bytes | None, int, str, str]]:
        """idx -> (request key, sampled, endpoint, model) of these rows."""
        found: dict[int, tuple[bytes | None, int, str, str]] = {}
        for i in range(0, len(idxs), 500):
            part = idxs[i : i + 500]
            query = f"SELECT idx, request_key, sampled, endpoint, model FROM rows WHERE idx IN ({marks(part)})"
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
        """(endpoint, model, pending rows to send) of each pair that has some, in order of their first row."""
        return self._db.execute(
            f"SELECT endpoint, model, COUNT(*) FROM rows WHERE {SENDABLE} GROUP BY endpoint, model ORDER BY MIN(idx)"
        ).fetchall()

    def pending_rows(self, endpoint: str, model: str, after: int = -1, limit: int = -1) -> list[PendingRow]:
        """Pending rows to send (`SENDABLE`) of an endpoint and model past `after`, in input order, at
        most `limit` of them (-1: all)."""
        cur = self._db.execute(
            "SELECT idx, COALESCE(wire_length, length + 1), est_input, est_output FROM rows "
            f"WHERE {SENDABLE} AND endpoint=? AND model=? AND idx > ? ORDER BY idx LIMIT ?",
            (endpoint, model, after, limit),
        )
        return list(map(as_pending, cur))

    def chunk_rows(self, chunk_id: int) -> list[ChunkRow]:
        """The rows of a chunk still waiting for their results, in input order."""
        cur = self._db.execute(
            "SELECT idx, file_no, offset, length, custom_id, remote_id, rewrite, model, attempts FROM rows "
            "WHERE chunk_id=? AND state='queued' ORDER BY idx",
            (chunk_id,),
        )
        return list(map(as_chunk_row, cur))

    def export_rows(self) -> Iterator[ExportRow]:
        """Every row, in input order, with its result or error."""
        for idx, file_no, line, cid, state, blob, rfile, roff, rlen, error, lane, model, cached in self._db.execute(
            "SELECT idx, file_no, line, custom_id, state, result, result_file, result_offset, result_length, error, "
            "lane, model, from_cache FROM rows ORDER BY idx"
        ):
            result = row_result(blob, rfile, roff, rlen, cached, cid)
            yield as_export_row((idx, file_no, line, cid, state, result, error, lane, model))

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
# (Its own and those of the classes it is built on: each wrapped once, here.)
for _name, _method in inspect.getmembers(JobStore, inspect.isfunction):
    if _name == "__init__" or not _name.startswith("_"):
        setattr(JobStore, _name, translating(_method))
del _name, _method
