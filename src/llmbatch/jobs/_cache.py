"""The response cache: answers kept across jobs, so that a request asked again is never paid twice.

One SQLite file (`$LLMBATCH_HOME/cache.sqlite` unless `--cache-path`) shared by every job that
runs with `--cache`, in as many processes as you like (WAL, a busy timeout, every write one
short `BEGIN IMMEDIATE` transaction). An answer is found by two things:

- the request's key (`_rows.request_key`): the endpoint and the body the provider is sent
  (after the job's `--model`), as canonical JSON, custom_id left out;
- the scope: who answered it (`cache_scope`): the provider, its base URL when one was given,
  and for the local provider its engine and the engine's options.

What is kept is the answer's result record without its `id` and `custom_id` (they belong to
the row that asked), zlib-compressed, with the usage and cost it was paid for. Copies, not
references to the job's result files: those go when a job is removed (`llmbatch jobs rm`), and
an answer of ~1 KB compresses to ~400 bytes. A job that takes answers copies them into its own
store as they are kept (compressed; made into lines when its results are read), in two SQL
statements with the cache attached: first each row points at its answer (before planning),
then, once the first batch is on its way, the records are copied and the answers marked used.

The file is bounded (`--cache-max-size`): past it, the answers used least recently are deleted
until it is 10% under, and the space freed is given back to the file system (incremental vacuum).

Only answers that do not depend on chance are kept by default (`deterministic`: temperature 0,
or a seed, or an endpoint that does not sample): reusing a sampled answer would make a re-run
look reproducible when it was one draw. `all` keeps sampled ones too.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._exceptions import StateError
from .._paths import llmbatch_home
from ._export import ResultReader
from ._records import Outcome, Success
from ._settings import JobSettings
from ._store import JobStore
from ._store_base import marks, write_tx

if TYPE_CHECKING:
    from ._context import RunContext

__all__ = [
    "DEFAULT_CACHE_MAX_SIZE",
    "CacheStats",
    "Hit",
    "ResponseCache",
    "answer_from_cache",
    "keep_answers",
    "keep_earlier_answers",
    "cache_scope",
    "default_cache_path",
    "remember",
]

log = logging.getLogger("llmbatch.jobs")

#: The cache's default bound on the bytes it stores: 2 GB.
DEFAULT_CACHE_MAX_SIZE = 2 * 10**9
#: Bytes an answer counts for besides its compressed record: its key, scope, usage and index entries.
ENTRY_OVERHEAD = 100
#: Eviction frees down to this share of the bound, so that the next few answers do not evict again.
_EVICT_TO = 0.9
#: An answer used again within this many seconds of its last use is not marked again: LRU to
#: the hour, where marking each use would rewrite 100,000 rows on a re-run of 100,000.
_TOUCH_AFTER = 3600.0
#: Keys asked of SQLite per query (`lookup`); rows read from a job's store per page.
_PART, _PAGE = 500, 5000
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE answers (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    scope TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    size INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL NOT NULL
);
-- Apart from the answers' small rows: marking an answer used rewrites its row, not its record.
CREATE TABLE records (id INTEGER PRIMARY KEY, record BLOB NOT NULL);
CREATE UNIQUE INDEX answers_key ON answers(key, scope);
CREATE INDEX answers_used ON answers(used_at);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 0), entries INTEGER NOT NULL, bytes INTEGER NOT NULL, hits INTEGER NOT NULL
);
INSERT INTO totals VALUES (0, 0, 0, 0);
-- The totals follow every insert and delete, so the bound is checked without a scan.
CREATE TRIGGER answers_in AFTER INSERT ON answers
    BEGIN UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size; END;
CREATE TRIGGER answers_out AFTER DELETE ON answers
    BEGIN UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size; DELETE FROM records WHERE id = OLD.id; END;
"""


def default_cache_path() -> Path:
    return llmbatch_home() / "cache.sqlite"


def cache_scope(settings: JobSettings) -> str:
    """Who answers a job's rows, as the cache tells answers apart: the provider, its base URL
    when one was given, and for the local provider its engine and that engine's options (the
    echo engine and a model answer the same request differently)."""
    scope = settings.provider
    if settings.base_url:
        scope += f" {settings.base_url.rstrip('/')}"
    if settings.provider == "local":
        scope += f" {settings.engine}"
        options = settings.local_engine_options()
        if options:
            scope += " " + orjson.dumps(options, option=orjson.OPT_SORT_KEYS, default=str).decode()
    return scope


@dataclass(frozen=True)
class Hit:
    """An answer found in the cache: its record (without id and custom_id), and the usage and
    cost it was paid for."""

    record: bytes
    input_tokens: int
    output_tokens: int
    cost: float


@dataclass(frozen=True)
class Entry:
    """An answer to keep: its result record without id and custom_id (compressed when stored)."""

    key: bytes
    endpoint: str
    model: str
    record: bytes
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: float


@dataclass(frozen=True)
class CacheStats:
    path: Path
    entries: int
    #: Bytes counted against the bound (compressed records plus `ENTRY_OVERHEAD` each).
    stored_bytes: int
    #: The database's files on disk (its WAL included).
    file_bytes: int
    max_size: int
    #: Answers jobs took from the cache, ever.
    hits: int
    #: What the stored answers cost when they were paid for.
    cost: float
    #: scope -> answers.
    by_scope: dict[str, int]


class ResponseCache:
    """The cache's SQLite file; the only place that knows its SQL."""

    #: Seconds after its last use before a use marks an answer again (`_TOUCH_AFTER`).
    touch_after = _TOUCH_AFTER

    def __init__(self, path: Path | None = None, max_size: int | None = None) -> None:
        self.path = path or default_cache_path()
        self.max_size = max_size or DEFAULT_CACHE_MAX_SIZE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the response cache {self.path}: {exc}") from exc
        try:
            # Before any table exists, or it has no effect: lets evictions shrink the file.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(
                f"the response cache {self.path} is damaged or not a cache ({exc}); delete it (or pass "
                "--cache-path) and it is made again empty"
            ) from exc
        except BaseException:
            self._db.close()
            raise

    def _create(self) -> None:
        with self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                raise StateError(f"{self.path}: made by a newer llmbatch (cache schema {version}); upgrade llmbatch")
            if version == 0:
                for statement in _SCHEMA.split(";\n"):  # the triggers' inner `;` are mid-line
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        """One short write transaction: other jobs' processes wait for it at most the busy timeout."""
        return write_tx(self._db, self._lock)

    # -- answers -------------------------------------------------------------------------

    def lookup(self, scope: str, keys: Sequence[bytes]) -> dict[bytes, Hit]:
        """The answers kept for these keys in `scope`; those found count as used now (LRU)."""
        found: dict[bytes, Hit] = {}
        now = time.time()
        stale: list[int] = []
        for i in range(0, len(keys), _PART):
            part = list(keys[i : i + _PART])
            query = (
                "SELECT a.id, a.key, a.input_tokens, a.output_tokens, a.cost, a.used_at, r.record FROM answers a "
                f"JOIN records r ON r.id = a.id WHERE a.scope=? AND a.key IN ({marks(part)})"
            )
            for rowid, key, inp, out, cost, used_at, record in self._db.execute(query, (scope, *part)):
                found[key] = Hit(zlib.decompress(record), inp, out, cost)
                if used_at < now - self.touch_after:
                    stale.append(rowid)
        if found:
            with self._tx() as db:  # one short write for the lot
                db.execute("UPDATE totals SET hits = hits + ?", (len(found),))
                for i in range(0, len(stale), _PART):
                    part = stale[i : i + _PART]
                    db.execute(f"UPDATE answers SET used_at=? WHERE id IN ({marks(part)})", (now, *part))
        return found

    def store(self, scope: str, entries: Sequence[Entry]) -> int:
        """Keeps these answers (a key kept already keeps its first answer), then evicts the least
        recently used past the bound; returns how many were new."""
        if not entries:
            return 0
        now = time.time()
        packed = [zlib.compress(e.record) for e in entries]  # before the transaction: it stays short
        added = 0
        with self._tx() as db:
            for e, z in zip(entries, packed):
                cur = db.execute(
                    "INSERT INTO answers (key, scope, endpoint, model, size, input_tokens, output_tokens, "
                    "cached_tokens, reasoning_tokens, cost, created_at, used_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key, scope) DO NOTHING",
                    (e.key, scope, e.endpoint, e.model, len(z) + ENTRY_OVERHEAD, e.input_tokens, e.output_tokens,
                     e.cached_tokens, e.reasoning_tokens, e.cost, now, now),
                )  # fmt: skip
                if cur.rowcount:
                    db.execute("INSERT INTO records (id, record) VALUES (?, ?)", (cur.lastrowid, z))
                    added += 1
        self.evict()
        return added

    def evict(self) -> int:
        """Deletes the answers used least recently until the stored bytes are 10% under the
        bound (when they are over it); returns how many went."""
        with self._tx() as db:
            stored = int(db.execute("SELECT bytes FROM totals").fetchone()[0])
            if stored <= self.max_size:
                return 0
            excess = stored - int(self.max_size * _EVICT_TO)
            doomed: list[tuple[int]] = []
            for rowid, size in db.execute("SELECT id, size FROM answers ORDER BY used_at, id"):
                doomed.append((rowid,))
                excess -= size
                if excess <= 0:
                    break
            db.executemany("DELETE FROM answers WHERE id=?", doomed)
        self._db.execute("PRAGMA incremental_vacuum")
        return len(doomed)

    def clear(self) -> int:
        """Deletes every answer; returns how many there were."""
        with self._tx() as db:
            n = db.execute("DELETE FROM answers").rowcount
        self._db.execute("PRAGMA incremental_vacuum")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def stats(self) -> CacheStats:
        entries, stored = self._db.execute("SELECT entries, bytes FROM totals").fetchone()
        hits = int(self._db.execute("SELECT hits FROM totals").fetchone()[0])
        cost = float(self._db.execute("SELECT COALESCE(SUM(cost), 0) FROM answers").fetchone()[0])
        by_scope = dict(self._db.execute("SELECT scope, COUNT(*) FROM answers GROUP BY scope").fetchall())
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        file_bytes = sum(f.stat().st_size for f in files if f.exists())
        return CacheStats(self.path, entries, stored, file_bytes, self.max_size, hits, cost, by_scope)

    def export(self) -> Iterator[dict[str, Any]]:
        """Every answer, oldest first: its key (hex), scope, endpoint, model, usage, cost, when it
        was kept and last used (to the hour), and its result record."""
        for row in self._db.execute(
            "SELECT a.key, a.scope, a.endpoint, a.model, r.record, a.input_tokens, a.output_tokens, a.cached_tokens, "
            "a.reasoning_tokens, a.cost, a.created_at, a.used_at FROM answers a JOIN records r ON r.id = a.id "
            "ORDER BY a.id"
        ):
            key, scope, endpoint, model, record, inp, out, cached, reasoning, cost, created, used = row
            yield {
                "key": key.hex(), "scope": scope, "endpoint": endpoint, "model": model,
                "usage": {"input_tokens": inp, "output_tokens": out, "cached_tokens": cached,
                          "reasoning_tokens": reasoning},
                "cost": cost, "created_at": created, "used_at": used,
                "result": orjson.loads(zlib.decompress(record)),
            }  # fmt: skip


# -- a job's side ------------------------------------------------------------------------


#: Rows answered from the cache whose record is not copied in yet.
_WAITING = "FROM main.rows WHERE from_cache=1 AND result IS NULL"


@contextlib.contextmanager
def _with_cache(store: JobStore, cache: ResponseCache | None) -> Iterator[sqlite3.Connection]:
    """The job's store with the cache (if any) attached as `cache`, on a connection of its own
    (the store's connection is shared by the job's threads; an ATTACH there would change what
    their statements see). Answers move between the two in SQL, not a row at a time through
    Python: 100,000 of them in well under a second."""
    db = sqlite3.connect(store.path, isolation_level=None, timeout=30)
    try:
        if cache is not None:
            db.execute("ATTACH DATABASE ? AS cache", (str(cache.path),))
        yield db
    finally:
        db.close()


def answer_from_cache(store: JobStore, cache: ResponseCache, scope: str, *, sampled: bool) -> tuple[int, float]:
    """Answers every pending row of the job's own provider that the cache holds an answer for
    (in `scope`; sampled rows only with `sampled`), in one statement, before anything is
    planned: each such row is succeeded, `from_cache`, and points at its answer (`rows.answer`),
    whose record `keep_answers` copies in once the job's first batch is on its way. A run killed
    in between finds the rows answered and copies the records then; none of them is ever sent.

    Rows moved to a fallback are not looked up: their keys are their requests as the job's own
    provider was sent them, and an answer found under one would be labelled as the fallback's.

    Returns (rows answered now, what their answers cost when they were paid for)."""
    # One statement, so one transaction of its own, which writes the job's store and only reads
    # the cache (other jobs go on writing it meanwhile).
    with _with_cache(store, cache) as db:
        n = db.execute(
            "UPDATE rows SET state='succeeded', from_cache=1, answer=a.id, saved_cost=a.cost, error=NULL, "
            "repeat_of=NULL FROM cache.answers a WHERE a.scope=? AND a.key=rows.request_key AND rows.state='pending' "
            "AND rows.lane=0 AND (rows.sampled=0 OR ?)",
            (scope, sampled),
        ).rowcount
        return n, float(db.execute(f"SELECT COALESCE(SUM(saved_cost), 0) {_WAITING}").fetchone()[0])


def keep_answers(store: JobStore, cache: ResponseCache | None) -> int:
    """Copies the records of the answers rows took from the cache (`answer_from_cache`) into the
    job's store, so that its results no longer depend on the cache, and marks those answers used
    (LRU, to the hour). A row whose answer has gone from the cache since (cleared, evicted by
    another job, or the job runs without `--cache` now) goes back to pending, to be sent.
    Returns how many rows went back."""
    with _with_cache(store, cache) as conn:
        if conn.execute(f"SELECT 1 {_WAITING} LIMIT 1").fetchone() is None:
            return 0
        with write_tx(conn, contextlib.nullcontext()) as db:
            if cache is not None:
                now = time.time()
                waiting = f"SELECT answer {_WAITING}"
                found = f"SELECT COUNT(*) FROM cache.answers WHERE id IN ({waiting})"
                db.execute(f"UPDATE cache.totals SET hits = hits + ({found})")
                db.execute(
                    f"UPDATE cache.answers SET used_at=? WHERE used_at < ? AND id IN ({waiting})",
                    (now, now - cache.touch_after),
                )
                # The key too: an id freed by a deletion may be another answer's by now.
                db.execute(
                    "UPDATE rows SET result=r.record FROM cache.answers a JOIN cache.records r ON r.id=a.id "
                    "WHERE a.id=rows.answer AND a.key=rows.request_key AND rows.from_cache=1 AND rows.result IS NULL"
                )
            return db.execute(
                "UPDATE rows SET state='pending', from_cache=0, saved_cost=0, answer=NULL "
                "WHERE from_cache=1 AND result IS NULL"
            ).rowcount


#: Where a failure to keep answers is said.
Say = Callable[[str], None]


def remember(ctx: RunContext, outcome: Outcome) -> int:
    """Keeps the answers of `outcome`'s succeeded rows (applied to the store already) in the
    job's response cache, if it has one: those with a key that, unless the job caches `all`,
    are not sampled. Returns how many were new there.

    The cache is a saving, not a duty: a failure to write it (a full disk, a lock held past the
    timeout) is said and the job goes on."""
    if ctx.cache is None or not outcome.succeeded or ctx.lane:
        # A fallback's answers: the rows' keys are their requests as the job's own provider was
        # sent them, so they would be kept under another provider's request.
        return 0
    return _keep(ctx.store, ctx.cache, ctx.settings, outcome.succeeded, ctx.say)


def keep_earlier_answers(store: JobStore, cache: ResponseCache, settings: JobSettings, say: Say) -> int:
    """Keeps in the cache the answers a job got before it ran with this cache (a job run first
    without `--cache`, then again with it): its own provider's, a page at a time. Returns how
    many were new there."""
    added, after = 0, -1
    while page := store.answered_rows(after, _PAGE):
        after = page[-1].idx
        added += _keep(store, cache, settings, page, say)
    return added


def _keep(store: JobStore, cache: ResponseCache, settings: JobSettings, succeeded: Sequence[Success], say: Say) -> int:
    sampled = settings.cache == "all"
    keys = store.cache_keys([s.idx for s in succeeded])
    entries: list[Entry] = []
    with ResultReader(store) as reader:
        for s in succeeded:
            key, row_sampled, endpoint, model = keys.get(s.idx, (None, 0, "", ""))
            if key is None or (row_sampled and not sampled):
                continue
            rec = orjson.loads(reader.line(s.result))
            for name in ("id", "custom_id", "cached"):
                rec.pop(name, None)
            usage = (s.input_tokens, s.output_tokens, s.cached_tokens, s.reasoning_tokens)
            entries.append(Entry(key, endpoint, model, orjson.dumps(rec), *usage, s.cost))
    try:
        return cache.store(cache_scope(settings), entries)
    except (sqlite3.Error, OSError) as exc:
        say(f"the response cache {cache.path} could not keep {len(entries)} answers: {exc}")
        return 0
