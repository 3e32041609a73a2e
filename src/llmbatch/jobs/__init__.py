"""Durable batch jobs: `llmbatch run` and friends.

A job is identified by its inputs (path, size, modification time) and where it runs
(provider, base URL, engine), so running the same command again finds the same job and
resumes it. Its state lives in `JOB_ROOT/<job id>/job.sqlite`. `JobSession` is the one driver
every front end runs a job through; `JobRunner` is its loop; the other modules are its steps.
"""

from __future__ import annotations

from ._cache import (
    DEFAULT_CACHE_MAX_SIZE,
    CacheStats,
    ResponseCache,
    answer_from_cache,
    cache_scope,
    default_cache_path,
)
from ._export import ResultReader, export, line_id, output_lines, output_paths
from ._ingest import IngestReport, RowRules, ingest, remote_id_for
from ._lock import JobLock, lock_held
from ._manage import Removed, list_jobs, prune_jobs, remove_job
from ._progress import LiveProgress, PlainProgress, Snapshot, make_progress
from ._records import CHUNK_STATES, IN_FLIGHT, ROW_STATES, CheckedRow, Chunk, RequestRow, Result, ResultRef
from ._runner import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    JobRunner,
    RunOutcome,
)
from ._schema import SCHEMA_VERSION
from ._session import (
    JobSession,
    Prepared,
    default_job_root,
    job_id_for,
    make_provider,
    price_table,
    provider_of,
    provider_started,
    settings_for,
)
from ._settings import JobSettings
from ._store import JobStore
from ._verify import check_results, find_damage

__all__ = [
    "CHUNK_STATES",
    "DEFAULT_CACHE_MAX_SIZE",
    "CacheStats",
    "ResponseCache",
    "answer_from_cache",
    "cache_scope",
    "default_cache_path",
    "EXIT_BUDGET",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "IN_FLIGHT",
    "ROW_STATES",
    "SCHEMA_VERSION",
    "CheckedRow",
    "Chunk",
    "IngestReport",
    "JobLock",
    "JobRunner",
    "JobSession",
    "JobSettings",
    "JobStore",
    "LiveProgress",
    "PlainProgress",
    "Prepared",
    "Removed",
    "RequestRow",
    "Result",
    "ResultReader",
    "ResultRef",
    "RowRules",
    "RunOutcome",
    "Snapshot",
    "default_job_root",
    "check_results",
    "export",
    "find_damage",
    "ingest",
    "job_id_for",
    "line_id",
    "list_jobs",
    "lock_held",
    "make_progress",
    "make_provider",
    "output_lines",
    "output_paths",
    "price_table",
    "provider_of",
    "provider_started",
    "prune_jobs",
    "remote_id_for",
    "remove_job",
    "settings_for",
]
