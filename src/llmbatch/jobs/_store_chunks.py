"""The job store's chunks: planning rows into chunks, every chunk transition as one guarded
UPDATE, collected outcomes applied to their rows, the result files rows point into, and the
rows sent directly. Part of `JobStore` (`_store.py`)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from .._exceptions import StateError
from ._records import (
    IN_FLIGHT,
    Chunk,
    DirectRow,
    Failure,
    Outcome,
    ResultFile,
)
from ._store_base import SENDABLE, StoreBase, marks, result_columns

__all__ = ["ChunkStore"]

_CHUNK_COLUMNS = ", ".join(Chunk.__slots__)  # type: ignore[attr-defined]


class ChunkStore(StoreBase):
    """The chunks' SQL (see the module)."""

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
                        f"IN ({marks(part)})",
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
                        f"SELECT endpoint, model FROM rows WHERE idx IN ({marks(idxs[:1])})", idxs[:1]
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
                    f"WHERE state='pending' AND idx IN ({marks(part)})",
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
                f"WHERE {SENDABLE} AND endpoint=? AND model=? AND idx BETWEEN ? AND ?",
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
                f"UPDATE chunks SET state='abandoned' WHERE id=? AND state IN ({marks(from_)})", (chunk_id, *from_)
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
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE state IN ({marks(states)}) ORDER BY id", tuple(states)
            ).fetchall()
        return [Chunk(*r) for r in rows]

    def answered_in_running_batches(self) -> tuple[int, int]:
        """(rows answered, of them failed) inside the batches still running, as their providers
        last reported: rows finish there long before their batch ends and is collected."""
        done, failed = self._db.execute(
            "SELECT COALESCE(SUM(remote_completed + remote_failed), 0), COALESCE(SUM(remote_failed), 0) "
            "FROM chunks WHERE state='submitted'"
        ).fetchone()
        return int(done), int(failed)

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
                f"UPDATE chunks SET {', '.join(f'{k}=?' for k in sets)} WHERE id=? AND state IN ({marks(from_)})",
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
            [(*result_columns(r.result), *r[1:]) for r in outcome.succeeded],
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
            [(*result_columns(r.result), r.error, int(r.failover), r.idx) for r in outcome.failed],
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
        """Rows not sent yet: those to send, and repeats waiting for their first's answer."""
        return int(self._one("SELECT COUNT(*) FROM rows WHERE state='pending'"))

    def sendable_count(self) -> int:
        """Pending rows to send (`SENDABLE`)."""
        return int(self._one(f"SELECT COUNT(*) FROM rows WHERE {SENDABLE}"))

    def start_direct(self, groups: Sequence[tuple[str, str]] | None = None) -> list[DirectRow]:
        """Queues the pending rows to send for the direct API (chunk_id NULL) and returns them: every
        one, or those of the (endpoint, model) `groups`."""
        where = SENDABLE
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
        query = f"SELECT COALESCE(SUM(est_cost), 0) FROM chunks WHERE state IN ({marks(IN_FLIGHT)})"
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
