"""The job store's schema and its migrations: `MIGRATIONS[n]` takes a job database from
version n to n + 1 (`PRAGMA user_version`); `JobStore` applies the ones a database lacks when it
opens it, in one transaction."""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Callable

import orjson

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

#: The first schema, as every release before versioning made it (`IF NOT EXISTS`: a database
#: from before versioning has it already, and migrating it to version 1 changes nothing).
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS job (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL,
    estimate TEXT
);
CREATE TABLE IF NOT EXISTS rows (
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
CREATE UNIQUE INDEX IF NOT EXISTS rows_custom_id ON rows(custom_id) WHERE custom_id IS NOT NULL AND state != 'invalid';
-- Only pending rows: results landing on queued rows then touch no index.
CREATE INDEX IF NOT EXISTS rows_pending ON rows(endpoint, model, idx) WHERE state='pending';
-- Rows get a chunk when planned: pending ones, which have none, stay out of the index.
CREATE INDEX IF NOT EXISTS rows_chunk ON rows(chunk_id) WHERE chunk_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS chunks (
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
CREATE TABLE IF NOT EXISTS result_files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    chunk_id INTEGER,
    message TEXT NOT NULL
)
"""


def _v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        db.execute(statement)


def _v2(db: sqlite3.Connection) -> None:
    """What a result file was when it was downloaded (its size and sha256, so that a file cut
    short or changed since is caught before it is exported), and where it came from (the
    provider's file id and the chunk, so that it can be downloaded again). NULL in files
    recorded before version 2."""
    for column in ("size INTEGER", "sha256 TEXT", "file_id TEXT", "chunk_id INTEGER"):
        db.execute(f"ALTER TABLE result_files ADD COLUMN {column}")


def _v3(db: sqlite3.Connection) -> None:
    """Usage and cost of a chunk's results that matched none of its rows (a provider that
    dropped their ids): generated and billed, so counted in the job's totals, on no row."""
    for column in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
        db.execute(f"ALTER TABLE chunks ADD COLUMN unmatched_{column} INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE chunks ADD COLUMN unmatched_cost REAL NOT NULL DEFAULT 0")


def _v4(db: sqlite3.Connection) -> None:
    """Each row's size in a batch as the provider receives it, where the provider translates
    (`Provider.check_and_measure`): chunks are planned on it. NULL in rows read before version 4, and
    where the OpenAI line is what is sent."""
    db.execute("ALTER TABLE rows ADD COLUMN wire_length INTEGER")


def _v5(db: sqlite3.Connection) -> None:
    """The response cache (`_cache.py`): each row's request key (`_rows.request_key` of the
    body the provider is sent) and whether its answer is sampled (`_rows.samples`), set when
    the row is read; and, for a row answered from the cache, `from_cache` 1 and `saved_cost`
    what its answer cost when it was first paid for. NULL keys in rows read before version 5:
    those rows are neither looked up nor stored."""
    db.execute("ALTER TABLE rows ADD COLUMN request_key BLOB")
    db.execute("ALTER TABLE rows ADD COLUMN sampled INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE rows ADD COLUMN from_cache INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE rows ADD COLUMN saved_cost REAL NOT NULL DEFAULT 0")


def _v6(db: sqlite3.Connection) -> None:
    """Cross-provider failover (`_failover.py`): each row's `lane` (0: the job's provider, n: its
    n-th `--fallback`) and `failover` 1 when it failed for good for a reason another provider
    may not have (expired, cancelled, 5xx, quota); each chunk's `lane`, and `cut` 1 once
    `--fallback-after` cancelled its batch (rows it did not answer go to the next provider)."""
    db.execute("ALTER TABLE rows ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE rows ADD COLUMN failover INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE chunks ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE chunks ADD COLUMN cut INTEGER NOT NULL DEFAULT 0")


def _v7(db: sqlite3.Connection) -> None:
    """The response cache copies its answers in by reference first (`_cache.answer_from_cache`):
    `answer`, the cache's id of the answer a row takes, and `result` then holds the answer's
    compressed record (`CachedResult`), not its line. Rows answered from the cache before
    version 7 hold their lines: each becomes the record it was made of."""
    db.execute("ALTER TABLE rows ADD COLUMN answer INTEGER")
    rows = db.execute("SELECT idx, result FROM rows WHERE from_cache = 1 AND result IS NOT NULL").fetchall()
    packed = []
    for idx, line in rows:
        record = orjson.loads(line)
        for name in ("id", "custom_id", "cached"):
            record.pop(name, None)
        packed.append((zlib.compress(orjson.dumps(record)), idx))
    db.executemany("UPDATE rows SET result = ? WHERE idx = ?", packed)


def _v8(db: sqlite3.Connection) -> None:
    """Rows that repeat an earlier row of the job (the same request, not sampled), with the
    response cache on: `repeat_of` the idx of the first, which alone is sent; the repeat takes
    its answer from the cache once the first's is there, or is sent after all when the first
    fails (`JobStore.hold_repeats`)."""
    db.execute("ALTER TABLE rows ADD COLUMN repeat_of INTEGER")
    db.execute("CREATE INDEX rows_repeats ON rows(repeat_of) WHERE repeat_of IS NOT NULL")


#: Ordered migrations: `MIGRATIONS[n]` takes a database from version n to n + 1. Append a
#: function for each schema change, never edit one that shipped: job databases made by every
#: earlier release must open (tests/jobs/test_store_migrations.py opens one).
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
#: The schema version this release writes (`PRAGMA user_version`).
SCHEMA_VERSION = len(MIGRATIONS)
